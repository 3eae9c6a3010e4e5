"""Weight loading: GGUF files and HF safetensors checkpoint folders, through one key table.

Both sources are first expressed in HF key names (GGUF names are renamed by
:data:`GGUF_TO_HF`), then :data:`HF_TO_PARAMS` maps every HF key to a path in mr1's parameter
tree together with the transform it needs (a transpose for projections, the layer index for the
stacked ``layers`` arrays). Tensors are written one at a time into preallocated stacked arrays,
so peak host memory stays near the size of the final tree.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Callable, Iterator

import numpy as np

from mr1.models.config import ModelConfig, RopeScaling

SUPPORTED_GGUF_ARCHS = ("llama", "qwen2")
SUPPORTED_HF_MODEL_TYPES = ("llama", "qwen2", "mistral")


class WeightLoadError(ValueError):
    """A checkpoint that cannot be loaded (unsupported, incomplete or inconsistent)."""


# ---------------------------------------------------------------------------------------------
# The key tables.

# GGUF tensor name -> HF tensor name.
GGUF_TO_HF: list[tuple[str, str]] = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]

_T = lambda w: w.T  # noqa: E731  torch Linear [out, in] -> our [in, out]
_ID = lambda w: w  # noqa: E731

# HF tensor name -> (param path, transform). ``layers/...`` paths are stacked over layers.
HF_TO_PARAMS: list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = [
    (r"model\.embed_tokens\.weight", "embed", _ID),
    (r"model\.norm\.weight", "final_norm/scale", _ID),
    (r"lm_head\.weight", "lm_head", _T),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers/attn_norm/scale", _ID),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "layers/wq", _T),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "layers/wk", _T),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "layers/wv", _T),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.bias", "layers/bq", _ID),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.bias", "layers/bk", _ID),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.bias", "layers/bv", _ID),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers/wo", _T),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers/mlp_norm/scale", _ID),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers/w_gate", _T),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers/w_up", _T),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers/w_down", _T),
]

_IGNORED_HF_KEYS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flat ``path -> shape`` of the parameter tree :mod:`mr1.models.transformer` builds."""
    d, f, h, k, hd, n = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                         cfg.num_kv_heads, cfg.head_dim, cfg.num_layers)
    shapes = {
        "embed": (cfg.vocab_size, d),
        "final_norm/scale": (d,),
        "layers/attn_norm/scale": (n, d),
        "layers/wq": (n, d, h * hd),
        "layers/wk": (n, d, k * hd),
        "layers/wv": (n, d, k * hd),
        "layers/wo": (n, h * hd, d),
        "layers/mlp_norm/scale": (n, d),
        "layers/w_gate": (n, d, f),
        "layers/w_up": (n, d, f),
        "layers/w_down": (n, f, d),
    }
    if cfg.qkv_bias:
        shapes.update({"layers/bq": (n, h * hd), "layers/bk": (n, k * hd),
                       "layers/bv": (n, k * hd)})
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (d, cfg.vocab_size)
    return shapes


def _match(table, key):
    for pattern, *rest in table:
        m = re.fullmatch(pattern, key)
        if m:
            return m, rest
    return None, None


def hf_key_to_param(key: str):
    """``(param path, layer index or None, transform)`` for an HF key, or None if unmapped."""
    m, rest = _match(HF_TO_PARAMS, key)
    if m is None:
        return None
    path, transform = rest
    layer = int(m.group(1)) if path.startswith("layers/") else None
    return path, layer, transform


