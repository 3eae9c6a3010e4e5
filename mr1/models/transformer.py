"""The Flax decoder: RMSNorm, RoPE (with Llama-3 scaling), GQA with a KV cache, SwiGLU.

The module is pure: parameters are a pytree passed in, the KV cache is an explicit input and
output, and the functional wrappers :func:`forward` / :func:`logits_from_hidden` are what jitted
code calls. Layers are stacked with ``nn.scan`` so parameters carry a leading layer axis
(``params["layers"]["wq"]: [L, D, H*hd]``), which keeps compile time flat in depth and makes
sharding rules one line per weight.

Parameter tree (``D`` hidden, ``F`` SwiGLU width, ``H``/``K`` query/kv heads, ``hd`` head dim)::

  embed        [V, D]
  layers/attn_norm [L, D]      layers/wq [L, D, H*hd]   layers/bq [L, H*hd]  (qkv_bias)
  layers/wk    [L, D, K*hd]    layers/wv [L, D, K*hd]   layers/bk, bv [L, K*hd]
  layers/wo    [L, H*hd, D]    layers/mlp_norm [L, D]
  layers/w_gate, w_up [L, D, F]   layers/w_down [L, F, D]
  final_norm   [D]
  lm_head      [D, V]          (absent when embeddings are tied)
"""

from __future__ import annotations

import contextlib
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mr1.models import kernels
from mr1.models.config import ModelConfig
from mr1.parallel import constrain_activation

Array = jax.Array
_NEG_INF = -1e30  # finite: fully-masked rows (left padding) give uniform, not NaN, attention


@flax.struct.dataclass
class KVCache:
    """Per-layer keys and values, head-major ``[L, B, K, S, hd]``, RoPE applied to keys.

    Head-major keeps each (sequence, kv-head) slab contiguous, which is what the attention
    matmuls read; on CPU it made the decode attention ~7x faster than ``[L, B, S, K, hd]``.
    """

    k: Array
    v: Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> "KVCache":
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def length(self) -> int:
        return self.k.shape[3]

    def write(self, new_kv: tuple[Array, Array], index) -> "KVCache":
        """Writes ``new_kv`` (``[L, B, K, T, hd]`` each, from :func:`forward`) at slot ``index``."""
        k, v = new_kv
        start = (0, 0, 0, index, 0)
        return KVCache(k=jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), start),
                       v=jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), start))


