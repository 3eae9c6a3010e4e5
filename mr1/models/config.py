"""Model hyper-parameters and the registry of named presets.

One :class:`ModelConfig` describes every decoder mr1 runs: Llama-3.x (RoPE with Llama-3
frequency scaling), Qwen-2/2.5 (qkv bias) and SmolLM2 (a Llama with tied embeddings).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


# None = the backend's default (see ModelConfig.matmul_precision).
MATMUL_PRECISIONS = (None, "default", "high", "highest")
# The decode-attention kernels (mr1.models.kernels.DECODE_ATTENTION holds their functions).
ATTENTION_IMPLS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (``rope_type: llama3`` in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer hyper-parameters.

    Attributes:
      name: preset name or a description of where the config came from.
      vocab_size: rows of the embedding table.
      hidden_size: model width D.
      intermediate_size: SwiGLU width F.
      num_layers: number of decoder blocks.
      num_heads: query heads H.
      num_kv_heads: key/value heads (grouped-query attention when < H).
      head_dim: per-head width (usually D / H).
      rope_theta: RoPE base frequency.
      rope_scaling: Llama-3 frequency scaling, or None.
      rms_norm_eps: epsilon of every RMSNorm.
      qkv_bias: Qwen-2 style biases on the q/k/v projections.
      tie_embeddings: the LM head reuses the embedding table.
      max_position_embeddings: longest sequence (prompt + completion) the sampler accepts.
      bos_token_id / eos_token_ids / pad_token_id: special ids (the tokenizer may override).
      arch: family tag (``llama`` or ``qwen2``) used by weight loaders.
      compute_dtype: activations' dtype (e.g. ``"bfloat16"`` with float32 master params:
        matmuls run in it, log-probs stay float32); None = the params' dtype.
      attention_chunk: > 0: attention over query blocks of this many positions (sequences
        longer than it and divisible by it), each rematerialised: memory-efficient attention
        for long training sequences. 0 = one block.
      matmul_precision: the precision of the model's float32 matmuls (``"default"``,
        ``"high"``, ``"highest"``; see ``jax.default_matmul_precision``). None = the backend's
        default: exact float32 on CPU, but TF32 on NVIDIA GPUs (logits off by ~1e-3 at the
        SmolLM2 shape) and bfloat16 passes on TPU. ``"highest"`` gives true float32 on every
        backend at a throughput cost on GPUs; bfloat16 compute is unaffected.
        :meth:`mr1.models.Policy.logits` uses ``"highest"`` unless this is set.
      attention_impl: the attention kernel of decode steps (one query position against the
        KV cache), a name in :data:`mr1.models.kernels.DECODE_ATTENTION`: ``"xla"`` (the
        einsum path, the default) or ``"pallas"`` (a fused Pallas decode-attention kernel;
        compiled for GPUs, run in Pallas interpret mode elsewhere). Prefill and training
        always use the XLA path.
      decode_unroll: layers unrolled per iteration of the layer loop in decode steps (one new
        position): ``num_layers`` makes the step a straight-line program whose weight slices
        are static instead of dynamic slices of the stacked ``[L, ...]`` arrays (a candidate
        against per-step weight copies on GPUs; longer compiles). Prefill and training keep 1.
    """

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    arch: str = "llama"
    compute_dtype: str | None = None
    attention_chunk: int = 0
    matmul_precision: str | None = None
    attention_impl: str = "xla"
    decode_unroll: int = 1

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision={self.matmul_precision!r}; one of "
                             f"{MATMUL_PRECISIONS}")
        if not 1 <= self.decode_unroll <= max(1, self.num_layers):
            raise ValueError(f"decode_unroll={self.decode_unroll}: 1..num_layers")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; one of {ATTENTION_IMPLS}")

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings included once when tied)."""
        d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_heads,
                           self.num_kv_heads, self.head_dim)
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        if self.qkv_bias:
            attn += h * hd + 2 * kv * hd
        block = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * block + d + head

    def flops_per_token(self, context: int = 0) -> float:
        """Forward FLOPs for one token (2 per multiply-add), attention over ``context`` keys."""
        d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_heads,
                           self.num_kv_heads, self.head_dim)
        matmul = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
        attn = 2 * h * hd * context
        return 2.0 * (self.num_layers * (matmul + attn) + d * self.vocab_size)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def execution_overrides(run_config) -> dict[str, Any]:
    """The :class:`ModelConfig` fields an experiment config sets on top of the weights' own:
    ``compute_dtype``, ``matmul_precision``, ``attention_impl``, ``decode_unroll`` and
    ``parallel.attention_chunk`` (same weights, another execution)."""
    changes: dict[str, Any] = {}
    for name in ("compute_dtype", "matmul_precision", "attention_impl", "decode_unroll"):
        if run_config.get(name, ""):
            changes[name] = run_config[name]
    chunk = int((run_config.get("parallel") or {}).get("attention_chunk", 0) or 0)
    if chunk:
        changes["attention_chunk"] = chunk
    return changes


_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register_preset(name: str):
    """Decorator: registers a zero-argument factory of a :class:`ModelConfig` under ``name``."""

    def wrap(fn):
        _PRESETS[name] = fn
        return fn

    return wrap


def get_config(name: str) -> ModelConfig:
    """Returns the preset ``name``; raises a clear error listing the known presets."""
    key = name.lower()
    if key not in _PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known presets: {sorted(_PRESETS)}. "
                       "load_policy() also takes a GGUF file or an HF checkpoint folder.")
    return _PRESETS[key]()


def preset_names() -> list[str]:
    return sorted(_PRESETS)


@register_preset("tiny")
def _tiny() -> ModelConfig:
    """A few-kilobyte random decoder for unit tests (GQA, tied embeddings)."""
    return ModelConfig(name="tiny", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       rope_theta=10000.0, tie_embeddings=True, max_position_embeddings=512,
                       eos_token_ids=(2,), pad_token_id=0)


@register_preset("tiny-smollm2")
def _tiny_smollm2() -> ModelConfig:
    """``tiny`` with SmolLM2's vocabulary and special ids: pairs with the embedded tokenizer in
    end-to-end tests of the trainers."""
    return _tiny().replace(name="tiny-smollm2", vocab_size=49152, eos_token_ids=(2,),
                           pad_token_id=2, bos_token_id=1)


@register_preset("smollm2-135m")
def _smollm2_135m() -> ModelConfig:
    return ModelConfig(name="smollm2-135m", vocab_size=49152, hidden_size=576,
                       intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                       head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
                       tie_embeddings=True, max_position_embeddings=8192, bos_token_id=1,
                       eos_token_ids=(2,), pad_token_id=2)


_PRESETS["smollm2-135m-instruct"] = _smollm2_135m


def _qwen25(name, d, f, layers, heads, kv, tie, vocab=152064) -> ModelConfig:
    return ModelConfig(name=name, vocab_size=vocab, hidden_size=d, intermediate_size=f,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=d // heads,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, qkv_bias=True,
                       tie_embeddings=tie, max_position_embeddings=32768,
                       eos_token_ids=(151645, 151643), pad_token_id=151643, arch="qwen2")


register_preset("qwen2.5-0.5b")(lambda: _qwen25("qwen2.5-0.5b", 896, 4864, 24, 14, 2, True, 151936))
register_preset("qwen2.5-3b")(lambda: _qwen25("qwen2.5-3b", 2048, 11008, 36, 16, 2, True, 151936))
register_preset("qwen2.5-7b")(lambda: _qwen25("qwen2.5-7b", 3584, 18944, 28, 28, 4, False))
register_preset("qwen2.5-14b")(lambda: _qwen25("qwen2.5-14b", 5120, 13824, 48, 40, 8, False))


@register_preset("llama-3.1-8b")
def _llama31_8b() -> ModelConfig:
    return ModelConfig(name="llama-3.1-8b", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                       head_dim=128, rope_theta=500000.0, rope_scaling=RopeScaling(),
                       rms_norm_eps=1e-5, max_position_embeddings=131072, bos_token_id=128000,
                       eos_token_ids=(128001, 128008, 128009), pad_token_id=128004)
