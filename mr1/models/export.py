"""Export a :class:`~mr1.models.policy.Policy` as an HF checkpoint folder (transformers, vLLM).

The folder holds ``config.json`` (``LlamaForCausalLM`` for Llama / SmolLM2 / Mistral-type
models, ``Qwen2ForCausalLM`` for Qwen-2/2.5), ``model.safetensors`` (or shards of at most
``max_shard_bytes`` plus ``model.safetensors.index.json``), the tokenizer files with the chat
template, and ``generation_config.json``. mr1 loads such folders back with ``load_policy(DIR)``.

Tensor names come from inverting the loader's key table
(:data:`mr1.models.weights.HF_TO_PARAMS`): each mr1 parameter goes back to the HF key its
pattern names (the layer index filled in for stacked ``layers/...`` arrays), through the
table's transform, which is its own inverse (a transpose ``[in, out] -> [out, in]`` or the
identity). mr1 keeps q/k in HF's half-split RoPE layout (the GGUF loader undoes llama.cpp's
interleaving permutation when it reads), so exported q/k need no permutation.

Safetensors files are written here (the format: an 8-byte little-endian header length, a
JSON header of ``{name: {dtype, shape, data_offsets}}``, then the raw little-endian bytes),
each tensor cast to the export dtype as it is written: the export holds one host copy of the
params.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys
from typing import Any, Iterator

import numpy as np

from mr1.models.config import ModelConfig
from mr1.models.weights import HF_TO_PARAMS, param_shapes

EXPORT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}
DEFAULT_SHARD_BYTES = 5 * 2 ** 30


class ExportError(ValueError):
    """A policy that cannot be written as an HF folder of its architecture."""


def _hf_name(pattern: str, layer: int | None) -> str:
    """The HF key a loader pattern matches, e.g. ``model\\.layers\\.(\\d+)\\.mlp...`` -> the
    key of ``layer``."""
    name = pattern.replace(r"(\d+)", "{layer}").replace("\\.", ".")
    if re.search(r"[\\()\[\]*+?]", name):
        raise ExportError(f"loader pattern {pattern!r} is not a plain key template")
    return name.format(layer=layer)


def hf_tensors(cfg: ModelConfig, params: Any) -> Iterator[tuple[str, np.ndarray]]:
    """``(hf_key, array)`` for every parameter of ``params`` (one layer slice at a time)."""
    shapes = param_shapes(cfg)
    flat = {}
    for path in shapes:
        node = params
        for part in path.split("/"):
            node = node[part]
        flat[path] = node
    used = set()
    for pattern, path, transform in HF_TO_PARAMS:
        if path not in flat:
            continue   # no q/k/v bias, or a tied LM head
        used.add(path)
        if path.startswith("layers/"):
            for layer in range(cfg.num_layers):
                yield _hf_name(pattern, layer), transform(np.asarray(flat[path][layer]))
        else:
            yield _hf_name(pattern, None), transform(np.asarray(flat[path]))
    if used != set(flat):
        raise ExportError(f"parameters without an HF key: {sorted(set(flat) - used)}")


def _f32(x: float) -> float:
    """The shortest decimal of float32 ``x`` (GGUF stores 1e-5 as 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def hf_config(cfg: ModelConfig, *, dtype: str = "float32", bos: int | None = None,
              eos: tuple[int, ...] = (), pad: int | None = None) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` (``bos`` / ``eos`` / ``pad`` override the config's)."""
    if cfg.arch not in ARCHITECTURES:
        raise ExportError(f"architecture {cfg.arch!r} has no HF export; known: "
                          f"{sorted(ARCHITECTURES)}")
    if cfg.arch == "llama" and cfg.qkv_bias:
        raise ExportError("a llama-architecture model with q/k/v biases has no HF class: "
                          "LlamaForCausalLM's attention_bias also biases o_proj")
    arch, model_type = ARCHITECTURES[cfg.arch]
    eos = tuple(eos) or tuple(cfg.eos_token_ids)
    c = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": _f32(cfg.rms_norm_eps), "rope_theta": _f32(cfg.rope_theta),
        "rope_scaling": None, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id if bos is None else bos,
        "eos_token_id": (eos[0] if len(eos) == 1 else list(eos)) if eos else None,
        "pad_token_id": cfg.pad_token_id if pad is None else pad,
        "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
        "torch_dtype": dtype,
    }
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        c["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor,
                             "low_freq_factor": rs.low_freq_factor,
                             "high_freq_factor": rs.high_freq_factor,
                             "original_max_position_embeddings":
                                 rs.original_max_position_embeddings}
    if model_type == "llama":
        c.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        c.update(use_sliding_window=False, sliding_window=None,
                 max_window_layers=cfg.num_layers)
    return c


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes  # ships with jax

        return np.asarray(array, np.float32).astype(ml_dtypes.bfloat16)
    return np.asarray(array, np.float32).astype(dtype)


def write_safetensors(path: str | os.PathLike, tensors: list[tuple[str, np.ndarray]],
                      dtype: str = "float32") -> int:
    """Writes ``tensors`` (cast to ``dtype``) as one safetensors file; returns its size."""
    if sys.byteorder != "little":
        raise ExportError("safetensors data is little-endian; this host is not")
    code = EXPORT_DTYPES[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    itemsize = np.dtype(np.float32).itemsize if dtype == "float32" else 2
    for name, a in tensors:
        n = int(np.prod(a.shape)) * itemsize
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset,
                                                                               offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)   # data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for _, a in tensors:
            fh.write(np.ascontiguousarray(_cast(a, dtype)).tobytes())
    return 8 + len(raw) + offset


def export_policy(policy, out: str | os.PathLike, *, dtype: str = "float32",
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> pathlib.Path:
    """Writes ``policy`` as an HF folder ``out`` (see the module docstring); returns ``out``.

    Raises:
      ExportError: an architecture without an HF class, or an unknown ``dtype``.
    """
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    cfg = policy.config
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = policy.tokenizer
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    config = hf_config(cfg, dtype=dtype, bos=bos, eos=policy.eos_token_ids,
                       pad=policy.pad_token_id)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    itemsize = 4 if dtype == "float32" else 2
    shards, current, size = [], [], 0
    for name, a in hf_tensors(cfg, policy.params):
        n = a.size * itemsize
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, a))
        size += n
    shards.append(current)
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("*.index.json")):
        stale.unlink()
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0], dtype)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / fname, shard, dtype)
            weight_map.update({name: fname for name, _ in shard})
            total += sum(a.size * itemsize for _, a in shard)
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    if tok is not None:
        tok.save_pretrained(str(out))
    return out
