"""LoRA (mr1.models.lora) and its use by the RL update and trainer, on the tiny models.

Checks: a zero ``b`` merges to the base exactly; the merge is ``W + s * a @ b``; a LoRA GRPO
update has the full fine-tuning loss at step 0 and the projected gradient
``dL/db = s * a^T dL/dW`` (``dL/da = 0``); it trains the adapters only and leaves the base
untouched; the trainer runs 2 LoRA steps end to end, its checkpoints hold the adapters only, and
the evaluation loader merges them into the base. Also prints the trainable-parameter and
optimizer-state counts of LoRA against full fine-tuning for SmolLM2-135M (shapes only).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mr1.models import load_policy, transformer
from mr1.models.config import get_config
from mr1.models.lora import DEFAULT_TARGETS, init_lora, lora_num_params, lora_scale, merge_lora
from mr1.rl import train_step as TS
from tests import rl_driver as D
from tests.test_rl_train_step import G, P, _advantaged

RANK, ALPHA = 4, 16.0


def _random_b(lora, seed=1):
    """``lora`` with every ``b`` replaced by random values (a non-trivial adapter)."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(lora["layers"])))
    return {"layers": {n: {"a": ab["a"], "b": 0.1 * jax.random.normal(next(keys), ab["b"].shape)}
                       for n, ab in lora["layers"].items()}}


@pytest.mark.device
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_zero_b_merges_to_the_base_exactly(dtype):
    base = load_policy("tiny", seed=0, dtype=dtype).params
    lora = init_lora(base, RANK, rng=jax.random.PRNGKey(3))
    for name, (n, d_in, d_out) in {k: base["layers"][k].shape for k in DEFAULT_TARGETS}.items():
        assert lora["layers"][name]["a"].shape == (n, d_in, RANK)
        assert lora["layers"][name]["b"].shape == (n, RANK, d_out)
        assert not np.any(np.asarray(lora["layers"][name]["b"]))
        std = float(np.std(np.asarray(lora["layers"][name]["a"])))
        assert 0.7 < std * np.sqrt(d_in) < 1.3, (name, std)
    merged = merge_lora(base, lora, lora_scale(ALPHA, RANK))
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(base)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    assert merged["embed"] is base["embed"]  # untouched leaves are the base's own


@pytest.mark.device
def test_merge_is_w_plus_scaled_a_b():
    base = load_policy("tiny", seed=0).params
    targets = ("wq", "w_down")
    lora = _random_b(init_lora(base, RANK, targets, rng=jax.random.PRNGKey(3)))
    s = lora_scale(ALPHA, RANK)
    merged = merge_lora(base, lora, s)
    for name in base["layers"]:
        w = np.asarray(base["layers"][name])
        got = np.asarray(merged["layers"][name])
        if name not in targets:
            np.testing.assert_array_equal(got, w)
            continue
        a, b = (np.asarray(lora["layers"][name][k], np.float64) for k in ("a", "b"))
        want = w + s * np.stack([a[i] @ b[i] for i in range(w.shape[0])])
        assert np.abs(want - w).max() > 1e-2  # the adapter is not negligible
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_invalid_lora_arguments():
    base = load_policy("tiny", seed=0).params
    with pytest.raises(ValueError, match="rank"):
        init_lora(base, 0)
    with pytest.raises(KeyError, match="not a layer weight"):
        init_lora(base, 2, ("wq", "w_nope"))
    with pytest.raises(ValueError, match="frozen base"):
        TS.policy_params({"lora": init_lora(base, 2)})


def test_parameter_counts_smollm2_135m(capsys):
    """Trainable parameters / Adam state of LoRA vs full fine-tuning (shapes only)."""
    cfg = get_config("smollm2-135m")
    shapes = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.PRNGKey(0)))
    full = sum(x.size for x in jax.tree.leaves(shapes))
    assert full == cfg.num_params == 134_515_008
    lines = []
    for r in (4, 8, 16, 64):
        n = lora_num_params(shapes, r)
        tree = jax.eval_shape(lambda r=r: init_lora(shapes, r))
        assert n == sum(x.size for x in jax.tree.leaves(tree))
        lines.append(f"rank {r:2d}: {n:>10,} trainable ({100 * n / full:5.2f}%), Adam moments "
                     f"{2 * n:>11,} floats ({8 * n / 2**20:6.1f} MiB f32)")
    assert lora_num_params(shapes, 8) == 2_442_240
    with capsys.disabled():
        print(f"\nsmollm2-135m full fine-tuning: {full:,} trainable, Adam moments {2 * full:,} "
              f"floats ({8 * full / 2**20:.0f} MiB f32)")
        print("\n".join("  LoRA " + x for x in lines))


