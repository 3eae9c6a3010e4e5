"""Advantage estimators: GRPO group normalisation and GAE (reverse ``lax.scan``).

Both are pure ``jnp`` functions (jittable; static args marked below) computing in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["group_advantages", "gae"]


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
