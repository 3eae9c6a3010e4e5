"""Decode attention: the query rows of one new token against a KV segment, with a key mask.

Shapes (``B`` rows, ``K`` kv heads, ``Q`` query rows per kv head — the ``G = H / K`` heads of a
GQA group, or ``n * G`` when ``n`` samples share a prompt prefix — ``S`` keys, ``hd`` head dim)::

  q      [B, K, Q, hd]      k, v  [B, K, S, hd]      valid [B, S] (bool: key s is visible)
  ->  out [B, K, Q, hd] float32 (softmax over the segment's valid keys), lse [B, K, Q] float32

``lse`` is the log-sum-exp of the scaled scores over the valid keys (``-inf`` when none is), so
:func:`merge_segments` combines segments exactly as one softmax over their union would.

Two implementations, chosen by ``ModelConfig.attention_impl`` through :data:`DECODE_ATTENTION`:

* ``"xla"``: two einsums and a masked softmax (what XLA fuses on any backend);
* ``"pallas"``: one fused kernel per (row, kv head) that streams the segment in blocks of
  ``block_k`` keys with an online softmax (flash-decoding without the split over keys), reads
  only the blocks between the row's first and last valid key, and never writes the
  ``[B, K, Q, S]`` scores to memory. It is written for the Triton (GPU) lowering of Pallas:
  ``Q`` is padded to a power of two of at least 16, and ``S`` to a multiple of ``block_k`` only
  when no power-of-two block of 16 or more divides it (both masked). On other backends it runs in Pallas interpret mode (the tests' reference check on
  CPU; slow, not for production).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Array = jax.Array
_NEG = -1e30  # finite "minus infinity" of the online softmax (exp(_NEG - m) == 0)

DECODE_ATTENTION: dict[str, Callable[..., tuple[Array, Array]]] = {}


def register_decode_attention(name: str):
    """Decorator: registers a decode-attention function ``(q, k, v, valid) -> (out, lse)``."""

    def wrap(fn):
        DECODE_ATTENTION[name] = fn
        return fn

    return wrap


def _finish(o, m, l):
    """Normalised output and log-sum-exp from the running (unnormalised out, max, sum)."""
    has = l > 0
    out = o / jnp.where(has, l, 1.0)[..., None]
    lse = jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)
    return out, lse


@register_decode_attention("xla")
def decode_attention_xla(q: Array, k: Array, v: Array, valid: Array) -> tuple[Array, Array]:
    """The reference: einsum scores, masked softmax statistics, einsum against the values."""
    scale = q.shape[-1] ** -0.5
    sc = jnp.einsum("bkqd,bksd->bkqs", q, k.astype(q.dtype),
                    preferred_element_type=jnp.float32) * scale
    ok = valid.astype(bool)[:, None, None, :]
    m = jnp.max(jnp.where(ok, sc, _NEG), axis=-1)
    p = jnp.where(ok, jnp.exp(sc - m[..., None]), 0.0)
    o = jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
    return _finish(o, m, jnp.sum(p, axis=-1))


def _pow2_at_least(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


def _key_block(s: int, largest: int) -> int:
    """The largest power-of-two key block in ``[16, largest]`` that divides ``s`` (so the
    cache is read in place), else ``min(largest, pow2 >= s)`` (and the keys are padded: a copy
    of the segment each call; prompt buckets and usual ``max_new_tokens`` avoid it)."""
    b = largest
    while b >= 16:
        if s % b == 0:
            return b
        b //= 2
    return min(largest, _pow2_at_least(s, 16))


def _kernel(q_ref, k_ref, v_ref, valid_ref, bounds_ref, o_ref, m_ref, l_ref, *, block_k: int):
    """One (row, kv head): online softmax over the key blocks that hold valid keys."""
    from jax.experimental.pallas import triton as plgpu

    q = q_ref[...]  # [Qp, hd]
    scale = q.shape[-1] ** -0.5

    def body(i, carry):
        o, m, l = carry
        keys = pl.ds(i * block_k, block_k)
        k = k_ref[keys, :]
        ok = valid_ref[keys] != 0  # [block_k]
        s = plgpu.dot(q, k.T).astype(jnp.float32) * scale  # [Qp, block_k]
        s = jnp.where(ok[None, :], s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(ok[None, :], jnp.exp(s - m_new[:, None]), 0.0)
        corr = jnp.exp(m - m_new)
        v = v_ref[keys, :]
        o = corr[:, None] * o + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
        return o, m_new, corr * l + jnp.sum(p, axis=-1)

    qp, hd = q.shape
    init = (jnp.zeros((qp, hd), jnp.float32), jnp.full((qp,), _NEG, jnp.float32),
            jnp.zeros((qp,), jnp.float32))
    first, last = bounds_ref[0], bounds_ref[1]  # key blocks [first, last) hold the valid keys
    o, m, l = jax.lax.fori_loop(first, last, body, init)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


@register_decode_attention("pallas")
def decode_attention_pallas(q: Array, k: Array, v: Array, valid: Array, *, block_k: int = 128,
                            interpret: bool | None = None, num_warps: int = 4,
                            num_stages: int = 2) -> tuple[Array, Array]:
    """The fused Pallas kernel (see the module docstring). ``interpret``: None = on every
    backend but GPUs."""
    b, nk, nq, hd = q.shape
    s = k.shape[2]
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    block_k = _key_block(s, block_k)
    sp = -(-s // block_k) * block_k  # == s unless no power-of-two block >= 16 divides s
    qp = _pow2_at_least(nq, 16)
    valid = valid.astype(bool)
    if sp != s:
        pad = ((0, 0), (0, 0), (0, sp - s), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
        valid = jnp.pad(valid, ((0, 0), (0, sp - s)))
    if qp != nq:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, qp - nq), (0, 0)))
    # each row's key blocks that hold a valid key: [first, last) (empty when none is valid)
    idx = jnp.arange(sp)
    first = jnp.min(jnp.where(valid, idx, sp), axis=-1) // block_k
    last = -(-(jnp.max(jnp.where(valid, idx, -1), axis=-1) + 1) // block_k)
    bounds = jnp.stack([first, jnp.maximum(first, last)], axis=-1).astype(jnp.int32)

    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    row_head = lambda i, j: (i, j, 0, 0)  # noqa: E731
    o, m, l = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k),
        grid=(b, nk),
        in_specs=[pl.BlockSpec((None, None, qp, hd), row_head),
                  pl.BlockSpec((None, None, sp, hd), row_head),
                  pl.BlockSpec((None, None, sp, hd), row_head),
                  pl.BlockSpec((None, sp), lambda i, j: (i, 0)),
                  pl.BlockSpec((None, 2), lambda i, j: (i, 0))],
        out_specs=[pl.BlockSpec((None, None, qp, hd), row_head),
                   pl.BlockSpec((None, None, qp), lambda i, j: (i, j, 0)),
                   pl.BlockSpec((None, None, qp), lambda i, j: (i, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, nk, qp, hd), jnp.float32),
                   jax.ShapeDtypeStruct((b, nk, qp), jnp.float32),
                   jax.ShapeDtypeStruct((b, nk, qp), jnp.float32)],
        interpret=interpret,
        compiler_params=compiler_params,
        name="mr1_decode_attention",
    )(q, k, v, valid.astype(jnp.int32), bounds)
    return _finish(o[:, :, :nq], m[:, :, :nq], l[:, :, :nq])


def merge_segments(parts: list[tuple[Array, Array]]) -> Array:
    """One softmax over the union of segments: ``sum_i w_i out_i`` with ``w_i`` proportional
    to ``exp(lse_i)`` (float32 ``[B, K, Q, hd]``). Segments with no valid key weigh nothing."""
    lses = jnp.stack([lse for _, lse in parts])  # [n, B, K, Q]
    top = jnp.max(lses, axis=0)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp(lses - top)  # exp(-inf) = 0
    total = jnp.sum(w, axis=0)
    out = sum(wi[..., None] * o for wi, (o, _) in zip(w, parts))
    return out / jnp.where(total > 0, total, 1.0)[..., None]
