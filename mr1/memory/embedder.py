"""all-MiniLM-L6-v2 in Flax: the sentence embedder used for memory retrieval.

A BERT encoder (word + position + token-type embeddings, post-LayerNorm blocks with exact-erf
GELU), mean-pooled over the attention mask and L2-normalised, as sentence-transformers does for
this model. Weights come from the ``model.safetensors`` of the embedded asset
(:func:`mr1.assets.minilm_dir`), tokenisation from its ``tokenizer.json`` through
``transformers.AutoTokenizer`` (truncation at 256 tokens, sentence-transformers'
``max_seq_length`` for this model).

``encode`` buckets batches: texts are sorted by length, chunked, and each chunk is padded to
power-of-two sizes (batch and sequence length), so repeated calls reuse a handful of compiled
shapes. Usage::

  emb = load_embedder()
  emb.encode(["a sentence", ...])     # float32 np.ndarray [N, 384], unit-norm rows

Parameter tree (``H`` hidden, ``I`` intermediate, ``i`` layer index)::

  embeddings/word [V, H]  embeddings/position [P, H]  embeddings/token_type [2, H]
  embeddings/norm/{scale, bias} [H]
  layer_i/{query, key, value, attn_out}/{kernel [H, H], bias [H]}  layer_i/attn_norm/{scale, bias}
  layer_i/ffn_in/{kernel [H, I], bias}  layer_i/ffn_out/{kernel [I, H], bias}
  layer_i/ffn_norm/{scale, bias}
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
MIN_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a HF BERT ``config.json`` that the encoder needs."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "BertConfig":
        raw = json.loads(pathlib.Path(path).read_text())
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"expected exact GELU, got hidden_act={raw['hidden_act']!r}")
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})


class BertLayer(nn.Module):
    """Post-LN transformer block: self-attention + residual + LN, FFN + residual + LN."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x: Array, bias: Array) -> Array:
        """``x [B, T, H]``, additive attention ``bias [B, 1, 1, T]`` -> ``[B, T, H]``."""
        c = self.cfg
        nh, hd = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        split = lambda y: y.reshape(*y.shape[:2], nh, hd)  # noqa: E731
        q = split(nn.Dense(c.hidden_size, name="query")(x))
        k = split(nn.Dense(c.hidden_size, name="key")(x))
        v = split(nn.Dense(c.hidden_size, name="value")(x))
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(hd) + bias
        ctx = jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(scores, axis=-1), v)
        attn = nn.Dense(c.hidden_size, name="attn_out")(ctx.reshape(x.shape))
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="attn_norm")(x + attn)
        h = jax.nn.gelu(nn.Dense(c.intermediate_size, name="ffn_in")(x), approximate=False)
        h = nn.Dense(c.hidden_size, name="ffn_out")(h)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="ffn_norm")(x + h)


class Embeddings(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, input_ids: Array) -> Array:
        c = self.cfg
        t = input_ids.shape[1]
        word = self.param("word", nn.initializers.normal(0.02), (c.vocab_size, c.hidden_size))
        pos = self.param("position", nn.initializers.normal(0.02),
                         (c.max_position_embeddings, c.hidden_size))
        typ = self.param("token_type", nn.initializers.normal(0.02),
                         (c.type_vocab_size, c.hidden_size))
        x = word[input_ids] + pos[None, :t] + typ[0]  # single-segment input: token type 0
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="norm")(x)


class MiniLM(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array) -> Array:
        """``input_ids, attention_mask [B, T]`` (right padding) -> unit vectors ``[B, H]``."""
        x = Embeddings(self.cfg, name="embeddings")(input_ids)
        m = attention_mask.astype(jnp.float32)
        bias = jnp.where(m > 0, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
        for i in range(self.cfg.num_hidden_layers):
            x = BertLayer(self.cfg, name=f"layer_{i}")(x, bias)
        pooled = jnp.sum(x * m[..., None], axis=1) / jnp.maximum(m.sum(1, keepdims=True), 1e-9)
        norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
        return pooled / jnp.maximum(norm, 1e-12)


# ----------------------------------------------------------------------------- weights
# HF checkpoint key -> (param path, transform). Dense weights are [out, in] in torch.
_T = lambda w: w.T  # noqa: E731
_I = lambda w: w  # noqa: E731
_RULES: list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = [
    (r"embeddings\.word_embeddings\.weight", "embeddings/word", _I),
    (r"embeddings\.position_embeddings\.weight", "embeddings/position", _I),
    (r"embeddings\.token_type_embeddings\.weight", "embeddings/token_type", _I),
    (r"embeddings\.LayerNorm\.weight", "embeddings/norm/scale", _I),
    (r"embeddings\.LayerNorm\.bias", "embeddings/norm/bias", _I),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.weight", r"layer_\1/\2/kernel", _T),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.bias", r"layer_\1/\2/bias", _I),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.weight", r"layer_\1/attn_out/kernel", _T),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.bias", r"layer_\1/attn_out/bias", _I),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.weight", r"layer_\1/attn_norm/scale",
     _I),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.bias", r"layer_\1/attn_norm/bias", _I),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.weight", r"layer_\1/ffn_in/kernel", _T),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.bias", r"layer_\1/ffn_in/bias", _I),
    (r"encoder\.layer\.(\d+)\.output\.dense\.weight", r"layer_\1/ffn_out/kernel", _T),
    (r"encoder\.layer\.(\d+)\.output\.dense\.bias", r"layer_\1/ffn_out/bias", _I),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.weight", r"layer_\1/ffn_norm/scale", _I),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.bias", r"layer_\1/ffn_norm/bias", _I),
]
_IGNORED = re.compile(r"(embeddings\.position_ids|pooler\..*)")


