"""Policy-gradient losses over per-token log-probabilities (GRPO, PPO actor / critic).

Losses never see a model: they take float32 log-prob arrays ``[B, T]`` (B sequences, T
response tokens) plus a ``[B, T]`` mask (1 = response token, 0 = prompt/padding) and return
``(loss, aux)`` where ``aux`` is a dict of scalar metrics. The train step picks the
objective that combines them by name (:data:`mr1.rl.train_step.OBJECTIVES`). Conventions follow tunix
``rl/algo_core.py``: math in float32, the log-ratio clipped *before* ``exp``, and an explicit
token aggregation mode:

* ``"token_mean"``: sum over all valid tokens / number of valid tokens in the batch.
* ``"seq_mean_token_mean"``: per sequence, mean over its valid tokens; then mean over the
  sequences that have at least one valid token.
* ``"seq_mean_token_sum"``: per sequence, sum over its valid tokens; then mean over the
  sequences that have at least one valid token.

Fully-masked rows are excluded from the sequence means (no ``0 / 0``) and a fully-masked batch
gives 0, never NaN.

KL estimators of ``KL(pi || pi_ref)`` from samples of ``pi`` (Schulman's k1/k2/k3), with
``x = log pi_ref - log pi`` per token: ``k1 = -x``; ``k2 = x**2 / 2``;
``k3 = exp(x) - x - 1`` (unbiased, non-negative; GRPO's choice). ``x`` is clipped to
``[-log_ratio_clip, log_ratio_clip]`` like the policy ratio.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["aggregate", "kl_penalty", "grpo_loss", "ppo_actor_loss", "ppo_value_loss", "entropy_from_logits", "token_logprobs",
           "AGG_MODES", "KL_ESTIMATORS"]

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
KL_ESTIMATORS = ("k1", "k2", "k3")

def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def aggregate(x: jax.Array, mask: jax.Array, agg: str = "token_mean") -> jax.Array:
    """Masked reduction of per-token values ``x [B, T]`` to a scalar (see module docstring)."""
    x, m = _f32(x), _f32(mask)
    xm = jnp.where(m > 0, x, 0.0) * m  # `where` keeps NaN/inf at masked slots out of the sum
    if agg == "token_mean":
        return xm.sum() / jnp.maximum(m.sum(), 1.0)
    n_tok = m.sum(axis=-1)
    row_ok = (n_tok > 0).astype(jnp.float32)
    n_rows = jnp.maximum(row_ok.sum(), 1.0)
    if agg == "seq_mean_token_mean":
        per_row = xm.sum(axis=-1) / jnp.maximum(n_tok, 1.0)
    elif agg == "seq_mean_token_sum":
        per_row = xm.sum(axis=-1)
    else:
        raise ValueError(f"unknown agg {agg!r}; expected one of {AGG_MODES}")
    return (per_row * row_ok).sum() / n_rows


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k3",
               log_ratio_clip: float = 20.0) -> jax.Array:
    """Per-token estimate ``[B, T]`` of ``KL(pi || pi_ref)`` (k1, k2 or k3; module docstring)."""
    x = jnp.clip(_f32(ref_logp) - _f32(logp), -log_ratio_clip, log_ratio_clip)
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x * x
    if estimator == "k3":
        return jnp.exp(x) - x - 1.0
    raise ValueError(f"unknown kl_estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def _clipped_surrogate(logp, old_logp, adv, mask, *, clip_eps_low, clip_eps_high,
                       log_ratio_clip):
    """Per-token PPO surrogate ``max(-A r, -A clip(r, 1-lo, 1+hi))`` and aux pieces."""
    log_ratio = jnp.clip(_f32(logp) - _f32(old_logp), -log_ratio_clip, log_ratio_clip)
    ratio = jnp.exp(log_ratio)
    adv = _f32(adv)
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    pg = jnp.maximum(pg1, pg2)
    clipped = (pg2 > pg1).astype(jnp.float32)
    approx_kl = (ratio - 1.0) - log_ratio  # k3 estimate of KL(pi_old || pi), samples of pi_old
    m = _f32(mask)
    aux = {"clip_frac": aggregate(clipped, m, "token_mean"),
           "approx_kl": aggregate(approx_kl, m, "token_mean"),
           "ratio_mean": aggregate(ratio, m, "token_mean")}
    return pg, aux


def grpo_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None,
              advantages: jax.Array, mask: jax.Array, *, clip_eps_low: float = 0.2,
              clip_eps_high: float = 0.2, kl_beta: float = 0.04, kl_estimator: str = "k3",
              agg: str = "token_mean", log_ratio_clip: float = 20.0
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO loss: clipped surrogate with sequence-level advantages + ``beta * KL(pi || ref)``.

    Args:
      logp: ``[B, T]`` log-probs of the sampled tokens under the current policy (differentiable).
      old_logp: ``[B, T]`` under the sampling (old) policy.
      ref_logp: ``[B, T]`` under the frozen reference, or None (no KL term).
      advantages: ``[B]`` one advantage per sequence (e.g. :func:`group_advantages`).
      mask: ``[B, T]`` 1 for response tokens.
      clip_eps_low / clip_eps_high: ratio clipped to ``[1 - low, 1 + high]`` (asymmetric
        "clip-higher" when they differ).
      kl_beta: KL coefficient (ignored when ``ref_logp`` is None).
      kl_estimator: "k1" | "k2" | "k3".
      agg: token aggregation mode (:data:`AGG_MODES`).
      log_ratio_clip: ``|log ratio|`` bound applied before ``exp``.

    Returns:
      ``(loss, aux)``; aux: ``pg_loss``, ``clip_frac``, ``approx_kl`` (to the old policy),
      ``ratio_mean``, ``kl_ref`` (token-mean KL to the reference, 0 when ``ref_logp`` is None).
      The aux metrics are token means over valid tokens, whatever ``agg``.
    """
    adv = _f32(advantages)
    if adv.ndim != 1:
        raise ValueError(f"grpo advantages must be [B], got {adv.shape}")
    pg, aux = _clipped_surrogate(logp, old_logp, adv[:, None], mask, clip_eps_low=clip_eps_low,
                                 clip_eps_high=clip_eps_high, log_ratio_clip=log_ratio_clip)
    per_token = pg
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, kl_estimator, log_ratio_clip)
        per_token = pg + kl_beta * kl
        aux["kl_ref"] = aggregate(kl, mask, "token_mean")
    else:
        aux["kl_ref"] = jnp.zeros((), jnp.float32)
    aux["pg_loss"] = aggregate(pg, mask, agg)
    return aggregate(per_token, mask, agg), aux