def rope_inv_freq(cfg: ModelConfig) -> Array:
    """Inverse RoPE frequencies ``[hd/2]``, with Llama-3 scaling when configured."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig, positions: Array) -> tuple[Array, Array]:
    """cos/sin tables ``[B, T, hd/2]`` (float32) for integer ``positions [B, T]``."""
    angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates ``x [B, T, N, hd]`` with the half-split (HF ``rotate_half``) convention."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed.astype(x.dtype) * scale.astype(x.dtype))


def _dense_init(std: float = 0.02):
    return nn.initializers.normal(std)


class Block(nn.Module):
    """One pre-norm decoder block; called through ``nn.scan`` over layers.

    Attention covers up to three key segments under one softmax: a prefix shared by groups of
    rows (the prompt of G samples, ``prefix_mask [P, S_p]``), this layer's slice of the
    (read-only) KV cache (``cache_mask [B, T, S]``), and the block's own new keys
    (``mask [B, T, T]``). The new keys/values are returned as scan outputs and written into the
    cache once, after all layers, by :meth:`KVCache.write`: updating the stacked cache inside the
    layer scan made XLA copy all of it per layer (4x slower decode on CPU).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h, layer_kv, cos, sin, mask, cache_mask, prefix_mask):
        cfg = self.cfg
        b, t, d = h.shape
        nh, nk, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        g = nh // nk
        p = lambda name, shape, init=_dense_init(): self.param(name, init, shape)  # noqa: E731

        x = RMSNorm(cfg.rms_norm_eps, name="attn_norm")(h)
        q = x @ p("wq", (d, nh * hd)).astype(x.dtype)
        k = x @ p("wk", (d, nk * hd)).astype(x.dtype)
        v = x @ p("wv", (d, nk * hd)).astype(x.dtype)
        if cfg.qkv_bias:
            q = q + p("bq", (nh * hd,), nn.initializers.zeros).astype(x.dtype)
            k = k + p("bk", (nk * hd,), nn.initializers.zeros).astype(x.dtype)
            v = v + p("bv", (nk * hd,), nn.initializers.zeros).astype(x.dtype)
        # head-major: q [B, K, G*T, hd] (a group's query rows share one matmul), k/v [B, K, T, hd]
        q = apply_rope(q.reshape(b, t, nh, hd), cos, sin)
        k = apply_rope(k.reshape(b, t, nk, hd), cos, sin).transpose(0, 2, 1, 3)
        v = v.reshape(b, t, nk, hd).transpose(0, 2, 1, 3)
        prefix_kv, cache_kv = layer_kv

        def attend(q_rows, mask_rows, cache_mask_rows):
            """Attention of ``tq`` query positions ``[B, tq, H, hd]`` over every key segment."""
            tq = q_rows.shape[1]
            qh = q_rows.reshape(b, tq, nk, g, hd).transpose(0, 2, 3, 1, 4).reshape(
                b, nk, g * tq, hd)

            def scores(keys, key_mask):
                sc = jnp.einsum("bkqd,bksd->bkqs", qh, keys.astype(qh.dtype),
                                preferred_element_type=jnp.float32) * (hd ** -0.5)
                sc = sc.reshape(b, nk, g, tq, -1)
                return jnp.where(key_mask[:, None, None, :, :], sc, _NEG_INF)

            # Key segments: [shared prefix], [cache], this call's keys; one softmax over all.
            segments = []  # (scores [B, K, G, tq, S_i], values-apply function)
            if prefix_kv is not None:
                segments.append(_prefix_segment(qh, prefix_kv, prefix_mask, b, nk, g, tq, hd))
            if cache_kv is not None:
                ck, cv = cache_kv
                segments.append((scores(ck, cache_mask_rows), _values(cv, b, nk, g, tq)))
            segments.append((scores(k, mask_rows), _values(v, b, nk, g, tq)))
            widths = [sc.shape[-1] for sc, _ in segments]
            probs = jax.nn.softmax(jnp.concatenate([sc for sc, _ in segments], axis=-1), axis=-1)
            out, start = 0.0, 0
            for (_, apply_values), width in zip(segments, widths):
                out = out + apply_values(probs[..., start:start + width].astype(v.dtype))
                start += width
            return out.reshape(b, nk, g, tq, hd).transpose(0, 3, 1, 2, 4).reshape(
                b, tq, nh * hd)

        c = cfg.attention_chunk
        if t == 1 and cfg.attention_impl != "xla":  # a decode step through a registered kernel
            attn = _decode_attention(cfg.attention_impl, q, k, v, mask, cache_kv, cache_mask,
                                     prefix_kv, prefix_mask)
        elif c and t > c and t % c == 0:
            # memory-efficient attention: query blocks of c positions one at a time, each
            # recomputed in the backward pass, so scores are [B, H, c, S] instead of [B, H, T, S]
            n = t // c
            blocks = lambda x: None if x is None else jnp.moveaxis(  # noqa: E731
                x.reshape(b, n, c, *x.shape[2:]), 1, 0)
            out = jax.lax.map(jax.checkpoint(lambda a: attend(*a)),
                              (blocks(q), blocks(mask), blocks(cache_mask)))
            attn = jnp.moveaxis(out, 0, 1).reshape(b, t, nh * hd)
        else:
            attn = attend(q, mask, cache_mask)
        h = h + (attn.astype(h.dtype) @ p("wo", (nh * hd, d)).astype(h.dtype))

        h = constrain_activation(h, "hidden")
        x = RMSNorm(cfg.rms_norm_eps, name="mlp_norm")(h)
        gate = x @ p("w_gate", (d, cfg.intermediate_size)).astype(x.dtype)
        up = x @ p("w_up", (d, cfg.intermediate_size)).astype(x.dtype)
        act = constrain_activation(jax.nn.silu(gate) * up, "mlp")
        h = h + act @ p("w_down", (cfg.intermediate_size, d)).astype(x.dtype)
        return constrain_activation(h, "hidden"), (k, v)