def _grad_capture():
    """An "optimizer" that leaves params unchanged and stores the gradient as its state."""
    return optax.GradientTransformation(
        init=lambda p: jax.tree.map(jnp.zeros_like, p),
        update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


@pytest.mark.device
def test_lora_update_matches_full_fine_tuning_at_step_0():
    pol, a = _advantaged()
    base = pol.params
    lora = init_lora(base, RANK, rng=jax.random.PRNGKey(7))
    s = lora_scale(ALPHA, RANK)
    batch = TS.split_microbatches(a, P, G, 2)
    opt = _grad_capture()
    lc = TS.LossConfig()
    full, m_full = TS.make_update(pol.config, lc, opt)(  # donates its state: a copy of base
        TS.init_train_state({"policy": jax.tree.map(jnp.copy, base)}, opt, 0), batch)
    low, m_low = TS.make_update(pol.config, lc, opt, lora_scale=s)(
        TS.init_train_state({"lora": jax.tree.map(jnp.copy, lora)}, opt, 0), batch, base)
    assert float(m_full["grad_norm"]) > 0
    np.testing.assert_allclose(float(m_low["loss"]), float(m_full["loss"]), rtol=1e-6)
    for name in DEFAULT_TARGETS:
        g_w = np.asarray(full.opt_state["policy"]["layers"][name], np.float64)  # [L, in, out]
        g = low.opt_state["lora"]["layers"][name]
        a_ = np.asarray(lora["layers"][name]["a"], np.float64)                  # [L, in, r]
        want_b = s * np.einsum("lir,lio->lro", a_, g_w)
        got_b = np.asarray(g["b"])
        assert np.abs(want_b).max() > 0, name
        np.testing.assert_allclose(got_b, want_b, rtol=1e-3, atol=1e-4 * np.abs(want_b).max(),
                                   err_msg=name)
        np.testing.assert_array_equal(np.asarray(g["a"]), 0.0)  # dL/da = s dL/dW b^T, b = 0


@pytest.mark.device
def test_lora_update_trains_only_the_adapters():
    pol, a = _advantaged()
    base = pol.params
    base_copy = jax.tree.map(np.array, base)
    lora = init_lora(base, RANK, rng=jax.random.PRNGKey(7))
    opt = TS.make_optimizer(1e-2, lora=True)
    state0 = TS.init_train_state({"lora": jax.tree.map(jnp.copy, lora)}, opt, 0)  # donated
    n_lora = lora_num_params(base, RANK)
    n_opt = sum(x.size for x in jax.tree.leaves(state0.opt_state))
    assert n_opt <= 2 * n_lora + 8  # Adam's two moments of the adapters (+ counters)
    update = TS.make_update(pol.config, TS.LossConfig(), opt, lora_scale=lora_scale(ALPHA, RANK))
    batch = TS.split_microbatches(a, P, G, 2)
    state, m1 = update(state0, batch, base)
    state, m2 = update(state, batch, base)
    assert float(m1["skipped"]) == float(m2["skipped"]) == 0.0
    assert set(state.params) == {"lora"}
    for name in DEFAULT_TARGETS:
        for k in ("a", "b"):  # b moves on step 1, a from step 2 (its step-1 gradient is 0)
            assert not np.allclose(np.asarray(state.params["lora"]["layers"][name][k]),
                                   np.asarray(lora["layers"][name][k])), (name, k)
    for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(base_copy)):
        assert not x.is_deleted()  # not donated (the state is)
        np.testing.assert_array_equal(np.asarray(x), y)  # the frozen base is untouched
    merged = TS.policy_params(state.params, base, lora_scale(ALPHA, RANK))
    np.testing.assert_array_equal(np.asarray(merged["embed"]), base_copy["embed"])
    np.testing.assert_array_equal(np.asarray(merged["layers"]["attn_norm"]["scale"]),
                                  base_copy["layers"]["attn_norm"]["scale"])