def ppo_actor_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array,
                   mask: jax.Array, *, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2,
                   entropy: jax.Array | None = None, entropy_coef: float = 0.0,
                   ref_logp: jax.Array | None = None, kl_beta: float = 0.0,
                   kl_estimator: str = "k3", agg: str = "token_mean",
                   log_ratio_clip: float = 20.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO actor loss: clipped surrogate with per-token advantages ``[B, T]`` (e.g. GAE).

    ``loss = agg(pg + kl_beta * kl - entropy_coef * entropy)``; the KL term (off by default)
    needs ``ref_logp``; the entropy bonus needs token entropies ``entropy [B, T]`` (see
    :func:`entropy_from_logits`). Other args as :func:`grpo_loss`.

    Returns ``(loss, aux)``; aux: ``pg_loss``, ``clip_frac``, ``approx_kl``, ``ratio_mean``,
    ``kl_ref``, ``entropy`` (token means; 0 when not given).
    """
    adv = _f32(advantages)
    if adv.shape != jnp.shape(logp):
        raise ValueError(f"ppo advantages must be [B, T] like logp, got {adv.shape}")
    pg, aux = _clipped_surrogate(logp, old_logp, adv, mask, clip_eps_low=clip_eps_low,
                                 clip_eps_high=clip_eps_high, log_ratio_clip=log_ratio_clip)
    per_token = pg
    aux["kl_ref"] = jnp.zeros((), jnp.float32)
    aux["entropy"] = jnp.zeros((), jnp.float32)
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, kl_estimator, log_ratio_clip)
        per_token = per_token + kl_beta * kl
        aux["kl_ref"] = aggregate(kl, mask, "token_mean")
    if entropy is not None:
        per_token = per_token - entropy_coef * _f32(entropy)
        aux["entropy"] = aggregate(entropy, mask, "token_mean")
    aux["pg_loss"] = aggregate(pg, mask, agg)
    return aggregate(per_token, mask, agg), aux


def ppo_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array,
                   mask: jax.Array, clip_eps: float = 0.2, *, agg: str = "token_mean"
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, ±eps) - R)^2)``.

    Args: ``values``, ``old_values``, ``returns``, ``mask`` all ``[B, T]``; ``clip_eps`` bounds
    the value change from the rollout's values.

    Returns ``(loss, aux)``; aux: ``vf_clip_frac`` (share of tokens where the clipped error is
    the larger), ``value_mean``, ``return_mean``.
    """
    v, vo, R = _f32(values), _f32(old_values), _f32(returns)
    v_clip = vo + jnp.clip(v - vo, -clip_eps, clip_eps)
    e1, e2 = (v - R) ** 2, (v_clip - R) ** 2
    per_token = 0.5 * jnp.maximum(e1, e2)
    aux = {"vf_clip_frac": aggregate((e2 > e1).astype(jnp.float32), mask, "token_mean"),
           "value_mean": aggregate(v, mask, "token_mean"),
           "return_mean": aggregate(R, mask, "token_mean")}
    return aggregate(per_token, mask, agg), aux


def entropy_from_logits(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Token entropies ``[B, T]`` of ``softmax(logits [B, T, V])`` (float32), 0 where masked.

    ``H = logsumexp(z) - sum(softmax(z) * z)``.
    """
    z = _f32(logits)
    lse = jax.nn.logsumexp(z, axis=-1)
    h = lse - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)
    if mask is not None:
        h = jnp.where(_f32(mask) > 0, h, 0.0)
    return h


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``log softmax(logits [B, T, V])`` gathered at ``tokens [B, T]`` → ``[B, T]`` float32.

    Computed as ``logits[tokens] - logsumexp(logits)``, so no second ``[B, T, V]`` array of
    log-probs is built (besides a float32 cast of low-precision logits).
    """
    z = _f32(logits)
    picked = jnp.take_along_axis(z, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(z, axis=-1)