def _decode_attention(impl, q, k, v, mask, cache_kv, cache_mask, prefix_kv, prefix_mask):
    """One query position per row (``q [B, 1, H, hd]``) over the key segments, each through
    ``DECODE_ATTENTION[impl]`` (the token's own key through the XLA path), merged into one
    softmax. Returns ``[B, 1, H * hd]`` in ``v``'s dtype."""
    b, _, nh, hd = q.shape
    nk = k.shape[1]
    g = nh // nk
    attend = kernels.DECODE_ATTENTION[impl]
    qh = q.reshape(b, nk, g, hd)  # head h = kv head * G + group member (as in Block)
    parts = []
    if prefix_kv is not None:  # the n = B / P samples of a prompt are extra query rows
        pk, pv = prefix_kv
        p_rows = pk.shape[0]
        n = b // p_rows
        qp = qh.reshape(p_rows, n, nk, g, hd).transpose(0, 2, 1, 3, 4).reshape(
            p_rows, nk, n * g, hd)
        o, lse = attend(qp, pk, pv, prefix_mask)
        o = o.reshape(p_rows, nk, n, g, hd).transpose(0, 2, 1, 3, 4).reshape(b, nk, g, hd)
        lse = lse.reshape(p_rows, nk, n, g).transpose(0, 2, 1, 3).reshape(b, nk, g)
        parts.append((o, lse))
    if cache_kv is not None:
        parts.append(attend(qh, cache_kv[0], cache_kv[1], cache_mask[:, 0, :]))
    parts.append(kernels.decode_attention_xla(qh, k, v, mask[:, 0, :]))
    return kernels.merge_segments(parts).astype(v.dtype).reshape(b, 1, nh * hd)


def _values(v, b, nk, g, t):
    """``probs [B, K, G, T, S] -> [B, K, G*T, hd]`` against per-row values ``v [B, K, S, hd]``."""
    return lambda p: jnp.einsum("bkqs,bksd->bkqd", p.reshape(b, nk, g * t, -1), v.astype(p.dtype))


def _prefix_segment(q, prefix_kv, prefix_mask, b, nk, g, t, hd):
    """Scores and value-apply for a key prefix shared by groups of consecutive rows.

    ``prefix_kv`` holds ``[P, K, S, hd]`` keys/values for ``P`` prompts; query rows
    ``r * n .. (r + 1) * n - 1`` (``n = B / P``, the samples of prompt ``r``) all attend prefix
    ``r``. The group's queries become extra rows of one matmul, so the prefix is read once per
    group instead of once per sample.
    """
    pk, pv = prefix_kv
    p_rows = pk.shape[0]
    n = b // p_rows
    s = pk.shape[2]
    qp = q.reshape(p_rows, n, nk, g * t, hd).transpose(0, 2, 1, 3, 4)
    qp = qp.reshape(p_rows, nk, n * g * t, hd)
    sc = jnp.einsum("pkqd,pksd->pkqs", qp, pk.astype(q.dtype),
                    preferred_element_type=jnp.float32) * (hd ** -0.5)
    sc = sc.reshape(p_rows, nk, n, g, t, s).transpose(0, 2, 1, 3, 4, 5).reshape(b, nk, g, t, s)
    valid = jnp.repeat(prefix_mask.astype(bool), n, axis=0)  # [B, S]
    sc = jnp.where(valid[:, None, None, None, :], sc, _NEG_INF)

    def apply_values(p):  # p [B, K, G, T, S]
        pp = p.reshape(p_rows, n, nk, g * t, s).transpose(0, 2, 1, 3, 4)
        out = jnp.einsum("pkqs,pksd->pkqd", pp.reshape(p_rows, nk, n * g * t, s),
                         pv.astype(p.dtype))
        out = out.reshape(p_rows, nk, n, g * t, hd).transpose(0, 2, 1, 3, 4)
        return out.reshape(b, nk, g * t, hd)

    return sc, apply_values


