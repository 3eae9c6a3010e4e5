"""The jitted GRPO / PPO update (mr1.rl.train_step) on the tiny random model.

Checks: completion scoring equals the sampler's log-probs and a plain full-sequence forward;
micro-batching does not change the update; equal rewards give a zero gradient; a NaN loss skips
the update; the PPO critic learns; the update on 8 CPU devices (replicated and FSDP params)
equals the single-device one.
"""

import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mr1.models import load_policy
from mr1.rl import train_step as TS
from mr1.rl.advantages import group_advantages
from mr1.rl.losses import token_logprobs
from mr1.sampling import SamplingConfig, left_pad, sample_padded

P, G, TC = 4, 4, 6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rollout(seed=0, policy=None):
    """A real tiny-model rollout: prompts of different lengths, G samples each."""
    pol = policy or load_policy("tiny", seed=0)
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, 256, n)) for n in (5, 11, 8, 3)]
    ids, mask = left_pad(prompts, pol.pad_token_id, 16)
    tok, lp, lens = sample_padded(pol, ids, mask, jax.random.PRNGKey(seed),
                                  SamplingConfig(max_new_tokens=TC, temperature=1.0,
                                                 num_samples=G))
    cm = (np.arange(TC)[None] < lens[:, None]).astype(np.float32)
    return pol, dict(prompt_ids=ids, prompt_mask=mask, tokens=tok, completion_mask=cm,
                     old_logp=lp)


def _full_forward_logp(pol, arrays):
    """Log-probs of the completions from one forward over [prompt ; completion] per sample."""
    ids = np.repeat(arrays["prompt_ids"], G, 0)
    pm = np.repeat(arrays["prompt_mask"], G, 0)
    seq = np.concatenate([ids, arrays["tokens"]], 1)
    m = np.concatenate([pm, arrays["completion_mask"].astype(np.int32)], 1)
    logits = pol.logits(seq, m)
    t_p = ids.shape[1]
    return np.asarray(token_logprobs(jnp.asarray(logits[:, t_p - 1:-1]),
                                     jnp.asarray(arrays["tokens"])))


@pytest.mark.device
def test_scoring_matches_sampler_and_full_forward():
    pol, a = _rollout()
    out = TS.score_completions(pol.params, pol.config, a["prompt_ids"], a["prompt_mask"],
                               a["tokens"], a["completion_mask"])
    cm = a["completion_mask"]
    assert cm.sum() > 0
    np.testing.assert_allclose(np.asarray(out["logp"]) * cm, a["old_logp"] * cm, atol=2e-5)
    np.testing.assert_allclose(np.asarray(out["logp"]) * cm, _full_forward_logp(pol, a) * cm,
                               atol=2e-5)


def _sgd_update(pol, arrays, mbp, lc=TS.LossConfig(), params=None):
    opt = optax.sgd(1.0)
    params = params or {"policy": pol.params}
    state = TS.init_train_state(params, opt, 0)
    batch = TS.split_microbatches(arrays, P, G, mbp)
    fn = jax.jit(lambda s, b: TS.update_step(s, b, cfg=pol.config, lc=lc, optimizer=opt))
    return fn(state, batch)


def _advantaged(seed=0):
    pol, a = _rollout(seed)
    rewards = np.random.default_rng(seed).random(P * G).astype(np.float32)
    a["advantages"] = np.array(group_advantages(rewards, G))
    return pol, a


@pytest.mark.device
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_microbatching_gives_the_global_batch_update(agg):
    pol, a = _advantaged()
    lc = TS.LossConfig(agg=agg)
    s1, m1 = _sgd_update(pol, a, P, lc)
    s4, m4 = _sgd_update(pol, a, 1, lc)
    assert float(m1["grad_norm"]) > 0
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
    chex.assert_trees_all_close(s1.params, s4.params, atol=1e-6, rtol=0)


@pytest.mark.device
def test_equal_rewards_give_zero_gradient():
    pol, a = _rollout()
    a["advantages"] = np.asarray(group_advantages(np.full(P * G, 0.7, np.float32), G))
    state, m = _sgd_update(pol, a, 2)
    assert float(m["grad_norm"]) == 0.0
    chex.assert_trees_all_equal(state.params["policy"], pol.params)


@pytest.mark.device
def test_nan_loss_skips_the_update():
    pol, a = _advantaged()
    a["advantages"][3] = np.nan
    opt = TS.make_optimizer(1e-3)
    state0 = TS.init_train_state({"policy": pol.params}, opt, 0)
    fn = TS.make_update(pol.config, TS.LossConfig(), opt)
    state1, m = fn(jax.tree.map(jnp.copy, state0), TS.split_microbatches(a, P, G, 2))
    assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
    assert int(state1.step) == 1
    chex.assert_trees_all_equal((state1.params, state1.opt_state),
                                (state0.params, state0.opt_state))
    # and the next finite batch updates normally
    a["advantages"][3] = 0.0
    state2, m2 = fn(state1, TS.split_microbatches(a, P, G, 2))
    assert float(m2["skipped"]) == 0.0
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
               zip(jax.tree.leaves(state2.params), jax.tree.leaves(state0.params)))