def assemble_params(cfg: ModelConfig, tensors: Iterator[tuple[str, np.ndarray]],
                    dtype=np.float32, source: str = "checkpoint") -> dict:
    """Builds the nested parameter tree from ``(hf_key, array)`` pairs.

    Raises:
      WeightLoadError: a tensor of the wrong shape, an unknown key, or missing tensors.
    """
    shapes = param_shapes(cfg)
    flat = {path: np.empty(shape, dtype) for path, shape in shapes.items()}
    filled: dict[str, set] = {path: set() for path in shapes}
    for key, array in tensors:
        if any(re.fullmatch(p, key) for p in _IGNORED_HF_KEYS):
            continue
        mapped = hf_key_to_param(key)
        if mapped is None:
            raise WeightLoadError(f"{source}: tensor {key!r} has no place in the parameter "
                                  f"tree of a {cfg.arch} model")
        path, layer, transform = mapped
        if path not in flat:
            if path == "lm_head" and cfg.tie_embeddings:
                continue  # some tied checkpoints still store the head
            raise WeightLoadError(f"{source}: tensor {key!r} does not fit config {cfg.name} "
                                  f"(no {path}; qkv_bias={cfg.qkv_bias})")
        value = transform(np.asarray(array))
        target = flat[path] if layer is None else flat[path][layer]
        if layer is not None and layer >= cfg.num_layers:
            raise WeightLoadError(f"{source}: {key!r} names layer {layer} but the config has "
                                  f"{cfg.num_layers}")
        if value.shape != target.shape:
            raise WeightLoadError(f"{source}: {key!r} has shape {value.shape} after mapping, "
                                  f"expected {target.shape} for {path}")
        target[...] = value
        filled[path].add(layer)
    missing = []
    for path, got in filled.items():
        want = set(range(cfg.num_layers)) if path.startswith("layers/") else {None}
        if got != want:
            missing.append(f"{path} (layers {sorted(want - got)})" if path.startswith("layers/")
                           else path)
    if missing:
        raise WeightLoadError(f"{source}: missing tensors for {', '.join(missing)}")
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


# ---------------------------------------------------------------------------------------------
# GGUF.


def _reader(path):
    import gguf  # a hard dependency; imported lazily to keep `import mr1` fast

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - a corrupt file surfaces as many error types
        raise WeightLoadError(f"{path}: not a readable GGUF file ({e})") from e


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def gguf_architecture(path) -> str:
    return str(_field(_reader(path), "general.architecture", "unknown"))


