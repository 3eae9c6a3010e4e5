"""mr1.parallel: mesh shapes, partition rules, per-device bytes; remat leaves gradients as they are."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

from mr1 import parallel as par
from mr1.models import transformer
from mr1.models.config import get_config


def test_mesh_shape_resolve_fills_one_axis_and_checks_the_product():
    assert par.MeshShape.resolve(64, -1, 8, 4).as_tuple() == (2, 8, 4)
    assert par.MeshShape.resolve(8, 1, -1, 1).as_tuple() == (1, 8, 1)
    assert par.MeshShape.resolve(8, 2, 2, 2).batch == 4
    with pytest.raises(ValueError, match="do not split"):
        par.MeshShape.resolve(6, -1, 4, 1)
    with pytest.raises(ValueError, match="needs 8 devices, 4 present"):
        par.MeshShape.resolve(4, 2, 2, 2)
    with pytest.raises(ValueError, match="at most one"):
        par.MeshShape.resolve(8, -1, -1, 1)


def test_legacy_configs_put_all_devices_on_one_axis():
    c = ml_collections.ConfigDict({"param_sharding": "replicated", "mesh": ()})
    assert par.mesh_shape_from_config(c, 8).as_tuple() == (8, 1, 1)
    c.param_sharding = "fsdp"
    assert par.mesh_shape_from_config(c, 8).as_tuple() == (1, 8, 1)
    c.mesh = (-1, 2, 2)
    assert par.mesh_shape_from_config(c, 8).as_tuple() == (2, 2, 2)
    with pytest.raises(ValueError, match="param sharding"):
        par.mesh_shape_from_config(ml_collections.ConfigDict({"param_sharding": "zero3"}), 8)


def _abstract_params(name):
    cfg = get_config(name)
    return jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.PRNGKey(0),
                                                          jnp.bfloat16))


def test_rules_cover_every_weight_of_a_qwen_layer():
    """Qwen-2.5-7B on (data 2, fsdp 8, tp 4): every large weight is matched by a rule (no
    fallback) and split over both fsdp and tp; norms and biases follow their rules."""
    sizes = {"data": 2, "fsdp": 8, "tp": 4}
    rows = {p: (shape, spec, note) for p, shape, spec, note in
            par.sharding_report(_abstract_params("qwen2.5-7b"), sizes, "fsdp")}
    assert rows["layers/wq"][1] == PS(None, "fsdp", "tp")
    assert rows["layers/wk"][1] == PS(None, "fsdp", "tp")   # 4 kv heads x 128 = 512 / 4
    assert rows["layers/wo"][1] == PS(None, "tp", "fsdp")
    assert rows["layers/w_down"][1] == PS(None, "tp", "fsdp")
    assert rows["embed"][1] == PS("tp", "fsdp")
    assert rows["lm_head"][1] == PS("fsdp", "tp")
    assert rows["layers/bq"][1] == PS(None, "tp")
    assert rows["final_norm/scale"][1] == PS()
    assert not [p for p, (_, _, note) in rows.items() if note.startswith("fallback")]


def test_indivisible_dims_replicate_and_say_why():
    """SmolLM2-135M has 3 kv heads x 64 = 192 columns: not divisible by tp=5 → that dim
    replicates, and the report names the reason."""
    spec, note = par.spec_for("layers/wk", (30, 576, 192), {"data": 1, "fsdp": 2, "tp": 5})
    assert spec == PS(None, "fsdp", None)
    assert "192 not divisible by tp=5" in note


def test_replicated_mode_drops_fsdp_but_keeps_tp():
    sizes = {"data": 1, "fsdp": 4, "tp": 2}
    assert par.spec_for("policy/layers/w_up", (2, 64, 128), sizes, "replicated")[0] == \
        PS(None, None, "tp")
    # optimizer-state paths end with the param path, so the same rule applies
    path = "opt_state/1/inner_states/policy/inner_state/0/mu/policy/layers/w_up"
    assert par.spec_for(path, (2, 64, 128), sizes, "fsdp")[0] == PS(None, "fsdp", "tp")


def test_shard_bytes_divides_by_the_axes_used():
    sizes = {"data": 2, "fsdp": 8, "tp": 4}
    assert par.shard_bytes((28, 3584, 3584), 2, PS(None, "fsdp", "tp"), sizes) == \
        28 * 3584 * 3584 * 2 // 32
    assert par.shard_bytes((10, 7), 4, PS(("data", "fsdp"), None), sizes) == 1 * 7 * 4


@pytest.mark.device
def test_make_mesh_default_is_all_data():
    mesh = par.make_mesh()
    assert mesh.axis_names == par.MESH_AXES
    assert par.mesh_shape(mesh).as_tuple() == (jax.device_count(), 1, 1)


@pytest.mark.device
def test_remat_gives_the_same_loss_and_gradients():
    from mr1.rl import train_step as TS

    cfg = get_config("tiny")
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(3, 200, (2, 6)), jnp.int32)
    pmask = jnp.ones((2, 6), jnp.int32).at[0, :2].set(0)
    tokens = jnp.asarray(rng.integers(3, 200, (4, 5)), jnp.int32)
    cmask = jnp.ones((4, 5), jnp.float32).at[1, 3:].set(0)

    def loss(p, remat):
        out = TS.score_completions(p, cfg, prompt, pmask, tokens, cmask, remat=remat)
        return jnp.sum(out["logp"] * cmask)

    (l0, g0), (l1, g1) = (jax.value_and_grad(loss)(params, r) for r in (False, True))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.device
def test_attention_and_logit_chunks_give_the_same_loss_and_gradients():
    """Query-block attention (ModelConfig.attention_chunk) and blockwise log-probs
    (logit_chunk) are memory layouts: same log-probs, entropies and gradients as one block."""
    from mr1.rl import train_step as TS

    cfg = get_config("tiny")
    params = transformer.init_params(cfg, jax.random.PRNGKey(1))
    rng = np.random.default_rng(1)
    prompt = jnp.asarray(rng.integers(3, 200, (2, 8)), jnp.int32)
    pmask = jnp.ones((2, 8), jnp.int32).at[1, :3].set(0)
    tokens = jnp.asarray(rng.integers(3, 200, (4, 8)), jnp.int32)
    cmask = jnp.ones((4, 8), jnp.float32).at[2, 5:].set(0)

    def loss(p, c, chunk, lchunk):
        out = TS.score_completions(p, c, prompt, pmask, tokens, cmask, with_entropy=True,
                                   logit_chunk=lchunk)
        return jnp.sum(out["logp"] * cmask) + 0.1 * jnp.sum(out["entropy"]), out

    (l0, o0), g0 = jax.value_and_grad(lambda p: loss(p, cfg, 0, 0), has_aux=True)(params)
    chunked = cfg.replace(attention_chunk=4)
    (l1, o1), g1 = jax.value_and_grad(lambda p: loss(p, chunked, 4, 2), has_aux=True)(params)
    np.testing.assert_allclose(o1["logp"], o0["logp"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(o1["entropy"], o0["entropy"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # the prompt pass (8 positions) is chunked too: prefill logits agree
    from mr1.sampling import prefill
    la, _ = prefill(params, cfg, prompt, pmask)
    lb, _ = prefill(params, chunked, prompt, pmask)
    np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-5)
