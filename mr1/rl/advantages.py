"""Advantage estimators: GRPO group normalisation, RLOO and GAE (reverse ``lax.scan``),
registered by name in :data:`ESTIMATORS` (``config.loss.advantage_estimator``).

All are pure ``jnp`` functions (jittable; static args marked below) computing in float32; the
train step (:mod:`mr1.rl.runner`) runs the chosen one inside its jitted update, so the host
sends rewards and never sees advantages.

Registered estimators (:class:`Estimator`: the function, whether its advantages are per token,
whether it needs the critic's values):

* ``"grpo"``: ``(r - mean_g) / (std_g + eps)`` per group of ``G`` samples of one prompt;
* ``"drgrpo"``: ``r - mean_g`` (Dr. GRPO: no std division, so easy / hard groups are not
  re-weighted);
* ``"rloo"``: ``r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_g)`` (REINFORCE
  leave-one-out; an unbiased baseline);
* ``"gae"`` (PPO): the sequence reward at the last completion token, GAE over the tokens
  against the value head's values, optionally whitened over the batch's valid tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from mr1.registry import Registry

__all__ = ["group_advantages", "rloo_advantages", "gae", "token_gae", "AdvantageConfig",
           "Estimator", "ESTIMATORS", "register_estimator"]


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    """Static knobs of the estimators (hashable: part of the jitted update's closure)."""

    group_size: int = 1
    eps: float = 1e-6
    gamma: float = 1.0          # GAE discount over tokens
    lam: float = 0.95           # GAE lambda
    whiten: bool = True         # GAE: normalise token advantages over the batch


@dataclasses.dataclass(frozen=True)
class Estimator:
    """``fn(rewards [B], mask [B, T], values [B, T] | None, cfg) -> (advantages, returns)``:
    advantages ``[B]`` (``per_token`` False) or ``[B, T]``; returns ``[B, T]`` value targets or
    None. ``needs_values``: the update computes the value head's values first."""

    fn: Callable
    per_token: bool = False
    needs_values: bool = False


ESTIMATORS = Registry("advantage estimator")


def register_estimator(name: str, *, per_token: bool = False, needs_values: bool = False):
    """Decorator registering an estimator function under ``name`` (see :class:`Estimator`)."""
    def deco(fn):
        ESTIMATORS.register(name, Estimator(fn, per_token, needs_values))
        return fn
    return deco


def group_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-6,
                     normalize_std: bool = True) -> jax.Array:
    """GRPO advantages ``(r - mean_g) / (std_g + eps)`` over groups of ``group_size`` samples.

    Args:
      rewards: ``[N * G]`` (group-contiguous: samples ``g*G .. g*G+G-1`` share a prompt) or
        ``[N, G]``.
      group_size: ``G`` (static).
      eps: added to the std.
      normalize_std: False gives ``r - mean_g`` only (Dr. GRPO style).

    Returns:
      float32 advantages with the shape of ``rewards``.

    The std is the *population* std (``ddof=0``), as in most GRPO implementations (TRL uses
    ``ddof=1``; the difference is a per-group factor ``sqrt((G-1)/G)``). A group whose rewards
    are all equal gets exactly 0 (forced with ``where``, since ``mean`` of equal floats need not
    round back to the value), so it contributes no policy gradient.
    """
    r = jnp.asarray(rewards, jnp.float32)
    shape = r.shape
    if r.ndim == 1:
        if shape[0] % group_size:
            raise ValueError(f"rewards length {shape[0]} not divisible by group_size {group_size}")
        r = r.reshape(-1, group_size)
    elif r.ndim != 2 or r.shape[1] != group_size:
        raise ValueError(f"rewards must be [N*G] or [N, G={group_size}], got {shape}")
    mean = r.mean(axis=1, keepdims=True)
    adv = r - mean
    if normalize_std:
        adv = adv / (r.std(axis=1, keepdims=True) + eps)
    same = (r.max(axis=1, keepdims=True) == r.min(axis=1, keepdims=True))
    adv = jnp.where(same, 0.0, adv)
    return adv.reshape(shape)