class Decoder(nn.Module):
    """Token ids to final hidden states (after the last RMSNorm); the LM head is separate."""

    cfg: ModelConfig
    remat: bool = False  # recompute each block's activations in the backward pass

    @nn.compact
    def __call__(self, tokens, positions, mask, cache=None, cache_mask=None, prefix=None,
                 prefix_mask=None):
        cfg = self.cfg
        embed = self.param("embed", _dense_init(), (cfg.vocab_size, cfg.hidden_size))
        if not cfg.tie_embeddings:
            self.param("lm_head", _dense_init(), (cfg.hidden_size, cfg.vocab_size))
        h = jnp.take(embed, tokens, axis=0).astype(activation_dtype(cfg, embed.dtype))
        h = constrain_activation(h, "hidden")
        cos, sin = rope_tables(cfg, positions)
        # remat: only each layer's input is kept for the backward pass (L x [B, T, D]); the
        # block's attention scores and MLP activations are recomputed, layer by layer
        block = nn.remat(Block, prevent_cse=False) if self.remat else Block
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            unroll=cfg.decode_unroll if tokens.shape[1] == 1 else 1,
        )(cfg, name="layers")
        layer_kv = (None if prefix is None else (prefix.k, prefix.v),
                    None if cache is None else (cache.k, cache.v))
        h, new_kv = layers(h, layer_kv, cos, sin, mask, cache_mask, prefix_mask)
        h = RMSNorm(cfg.rms_norm_eps, name="final_norm")(h)
        return h, new_kv


def activation_dtype(cfg: ModelConfig, param_dtype) -> jnp.dtype:
    """The dtype activations (and the KV cache) use: ``cfg.compute_dtype`` or the params'."""
    return jnp.dtype(cfg.compute_dtype) if cfg.compute_dtype else jnp.dtype(param_dtype)


def init_params(cfg: ModelConfig, rng: Array, dtype=jnp.float32) -> dict:
    """Random parameters (normal std 0.02, norms at one) for ``cfg``."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    mask = jnp.ones((1, 1, 1), bool)
    params = Decoder(cfg).init(rng, tokens, tokens, mask)["params"]
    return jax.tree.map(lambda x: x.astype(dtype), params)


def matmul_precision(cfg: ModelConfig, default: str | None = None):
    """A context that traces the model's matmuls at ``cfg.matmul_precision`` (else
    ``default``; None: the backend's default precision)."""
    precision = cfg.matmul_precision or default
    if precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(precision)


def forward(params: dict, cfg: ModelConfig, tokens: Array, positions: Array, mask: Array,
            cache: KVCache | None = None, cache_mask: Array | None = None,
            prefix: KVCache | None = None, prefix_mask: Array | None = None,
            remat: bool = False):
    """Runs the decoder.

    Args:
      params: the parameter tree (see module docstring).
      cfg: model config (static).
      tokens: int32 ``[B, T]``.
      positions: int32 ``[B, T]`` RoPE positions (left padding: ``cumsum(mask) - 1``).
      mask: bool ``[B, T, T]``: query t may attend new key s (causal and not padding).
      cache: optional :class:`KVCache` of earlier tokens (read only).
      cache_mask: bool ``[B, T, S]``: query t may attend cache slot s (with ``cache``).
      prefix: optional :class:`KVCache` ``[L, P, K, S_p, hd]`` shared by groups of ``B / P``
        consecutive rows (the G samples of a prompt), attended before ``cache``.
      prefix_mask: bool ``[P, S_p]``: valid prefix slots (with ``prefix``).
      remat: rematerialise each block in the backward pass (training memory: only the layer
        inputs are saved). Same values and gradients.

    Returns:
      ``(hidden [B, T, D], (k, v))`` with this call's keys/values ``[L, B, K, T, hd]``; write
      them into a cache with :meth:`KVCache.write`.
    """
    with matmul_precision(cfg):
        return Decoder(cfg, remat=remat).apply({"params": params}, tokens, positions, mask,
                                               cache, cache_mask, prefix, prefix_mask)


def lm_head(params: dict, cfg: ModelConfig) -> Array:
    """The ``[D, V]`` output projection (the embedding transposed when tied)."""
    return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


def logits_from_hidden(params: dict, cfg: ModelConfig, hidden: Array) -> Array:
    """float32 logits ``[..., V]`` for hidden states ``[..., D]``."""
    w = lm_head(params, cfg)
    dt = activation_dtype(cfg, w.dtype)
    with matmul_precision(cfg):
        logits = jnp.einsum("...d,dv->...v", hidden.astype(dt), w.astype(dt),
                            preferred_element_type=jnp.float32)
    return constrain_activation(logits, "logits") if logits.ndim == 3 else logits


def padding_positions(attention_mask: Array) -> Array:
    """RoPE positions for a (left- or right-) padded ``[B, T]`` 0/1 mask."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(attention_mask: Array) -> Array:
    """``[B, T, T]`` causal mask that also hides padded keys."""
    t = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return causal[None] & attention_mask.astype(bool)[:, None, :]
