"""RL losses, advantages and rewards against plain numpy loop references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mr1.rl import advantages as A
from mr1.rl import losses as L
from mr1.rl import rewards as R

pytestmark = pytest.mark.device  # all of it: the accelerator selection (conftest.py)

B, T = 4, 6


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.5, 0.5, (B, T)).astype(np.float32)
    old = (logp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    ref = (logp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    adv = rng.normal(0, 1, (B,)).astype(np.float32)
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    mask[0, :] = 1.0
    mask[1, 0] = 1.0
    mask[3, :] = 0.0  # fully-masked row
    return logp, old, ref, adv, mask


# ------------------------------------------------------------------ numpy references
def _np_kl(lp, rl, est):
    x = rl - lp
    return {"k1": -x, "k2": 0.5 * x * x, "k3": math.exp(x) - x - 1.0}[est]


def _np_agg(tok, mask, agg):
    if agg == "token_mean":
        s = n = 0.0
        for b in range(tok.shape[0]):
            for t in range(tok.shape[1]):
                if mask[b, t]:
                    s += tok[b, t]
                    n += 1
        return s / max(n, 1)
    rows = []
    for b in range(tok.shape[0]):
        vals = [tok[b, t] for t in range(tok.shape[1]) if mask[b, t]]
        if vals:
            rows.append(sum(vals) / len(vals) if agg == "seq_mean_token_mean" else sum(vals))
    return sum(rows) / len(rows) if rows else 0.0


def _np_surrogate(lp, ol, a, lo, hi):
    r = math.exp(lp - ol)
    return max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))


def _np_grpo(logp, old, ref, adv, mask, lo, hi, beta, est, agg):
    tok = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            v = _np_surrogate(logp[b, t], old[b, t], adv[b], lo, hi)
            if ref is not None:
                v += beta * _np_kl(logp[b, t], ref[b, t], est)
            tok[b, t] = v
    return _np_agg(tok, mask, agg)


# ------------------------------------------------------------------ GRPO
@pytest.mark.parametrize("agg", L.AGG_MODES)
@pytest.mark.parametrize("est", L.KL_ESTIMATORS)
def test_grpo_matches_numpy(agg, est):
    logp, old, ref, adv, mask = _inputs()
    kw = dict(clip_eps_low=0.1, clip_eps_high=0.3, kl_beta=0.05, kl_estimator=est, agg=agg)
    loss, aux = jax.jit(lambda *a: L.grpo_loss(*a, **kw))(logp, old, ref, adv, mask)
    want = _np_grpo(logp.astype(np.float64), old, ref, adv, mask, 0.1, 0.3, 0.05, est, agg)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    kl_tok = np.array([[_np_kl(logp[b, t], ref[b, t], est) for t in range(T)] for b in range(B)])
    np.testing.assert_allclose(float(aux["kl_ref"]), _np_agg(kl_tok, mask, "token_mean"),
                               rtol=1e-5, atol=1e-6)
    for k in ("clip_frac", "approx_kl", "kl_ref", "ratio_mean", "pg_loss"):
        assert np.isfinite(float(aux[k]))


def test_grpo_aux_and_no_ref():
    logp, old, _, adv, mask = _inputs(1)
    loss, aux = L.grpo_loss(logp, old, None, adv, mask)
    want = _np_grpo(logp.astype(np.float64), old, None, adv, mask, 0.2, 0.2, 0.0, "k3",
                    "token_mean")
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(aux["pg_loss"]), want, rtol=1e-5)
    assert float(aux["kl_ref"]) == 0.0
    ratio = np.exp(logp - old)
    np.testing.assert_allclose(float(aux["ratio_mean"]), _np_agg(ratio, mask, "token_mean"),
                               rtol=1e-5)
    ak = ratio - 1 - (logp - old)
    np.testing.assert_allclose(float(aux["approx_kl"]), _np_agg(ak, mask, "token_mean"),
                               rtol=1e-4, atol=1e-6)


def test_asymmetric_clipping():
    # one token each; old_logp = 0 so ratio = exp(logp)
    lo, hi = 0.1, 0.3
    ratios = np.array([1.5, 1.2, 0.5, 0.95, 1.5, 0.5], np.float32)
    advs = np.array([1.0, 1.0, -1.0, -1.0, -1.0, 1.0], np.float32)
    logp = np.log(ratios)[:, None]
    zeros, mask = np.zeros_like(logp), np.ones_like(logp)
    loss_fn = lambda lp: L.grpo_loss(lp, zeros, None, advs, mask, clip_eps_low=lo,
                                     clip_eps_high=hi, agg="seq_mean_token_sum")
    g = np.asarray(jax.grad(lambda lp: loss_fn(lp)[0])(jnp.asarray(logp)))[:, 0]
    # ratio 1.5 > 1+hi with A>0: clipped at 1.3 → no gradient
    # ratio 1.2 < 1+hi with A>0: NOT clipped (would be under symmetric eps 0.1)
    # ratio 0.5 < 1-lo with A<0: clipped → no gradient
    # ratio 0.95 inside [0.9, 1.3] with A<0: gradient
    # ratio 1.5 with A<0 and 0.5 with A>0: the pessimistic unclipped term → gradient
    assert g[0] == 0.0 and g[2] == 0.0
    for i in (1, 3, 4, 5):
        np.testing.assert_allclose(g[i], -advs[i] * ratios[i] / 6, rtol=1e-5)
    # per-token values: clipped ones are -A * (1+hi) and -A * (1-lo)
    loss, aux = loss_fn(jnp.asarray(logp))
    want = np.mean([-1.3, -1.2, 0.9, 0.95, 1.5, -0.5])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(aux["clip_frac"]), 2 / 6, rtol=1e-6)


def test_log_ratio_clipped_before_exp():
    logp = jnp.array([[0.0]]); old = jnp.array([[-1000.0]])
    loss, aux = L.grpo_loss(logp, old, jnp.array([[-1000.0]]), jnp.array([-1.0]),
                            jnp.ones((1, 1)), log_ratio_clip=20.0)
    assert np.isfinite(float(loss)) and np.isfinite(float(aux["approx_kl"]))
    np.testing.assert_allclose(float(aux["ratio_mean"]), math.exp(20.0), rtol=1e-5)


def test_grad_zero_for_equal_reward_group():
    rewards = jnp.array([0.1, 0.1, 0.1, 0.1, 1.0, 0.0, 1.0, 0.0])  # 2 groups of 4
    adv = A.group_advantages(rewards, 4)
    assert np.all(np.asarray(adv[:4]) == 0.0)
    rng = np.random.default_rng(3)
    logp = jnp.asarray(rng.normal(-1, 0.5, (8, 5)), jnp.float32)
    old = logp + jnp.asarray(rng.normal(0, 0.3, (8, 5)), jnp.float32)
    ref = logp + 0.2
    mask = jnp.ones((8, 5))
    for agg in L.AGG_MODES:
        g = jax.grad(lambda lp: L.grpo_loss(lp, old, ref, adv, mask, kl_beta=0.0, agg=agg)[0])(
            logp)
        assert np.all(np.asarray(g[:4]) == 0.0)
        assert np.any(np.asarray(g[4:]) != 0.0)


@pytest.mark.parametrize("agg", L.AGG_MODES)
def test_fully_masked_is_finite(agg):
    logp, old, ref, adv, _ = _inputs()
    mask = np.zeros((B, T), np.float32)
    loss, aux = L.grpo_loss(logp, old, ref, adv, mask, agg=agg)
    assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in aux.values())
    g = jax.grad(lambda lp: L.grpo_loss(lp, old, ref, adv, mask, agg=agg)[0])(jnp.asarray(logp))
    assert np.all(np.isfinite(np.asarray(g)))
    # one masked row among valid ones: finite and equal to dropping the row
    _, _, _, _, mask = _inputs()
    l_all, _ = L.grpo_loss(logp, old, ref, adv, mask, agg=agg)
    l_drop, _ = L.grpo_loss(logp[:3], old[:3], ref[:3], adv[:3], mask[:3], agg=agg)
    np.testing.assert_allclose(float(l_all), float(l_drop), rtol=1e-6)


# ------------------------------------------------------------------ PPO
def test_ppo_actor_matches_numpy_and_entropy():
    logp, old, _, _, mask = _inputs(2)
    rng = np.random.default_rng(5)
    adv = rng.normal(0, 1, (B, T)).astype(np.float32)
    ent = rng.random((B, T)).astype(np.float32)
    for agg in L.AGG_MODES:
        loss, aux = L.ppo_actor_loss(logp, old, adv, mask, entropy=ent, entropy_coef=0.01,
                                     clip_eps_low=0.2, clip_eps_high=0.28, agg=agg)
        tok = np.array([[_np_surrogate(logp[b, t], old[b, t], adv[b, t], 0.2, 0.28)
                         - 0.01 * ent[b, t] for t in range(T)] for b in range(B)])
        np.testing.assert_allclose(float(loss), _np_agg(tok, mask, agg), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(aux["entropy"]), _np_agg(ent, mask, "token_mean"),
                                   rtol=1e-5)
    with pytest.raises(ValueError):
        L.ppo_actor_loss(logp, old, adv[:, 0], mask)


def test_ppo_value_loss_clipping():
    v = np.array([[1.0, 0.5, 0.0, 2.0]], np.float32)
    vo = np.zeros_like(v)
    R_ = np.array([[0.0, 1.0, 3.0, 2.0]], np.float32)
    m = np.ones_like(v)
    loss, aux = L.ppo_value_loss(v, vo, R_, m, clip_eps=0.2)
    tok = []
    for i in range(4):
        vc = vo[0, i] + min(max(v[0, i] - vo[0, i], -0.2), 0.2)
        tok.append(0.5 * max((v[0, i] - R_[0, i]) ** 2, (vc - R_[0, i]) ** 2))
    # token 0: v moved away from R beyond clip → unclipped error (1.0) dominates;
    # tokens 1, 3: v moved toward R beyond clip → clipped error dominates (0.5*0.8^2, 0.5*1.8^2)
    np.testing.assert_allclose(tok, [0.5, 0.32, 4.5, 0.5 * 1.8 ** 2], rtol=1e-6)
    np.testing.assert_allclose(float(loss), np.mean(tok), rtol=1e-6)
    np.testing.assert_allclose(float(aux["vf_clip_frac"]), 0.5, rtol=1e-6)  # tokens 1 and 3
    g = jax.grad(lambda x: L.ppo_value_loss(x, vo, R_, m)[0])(jnp.asarray(v))
    assert float(g[0, 3]) == 0.0 and float(g[0, 0]) != 0.0


def test_entropy_and_token_logprobs():
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 2, (2, 3, 11)).astype(np.float32)
    toks = rng.integers(0, 11, (2, 3))
    lp = np.asarray(L.token_logprobs(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32),
                                     jnp.asarray(toks)))
    ref = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)))
    np.testing.assert_allclose(lp, np.take_along_axis(ref, toks[..., None], -1)[..., 0],
                               rtol=1e-5, atol=1e-5)
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    h = np.asarray(L.entropy_from_logits(logits, mask))
    p = np.exp(logits - logits.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    want = -(p * np.log(p)).sum(-1) * mask
    np.testing.assert_allclose(h, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ registry
def test_registry():
    from mr1.rl import train_step as TS

    assert TS.OBJECTIVES.get("grpo") is TS.grpo_objective
    assert {"grpo", "ppo"} <= set(TS.OBJECTIVES)
    with pytest.raises(KeyError, match="unknown objective 'nope'; available: .*grpo"):
        TS.OBJECTIVES.get("nope")
    with pytest.raises(ValueError, match="objective 'grpo' already registered"):
        TS.register_objective("grpo")(lambda: None)
    assert R.get_reward("em") is R.em_reward
    with pytest.raises(ValueError, match="reward 'em' already registered"):
        R.register_reward("em")(lambda *a: 0.0)
    assert not hasattr(L, "LOSSES")  # one registry of objectives, no dead one beside it
    with pytest.raises(ValueError):
        L.grpo_loss(*_inputs()[:4], _inputs()[4], agg="bad")
    with pytest.raises(ValueError):
        L.grpo_loss(*_inputs()[:4], _inputs()[4], kl_estimator="k9")
    with pytest.raises(KeyError, match="unknown reward"):
        R.get_reward("bleu9")


# ------------------------------------------------------------------ advantages
def test_group_advantages():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [0.3, 0.3, 0.3, 0.3], [2.0, 1.0, 0.0, 1.0]], np.float32)
    adv = np.asarray(A.group_advantages(r, 4))
    for g in range(3):
        m, s = r[g].mean(), r[g].std()
        want = np.zeros(4) if s == 0 else (r[g] - m) / (s + 1e-6)
        np.testing.assert_allclose(adv[g], want, rtol=1e-5, atol=1e-6)
    assert np.all(adv[1] == 0.0)
    flat = np.asarray(A.group_advantages(r.reshape(-1), 4))
    np.testing.assert_array_equal(flat, adv.reshape(-1))
    np.testing.assert_allclose(np.asarray(A.group_advantages(r, 4, normalize_std=False)),
                               r - r.mean(1, keepdims=True), atol=1e-6)
    with pytest.raises(ValueError):
        A.group_advantages(np.zeros(6), 4)


def _np_gae(r, v, d, gamma, lam):
    T_ = len(r)
    adv = np.zeros(T_)
    last = 0.0
    for t in reversed(range(T_)):
        nd = 1.0 - d[t]
        delta = r[t] + gamma * v[t + 1] * nd - v[t]
        last = delta + gamma * lam * nd * last
        adv[t] = last
    return adv, adv + v[:-1]


def test_gae_matches_numpy():
    rng = np.random.default_rng(11)
    Bn, Tn = 3, 7
    r = rng.normal(size=(Bn, Tn)).astype(np.float32)
    v = rng.normal(size=(Bn, Tn + 1)).astype(np.float32)
    d = (rng.random((Bn, Tn)) < 0.25).astype(np.float32)
    d[0, 2] = 1.0
    fn = jax.jit(lambda r, v, d: A.gae(r, v, d, gamma=0.95, lam=0.9))
    adv, ret = fn(r, v, d)
    for b in range(Bn):
        wa, wr = _np_gae(r[b], v[b], d[b], 0.95, 0.9)
        np.testing.assert_allclose(np.asarray(adv[b]), wa, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ret[b]), wr, rtol=1e-5, atol=1e-5)
    # unbatched [T] and values [T] + bootstrap give the same
    a1, r1 = A.gae(r[1], v[1, :-1], d[1], gamma=0.95, lam=0.9, bootstrap_value=v[1, -1])
    np.testing.assert_allclose(np.asarray(a1), np.asarray(adv[1]), rtol=1e-6, atol=1e-6)
    # mask zeroes outputs
    m = np.ones((Bn, Tn), np.float32); m[:, -2:] = 0
    am, rm = A.gae(r, v, d, gamma=0.95, lam=0.9, mask=m)
    assert np.all(np.asarray(am)[:, -2:] == 0) and np.all(np.asarray(rm)[:, -2:] == 0)
    # gamma = lam = 1, no dones, zero values: advantage = reward-to-go
    a2, _ = A.gae(r[0], np.zeros(Tn + 1, np.float32))
    np.testing.assert_allclose(np.asarray(a2), np.cumsum(r[0][::-1])[::-1], rtol=1e-5,
                               atol=1e-5)


# ------------------------------------------------------------------ rewards
def test_rewards():
    assert R.get_reward("em")("The Paris!", "paris") == 1.0
    assert R.get_reward("em")("Paris, France", "paris") == 0.0
    assert R.get_reward("f1")("Paris France", "paris") == pytest.approx(2 / 3)
    fmt = R.get_reward("format")
    assert fmt("", "", "- Alice likes tea\n**Answer:** green tea") == 1.0
    assert fmt("", "", "**Answer:**   \n") == 0.0
    assert fmt("", "", "no marker here") == 0.0
    assert fmt("", "", "**Answer:** one two three four five six seven") == 0.0
    assert fmt("**Answer:** 7 May 2023", "") == 1.0  # completion None → prediction checked
    c = "memories\n**Answer:** green tea"
    assert R.combined_reward({"em": 1.0, "format": 0.1}, "green tea", "Green tea", c) == \
        pytest.approx(1.1)
    assert R.combined_reward({"em": 1.0, "f1": 0.5}, "black tea", "green tea") == \
        pytest.approx(0.25)
    with pytest.raises(KeyError):
        R.combined_reward({"nope": 1.0}, "a", "b")


def test_brevity_reward():
    brev = R.get_reward("brevity")
    assert brev("Paris", "x") == 1.0
    assert brev("one two three four five six", "x") == 1.0
    assert brev("one two three four five six seven", "x") == 0.0
    assert brev("", "x") == 0.0 and brev("   ", "x") == 0.0
    assert brev(None, "x") == 0.0
    assert R.combined_reward({"f1": 1.0, "brevity": 0.1}, "green tea", "green tea") == \
        pytest.approx(1.1)