def gae(rewards: jax.Array, values: jax.Array, dones: jax.Array | None = None, *,
        gamma: float = 1.0, lam: float = 1.0, bootstrap_value: jax.Array | None = None,
        mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation with a reverse ``jax.lax.scan`` (purejaxrl style).

    Time is the LAST axis; any leading batch axes (``[T]``, ``[B, T]``, ...) are handled by
    scanning time-major over the whole batch at once.

    Args:
      rewards: ``[..., T]`` reward after step ``t``.
      values: ``[..., T + 1]`` (last entry = bootstrap value of the state after step ``T-1``)
        or ``[..., T]`` with ``bootstrap_value`` (``[...]``; default 0, i.e. terminal).
      dones: ``[..., T]``, 1 where the episode ends after step ``t`` (next value not
        bootstrapped, the GAE recursion reset). Default: none.
      gamma, lam: discount and GAE lambda.
      mask: optional ``[..., T]`` validity mask; advantages and returns are zeroed where 0.
        For right-padded token sequences also mark the last valid token as done (or give
        padding zero reward/value) so padding does not leak into valid steps.

    Returns:
      ``(advantages, returns)`` both ``[..., T]`` float32, ``returns = advantages + values``
      (the value targets).

    Recursion: ``delta_t = r_t + gamma * V_{t+1} * (1 - d_t) - V_t``;
    ``A_t = delta_t + gamma * lam * (1 - d_t) * A_{t+1}``.
    """
    r = jnp.asarray(rewards, jnp.float32)
    v = jnp.asarray(values, jnp.float32)
    T = r.shape[-1]
    if v.shape[-1] == T + 1:
        v_t, v_next = v[..., :-1], v[..., 1:]
    elif v.shape[-1] == T:
        boot = (jnp.zeros(r.shape[:-1], jnp.float32) if bootstrap_value is None
                else jnp.broadcast_to(jnp.asarray(bootstrap_value, jnp.float32), r.shape[:-1]))
        v_t = v
        v_next = jnp.concatenate([v[..., 1:], boot[..., None]], axis=-1)
    else:
        raise ValueError(f"values last axis must be T or T+1 (T={T}), got {v.shape}")
    d = (jnp.zeros_like(r) if dones is None else jnp.asarray(dones, jnp.float32))
    notdone = 1.0 - d

    # time-major: [T, ...]
    def tm(x):
        return jnp.moveaxis(x, -1, 0)

    deltas = r + gamma * v_next * notdone - v_t

    def step(carry, xs):
        delta, nd = xs
        a = delta + gamma * lam * nd * carry
        return a, a

    init = jnp.zeros(r.shape[:-1], jnp.float32)
    _, adv = jax.lax.scan(step, init, (tm(deltas), tm(notdone)), reverse=True)
    adv = jnp.moveaxis(adv, 0, -1)
    ret = adv + v_t
    if mask is not None:
        m = jnp.asarray(mask, jnp.float32)
        adv, ret = adv * m, ret * m
    return adv, ret


def rloo_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """REINFORCE leave-one-out: ``r_i - mean_{j != i} r_j`` within each group of
    ``group_size`` (``[N * G]`` group-contiguous or ``[N, G]``); 0 for a group of equal
    rewards (forced, as :func:`group_advantages`)."""
    if group_size < 2:
        raise ValueError("rloo needs group_size >= 2")
    centred = group_advantages(rewards, group_size, normalize_std=False)
    return centred * (group_size / (group_size - 1.0))


def token_gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float = 1.0,
              lam: float = 0.95, whiten: bool = True, eps: float = 1e-6
              ) -> tuple[jax.Array, jax.Array]:
    """PPO's per-token advantages of completions with one sequence reward each.

    ``rewards [B]`` is placed at each row's last valid token (which is also its episode end),
    ``values [B, T]`` are the critic's (zeroed past the mask), then :func:`gae`. ``whiten``
    normalises the advantages over all valid tokens of the batch (mean 0, std 1). Returns
    ``(advantages [B, T], returns [B, T])``, both zero past the mask.
    """
    cm = jnp.asarray(mask, jnp.float32)
    r = jnp.asarray(rewards, jnp.float32)
    last = jnp.maximum(cm.sum(-1).astype(jnp.int32) - 1, 0)
    at_last = jax.nn.one_hot(last, cm.shape[-1], dtype=jnp.float32)
    adv, ret = gae(r[:, None] * at_last, jnp.asarray(values, jnp.float32) * cm, at_last,
                   gamma=gamma, lam=lam, mask=cm)
    if whiten:
        n = jnp.maximum(cm.sum(), 1.0)
        mu = (adv * cm).sum() / n
        sd = jnp.sqrt((((adv - mu) * cm) ** 2).sum() / n)
        adv = (adv - mu) / (sd + eps) * cm
    return adv, ret


@register_estimator("grpo")
def _grpo(rewards, mask, values, cfg: AdvantageConfig):
    return group_advantages(rewards, cfg.group_size, cfg.eps, normalize_std=True), None


@register_estimator("drgrpo")
def _drgrpo(rewards, mask, values, cfg: AdvantageConfig):
    return group_advantages(rewards, cfg.group_size, cfg.eps, normalize_std=False), None


@register_estimator("rloo")
def _rloo(rewards, mask, values, cfg: AdvantageConfig):
    return rloo_advantages(rewards, cfg.group_size), None


@register_estimator("gae", per_token=True, needs_values=True)
def _gae(rewards, mask, values, cfg: AdvantageConfig):
    return token_gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam, whiten=cfg.whiten,
                     eps=cfg.eps)