def config_from_gguf(path, reader=None) -> ModelConfig:
    """A :class:`ModelConfig` from a GGUF file's metadata."""
    reader = reader or _reader(path)
    arch = str(_field(reader, "general.architecture", "unknown"))
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise WeightLoadError(f"{path}: GGUF architecture {arch!r} is not supported; mr1 loads "
                              f"{list(SUPPORTED_GGUF_ARCHS)}")
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    names = {t.name for t in reader.tensors}
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = int(g("vocab_size", emb.shape[-1]))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id", eos if eos is not None else 0)
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    scaling = None
    if str(g("rope.scaling.type", "")) == "llama3" or "rope_freqs.weight" in names:
        raise WeightLoadError(f"{path}: Llama-3 RoPE scaling in GGUF is not supported; load "
                              "the HF checkpoint folder instead")
    name = str(_field(reader, "general.name", pathlib.Path(path).stem))
    return ModelConfig(
        name=f"gguf:{name}",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_layers=int(g("block_count")),
        num_heads=heads,
        num_kv_heads=int(g("attention.head_count_kv", heads)),
        head_dim=int(g("rope.dimension_count", hidden // heads)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        qkv_bias="blk.0.attn_q.bias" in names,
        tie_embeddings="output.weight" not in names,
        max_position_embeddings=int(g("context_length", 8192)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=int(pad) if pad is not None else 0,
        arch=arch,
    )


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (interleaved -> half-split RoPE layout)."""
    out_dim = w.shape[0]
    # llama.cpp stores each head's rows as interleaved (even, odd) pairs; HF/mr1 use halves.
    return (w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _gguf_tensors(reader, cfg: ModelConfig, path) -> Iterator[tuple[str, np.ndarray]]:
    from gguf import quants

    for t in reader.tensors:
        m, rest = _match(GGUF_TO_HF, t.name)
        if m is None:
            raise WeightLoadError(f"{path}: unexpected GGUF tensor {t.name!r}")
        hf_key = m.expand(rest[0])
        w = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if cfg.arch == "llama":  # llama.cpp permutes q/k of Llama-family models only
            if ".q_proj." in hf_key:
                w = _unpermute_rope(w, cfg.num_heads)
            elif ".k_proj." in hf_key:
                w = _unpermute_rope(w, cfg.num_kv_heads)
        yield hf_key, w


def load_gguf(path, dtype=np.float32) -> tuple[ModelConfig, dict]:
    """Dequantizes a GGUF file into ``(config, params)``."""
    reader = _reader(path)
    cfg = config_from_gguf(path, reader)
    return cfg, assemble_params(cfg, _gguf_tensors(reader, cfg, path), dtype, str(path))


# ---------------------------------------------------------------------------------------------
# HF checkpoint folders.


def config_from_hf(folder) -> ModelConfig:
    """A :class:`ModelConfig` from an HF ``config.json``."""
    folder = pathlib.Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise WeightLoadError(f"{folder}: no config.json; expected an HF checkpoint folder")
    try:
        c = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise WeightLoadError(f"{cfg_path}: invalid JSON ({e})") from e
    model_type = c.get("model_type", "")
    if model_type not in SUPPORTED_HF_MODEL_TYPES:
        raise WeightLoadError(f"{cfg_path}: model_type {model_type!r} is not supported; mr1 "
                              f"loads {list(SUPPORTED_HF_MODEL_TYPES)}")
    heads = c["num_attention_heads"]
    rs = c.get("rope_scaling") or c.get("rope_parameters") or {}  # transformers 4.x / 5.x
    rope_type = rs.get("rope_type", rs.get("type"))
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
            high_freq_factor=float(rs["high_freq_factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
    elif rope_type not in (None, "default"):
        raise WeightLoadError(f"{cfg_path}: rope_scaling type {rope_type!r} is not supported")
    rope_theta = c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    eos = c.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    pad = c.get("pad_token_id")
    return ModelConfig(
        name=f"hf:{folder.name}",
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads", heads),
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        qkv_bias=bool(c.get("attention_bias", model_type == "qwen2")),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        max_position_embeddings=int(c.get("max_position_embeddings", 8192)),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=int(pad if pad is not None else (eos_ids[0] if eos_ids else 0)),
        arch="qwen2" if model_type == "qwen2" else "llama",
    )


def safetensors_files(folder) -> list[pathlib.Path]:
    """The checkpoint's shard files; raises if the index names shards that are missing."""
    folder = pathlib.Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise WeightLoadError(f"{folder}: {len(missing)} of {len(shards)} shards named in "
                                  f"{index.name} are missing: {missing}")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise WeightLoadError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                          "(only safetensors checkpoints are loaded; no pickle)")


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                       "U8": "uint8", "BOOL": "bool"}


def _safetensors_tensors(files) -> Iterator[tuple[str, np.ndarray]]:
    """Memory-maps each tensor of each file (bfloat16 included, via ml_dtypes)."""
    import ml_dtypes  # ships with jax

    for f in files:
        with open(f, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise WeightLoadError(f"{f}: truncated safetensors file")
            n = int.from_bytes(raw, "little")
            try:
                header = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise WeightLoadError(f"{f}: corrupt safetensors header ({e})") from e
        data = np.memmap(f, dtype=np.uint8, mode="r", offset=8 + n)
        for key, info in header.items():
            if key == "__metadata__":
                continue
            name = _SAFETENSORS_DTYPES.get(info["dtype"])
            if name is None:
                raise WeightLoadError(f"{f}: {key} has unsupported dtype {info['dtype']}")
            dt = np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
            begin, stop = info["data_offsets"]
            if stop > data.shape[0]:
                raise WeightLoadError(f"{f}: truncated ({key} ends past the end of the file)")
            yield key, data[begin:stop].view(dt).reshape(info["shape"]).astype(np.float32)


def load_hf_folder(folder, dtype=np.float32) -> tuple[ModelConfig, dict]:
    """Loads ``config.json`` + (sharded) ``*.safetensors`` into ``(config, params)``."""
    cfg = config_from_hf(folder)
    files = safetensors_files(folder)
    return cfg, assemble_params(cfg, _safetensors_tensors(files), dtype, str(folder))