@pytest.mark.device
def test_ppo_critic_learns_the_returns():
    pol, a = _rollout()
    returns = np.random.default_rng(1).random(a["tokens"].shape).astype(np.float32)
    a.update(advantages=np.zeros_like(returns), returns=returns * a["completion_mask"],
             old_values=np.zeros_like(returns))
    opt = TS.make_optimizer(1e-6, critic_learning_rate=3e-2)
    params = {"policy": pol.params, "value_head": TS.init_value_head(pol.config)}
    state = TS.init_train_state(params, opt, 0)
    lc = TS.LossConfig(objective="ppo", vf_clip=1e3)
    fn = TS.make_update(pol.config, lc, opt)
    batch = TS.split_microbatches(a, P, G, 2)
    losses = []
    for _ in range(20):
        state, m = fn(state, batch)
        losses.append(float(m["vf_loss"]))
    assert losses[-1] < 0.5 * losses[0], losses


_MULTI_DEVICE = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r})
    from tests.test_rl_train_step import _advantaged, G
    from mr1 import parallel
    from mr1.rl import train_step as TS
    pol, a = _advantaged()
    a = {{k: np.concatenate([v, v[::-1] if k == "advantages" else v]) for k, v in a.items()}}
    P = 8  # two copies of the 4 prompts: 8 prompts split over 8 devices
    opt = TS.make_optimizer(1e-3)
    out = {{}}
    cases = [("1-replicated", 1, "replicated", 2, (1, 1, 1)),
             ("8-replicated", 8, "replicated", 8, (8, 1, 1)),
             ("8-fsdp", 8, "fsdp", 8, (1, 8, 1)),
             ("8-data2-fsdp2-tp2", 8, "fsdp", 8, (2, 2, 2))]
    for name, n, mode, mb, shape in cases:
        mesh = parallel.make_mesh(n, shape)
        state = TS.init_train_state({{"policy": pol.params}}, opt, 0)
        shard = lambda t: parallel.param_shardings(t, mesh, mode)
        ss = TS.TrainState(step=parallel.replicated(mesh), params=shard(state.params),
                           opt_state=shard(state.opt_state), rng=parallel.replicated(mesh))
        state = parallel.to_global(jax.device_get(state), ss)
        batch = parallel.to_global(TS.split_microbatches(a, P, G, mb),
                                   parallel.batch_sharding(mesh, microbatched=True))
        new, m = TS.make_update(pol.config, TS.LossConfig(), opt, mesh, ss)(state, batch)
        leaves = [np.asarray(x).ravel() for x in jax.tree.leaves(new.params)]
        out[name] = {{"params": np.concatenate(leaves).tolist(),
                     "loss": float(m["loss"]), "devices": int(mesh.size),
                     "sharded": {{k: list(new.params["policy"]["layers"][k].sharding.spec)
                                 for k in ("wq", "wo")}}}}
    print("RESULT" + json.dumps(out))
""")


def run_on_8_devices(script: str, timeout: float = 900) -> dict:
    """Runs ``script`` in a subprocess with 8 forced CPU devices; returns the JSON it prints
    after ``RESULT``."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.split("RESULT", 1)[1])


def test_update_on_8_devices_equals_single_device():
    """One update on 8 CPU devices (batch split 8 ways with params replicated, then FSDP-sharded;
    then a (data 2, fsdp 2, tp 2) mesh: batch split 4 ways, weights split over fsdp and tp)
    equals the 1-device update (4 micro-batches there): parameters within 1e-5 (1% of the
    1e-3 Adam step; Adam's first step is lr * g / (|g| + eps), so a gradient that is float
    noise away from zero can move a few 1e-6 when the reduction order changes), loss 1e-5."""
    out = run_on_8_devices(_MULTI_DEVICE.format(root=ROOT))
    base = np.asarray(out["1-replicated"]["params"])
    for key in ("8-replicated", "8-fsdp", "8-data2-fsdp2-tp2"):
        assert out[key]["devices"] == 8
        got = np.asarray(out[key]["params"])
        np.testing.assert_allclose(got, base, atol=1e-5)
        assert np.mean(np.abs(got - base) > 1e-6) < 1e-4  # all but a handful agree to 1e-6
        np.testing.assert_allclose(out[key]["loss"], out["1-replicated"]["loss"], rtol=1e-5,
                                   atol=1e-7)
    spec = lambda key, name: out[key]["sharded"][name] + [None] * (  # noqa: E731
        3 - len(out[key]["sharded"][name]))
    assert spec("8-replicated", "wq") == [None, None, None]  # [L, D, H*hd]
    assert (spec("8-fsdp", "wq"), spec("8-fsdp", "wo")) == ([None, "fsdp", None],
                                                            [None, None, "fsdp"])
    assert (spec("8-data2-fsdp2-tp2", "wq"), spec("8-data2-fsdp2-tp2", "wo")) == (
        [None, "fsdp", "tp"], [None, "tp", "fsdp"])