@pytest.mark.parametrize("algo, rank", [("grpo", 0), ("ppo", 0), ("ppo", RANK)])
def test_load_trained_params(tmp_path, algo, rank):
    """The evaluation loader on saved train states: full / LoRA params, GRPO / PPO (whose
    value head is saved with the params); without config.json a full GRPO run is assumed."""
    from mr1.checkpoint import Checkpointer
    from mr1.rl.trainer import load_trained_params

    pol = load_policy("tiny", seed=0)
    base = pol.params
    trained = jax.tree.map(lambda x: x + 1.0, base)  # stands for fine-tuned params
    lora = _random_b(init_lora(base, RANK, ("wq", "w_up"), rng=jax.random.PRNGKey(2)))
    params = {"lora": lora} if rank else {"policy": trained}
    if algo == "ppo":
        params["value_head"] = TS.init_value_head(pol.config)
    opt = TS.make_optimizer(1e-3, critic_learning_rate=1e-3 if algo == "ppo" else None,
                            lora=bool(rank))
    run = {"algo": algo, "lora": {"rank": rank, "alpha": ALPHA, "targets": ["wq", "w_up"]}}
    ckpt = tmp_path / "checkpoints"
    with Checkpointer(ckpt, save_every=1) as c:
        c.save(3, TS.init_train_state(params, opt, 0), force=True)
    if algo == "grpo":
        got = load_trained_params(ckpt, base)  # no config.json: full fine-tuning
        jax.tree.map(np.testing.assert_array_equal, got, trained)
    (tmp_path / "config.json").write_text(json.dumps(run))
    got = load_trained_params(ckpt, base)
    want = merge_lora(base, lora, lora_scale(ALPHA, rank)) if rank else trained
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.fixture(scope="module")
def lora_run(embedded_gguf, tmp_path_factory):
    """The tiny trainer (toy dense reward) for 2 steps with LoRA rank 4, in a subprocess."""
    from mr1.data import locomo
    try:
        locomo.load_locomo()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"LoCoMo data unavailable: {e}")
    wd = tmp_path_factory.mktemp("lora_run") / "run"
    D.run(wd, {"lora.rank": RANK, "num_steps": 2, "checkpoint_every": 1, "eval.every": 2},
          timeout=600)
    return wd


def test_trainer_lora_end_to_end(lora_run):
    from mr1.checkpoint import restore_params
    from mr1.rl.trainer import load_trained_params

    rows = D.csv_rows(lora_run)
    assert sorted(rows) == [0, 1, 2]
    assert all(rows[s]["skipped"] == 0.0 and rows[s]["grad_norm"] > 0 for s in (1, 2)), rows
    assert "val_f1" in rows[2]
    # step 2 samples from the merged policy the update scores: the sampler's log-probs agree
    # (approx_kl 0; rolling out from the unmerged base gives ~1e-4 here)
    assert rows[2]["approx_kl"] < 1e-8 and abs(rows[2]["ratio_mean"] - 1) < 1e-6, rows[2]
    assert "LoRA rank 4" in D.tail(D.log_path_of(lora_run), 100_000)
    assert json.loads((lora_run / "config.json").read_text())["lora"]["rank"] == RANK

    base = load_policy("tiny-smollm2", seed=0).params  # the run's base (config.seed = 0)
    ckpt = lora_run / "checkpoints"
    like = {"lora": jax.eval_shape(lambda: init_lora(base, RANK))}
    saved = restore_params(ckpt, like)
    bs = [np.asarray(ab["b"]) for ab in saved["lora"]["layers"].values()]
    assert all(np.any(b) for b in bs)  # the adapters trained
    with pytest.raises(ValueError, match="config.json"):  # no full policy in the checkpoint
        load_trained_params(ckpt, base, run={})

    merged = load_trained_params(ckpt, base)
    want = merge_lora(base, saved["lora"], lora_scale(ALPHA, RANK))
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.allclose(np.asarray(merged["layers"]["wq"]), np.asarray(base["layers"]["wq"]))
    np.testing.assert_array_equal(np.asarray(merged["embed"]), np.asarray(base["embed"]))


def test_evaluate_loads_a_lora_checkpoint(lora_run):
    """experiments/evaluate.py with ``checkpoint`` = the LoRA run: the merged params are used."""
    from mr1.rl.trainer import load_policy_from_config, load_trained_params
    from tests.test_agents import HashEmbedder, fake_generate
    from tests.test_evaluate import _config, _module

    ev = _module("evaluate")
    policy = load_policy_from_config(D.make_config({}))  # tiny-smollm2 (seed 0) + the embedded tokenizer
    seen = []

    def gen(pol, prompts, **kw):
        seen.append(pol.params)
        return fake(pol, prompts, **kw)

    fake = fake_generate(lambda p: "**Answer:** Rome")
    logs = []
    ev.run(_config(method="rag", checkpoint=str(lora_run / "checkpoints"),
                   model="tiny-smollm2"),
           lora_run.parent / "eval", policy=policy, embedder=HashEmbedder(), generate_fn=gen,
           log=logs.append)
    assert any("LoRA rank 4 merged" in x for x in logs), logs
    want = load_trained_params(lora_run / "checkpoints", policy.params)
    assert seen
    for x, y in zip(jax.tree.leaves(seen[0]), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