def convert_hf_state(state: dict[str, np.ndarray]) -> dict[str, Any]:
    """HF ``BertModel`` tensors (``bert.`` prefix allowed) -> the MiniLM param tree."""
    params: dict[str, Any] = {}
    for key, value in state.items():
        key = key.removeprefix("bert.")
        if _IGNORED.fullmatch(key):
            continue
        for pattern, target, transform in _RULES:
            if re.fullmatch(pattern, key):
                node = params
                *parents, leaf = re.sub(pattern, target, key).split("/")
                for p in parents:
                    node = node.setdefault(p, {})
                node[leaf] = jnp.asarray(transform(np.asarray(value, np.float32)))
                break
        else:
            raise KeyError(f"unexpected checkpoint tensor {key!r}")
    return params


def _check_tree(params: dict, cfg: BertConfig) -> None:
    want = jax.eval_shape(MiniLM(cfg).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32),
                          jnp.ones((1, 2), jnp.int32))["params"]
    got_shapes = jax.tree.map(lambda x: x.shape, params)
    want_shapes = jax.tree.map(lambda x: x.shape, want)
    if got_shapes != want_shapes:
        raise ValueError(f"checkpoint does not match the MiniLM tree: {got_shapes} vs {want_shapes}")


# ----------------------------------------------------------------------------- encoding

def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two ``>= max(n, minimum)``."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@dataclasses.dataclass
class Embedder:
    """A loaded MiniLM: params, tokenizer and a jitted, shape-bucketed ``encode``."""

    params: dict
    tokenizer: Any
    config: BertConfig
    max_length: int = MAX_SEQ_LENGTH
    batch_size: int = 64

    def __post_init__(self):
        model = MiniLM(self.config)
        self._forward = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with [CLS]/[SEP], truncated to ``max_length``."""
        if not texts:
            return []
        out = self.tokenizer(list(texts), max_length=self.max_length, truncation=True,
                             padding=False, return_attention_mask=False)
        return [list(ids) for ids in out["input_ids"]]

    def embed_ids(self, input_ids: Array, attention_mask: Array) -> Array:
        """Jitted forward on padded ids ``[B, T]`` -> ``[B, H]`` (compiles per shape)."""
        return self._forward(self.params, input_ids, attention_mask)

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Embeds ``texts`` -> float32 ``[N, H]`` with L2-normalised rows (``[0, H]`` if empty)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not a string")
        ids = self.tokenize(texts)
        out = np.zeros((len(ids), self.dim), np.float32)
        bs = batch_size or self.batch_size
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), bs):
            chunk = order[start:start + bs]
            t = min(bucket(max(len(ids[i]) for i in chunk)), self.config.max_position_embeddings)
            b = bucket(len(chunk), minimum=1)
            arr = np.full((b, t), self.tokenizer.pad_token_id or 0, np.int32)
            mask = np.zeros((b, t), np.int32)
            for row, i in enumerate(chunk):
                arr[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            vecs = np.asarray(self.embed_ids(jnp.asarray(arr), jnp.asarray(mask)))
            out[chunk] = vecs[: len(chunk)]
        return out


def load_embedder(path: str | os.PathLike | None = None, *, max_length: int = MAX_SEQ_LENGTH,
                  batch_size: int = 64) -> Embedder:
    """Loads all-MiniLM-L6-v2 from ``path`` (default: the embedded asset folder)."""
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    from mr1.assets import minilm_dir

    folder = minilm_dir(path)
    cfg = BertConfig.from_json(folder / "config.json")
    params = convert_hf_state(load_file(str(folder / "model.safetensors")))
    _check_tree(params, cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return Embedder(params=params, tokenizer=tokenizer, config=cfg, max_length=max_length,
                    batch_size=batch_size)
