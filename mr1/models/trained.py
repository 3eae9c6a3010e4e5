"""Loading a policy from a run config, and trained params from an RL run's checkpoints.

:func:`load_policy_from_config` is the one way a run config (``model``, ``tokenizer``,
``param_dtype``, ``compute_dtype``, ``parallel.attention_chunk``) becomes a
:class:`~mr1.models.policy.Policy`, for training and evaluation alike;
:func:`load_trained_params` reads an RL run's checkpoint (full fine-tuning or LoRA, GRPO or
PPO) back as full policy params, using the run's ``config.json`` (:func:`run_config`). None of
this needs the RL trainer, so evaluation does not import it.

:func:`load_trained_policy` is the serving/export view of the same: the run's base model (its
``model``, ``tokenizer``, ``seed`` and ``param_dtype``: a LoRA run's adapters only fit that
exact base, random presets included) with the checkpoint's params in, LoRA adapters merged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import numpy as np

from mr1.models.lora import init_lora, lora_scale

__all__ = ["load_policy_from_config", "run_config", "lora_rank", "load_trained_params",
           "load_base_policy", "is_checkpoint", "load_trained_policy", "DEFAULT_MODEL"]

DEFAULT_MODEL = "smollm2-135m-instruct"


def load_policy_from_config(config):
    """The config's ``model`` (and optional ``tokenizer``, ``param_dtype``, ``compute_dtype``)
    as a Policy."""
    import jax.numpy as jnp

    from mr1.models import load_policy
    from mr1.models.config import execution_overrides
    from mr1.models.policy import load_tokenizer_from_gguf

    tokenizer = None
    if config.get("tokenizer", ""):
        from mr1 import assets
        src = config.tokenizer
        path = assets.smollm2_gguf() if src == "embedded" else pathlib.Path(src)
        tokenizer = load_tokenizer_from_gguf(path)
    policy = load_policy(config.model, tokenizer=tokenizer, seed=config.seed,
                         dtype=jnp.dtype(config.get("param_dtype", "float32")))
    changes = execution_overrides(config)
    if changes:  # execution knobs of the model config (same weights)
        policy = dataclasses.replace(policy, config=policy.config.replace(**changes))
    return policy


def run_config(checkpoint) -> dict:
    """The run's ``config.json`` (the trainer writes it in the workdir that holds
    ``checkpoints/``) as a dict for the checkpoint directory ``checkpoint``; ``{}`` if absent."""
    from etils import epath

    path = epath.Path(checkpoint).parent / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def lora_rank(run: dict) -> int:
    """The LoRA rank of a run config (0: full fine-tuning)."""
    return int((run.get("lora") or {}).get("rank", 0) or 0)


def load_trained_params(checkpoint, base_params, *, step: int | None = None,
                        run: dict | None = None):
    """Full policy params from a trainer checkpoint directory (``<workdir>/checkpoints``).

    ``run`` is the run's config (default: its ``config.json``, :func:`run_config`). Full
    fine-tuning checkpoints hold ``{"policy": ...}``, returned as they are. LoRA runs
    (``lora.rank > 0``) hold only ``{"lora": ...}``: the adapters are merged into
    ``base_params``, which must be the run's base model (same weights and dtype). A PPO run's
    value head is read along (it is saved with the params) and dropped. ``step``: default the
    latest.
    """
    from mr1.checkpoint import restore_params
    from mr1.models.lora import merge_lora

    run = run_config(checkpoint) if run is None else run
    rank = lora_rank(run)
    if rank > 0:
        lora = run["lora"]
        like = {"lora": jax.eval_shape(lambda: init_lora(base_params, rank,
                                                         tuple(lora["targets"])))}
    else:
        like = {"policy": base_params}
    if run.get("algo") == "ppo":
        d = np.shape(base_params["embed"])[-1]
        like["value_head"] = {"w": jax.ShapeDtypeStruct((d,), np.float32),
                              "b": jax.ShapeDtypeStruct((), np.float32)}
    try:
        restored = restore_params(checkpoint, like, step=step)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001
        kind = f"LoRA rank {rank}" if rank > 0 else "full fine-tuning"
        from mr1.run_identity import CheckpointMismatchError
        raise CheckpointMismatchError(
            f"{checkpoint}: params do not match a {kind} {run.get('algo', 'grpo')} run; LoRA "
            "and PPO checkpoints are read with the run's config.json, expected in the "
            "directory above checkpoints/") from e
    if rank <= 0:
        return restored["policy"]
    return merge_lora(base_params, restored["lora"], lora_scale(lora["alpha"], rank))


def load_base_policy(model: str = DEFAULT_MODEL, tokenizer: str = "", *, seed: int = 0,
                     param_dtype: str = "float32"):
    """``load_policy`` of ``model`` with the experiment configs' ``tokenizer`` switch (``""``:
    the model's own; ``"embedded"``: the embedded GGUF's; a GGUF path)."""
    import ml_collections

    return load_policy_from_config(ml_collections.ConfigDict(
        {"model": str(model), "tokenizer": tokenizer or "", "seed": int(seed),
         "param_dtype": param_dtype}))


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a trainer checkpoint directory (``<run>/best`` or
    ``<run>/checkpoints``): a folder of orbax step directories."""
    p = pathlib.Path(path)
    return p.is_dir() and any(c.is_dir() and c.name.isdigit() for c in p.iterdir())


def load_trained_policy(checkpoint: str | os.PathLike, *, model: str | None = None,
                        tokenizer: str | None = None, step: int | None = None):
    """``(policy, run)``: the base model of the run behind ``checkpoint`` with its trained
    params, and the run's config (``{}`` when the run left no ``config.json``).

    ``model`` / ``tokenizer`` override the run's (needed when the run's ``config.json`` is
    missing or the base model moved); ``step``: default the latest in ``checkpoint``.

    Raises:
      FileNotFoundError: ``checkpoint`` is not a trainer checkpoint directory.
    """
    if not is_checkpoint(checkpoint):
        raise FileNotFoundError(f"{checkpoint}: not a trainer checkpoint directory (expected "
                                "<run>/best or <run>/checkpoints with numbered steps)")
    run = run_config(checkpoint)
    base = load_base_policy(model or run.get("model") or DEFAULT_MODEL,
                            run.get("tokenizer", "") if tokenizer is None else tokenizer,
                            seed=int(run.get("seed", 0)),
                            param_dtype=run.get("param_dtype", "float32") or "float32")
    params = load_trained_params(checkpoint, base.params, step=step, run=run)
    return dataclasses.replace(base, params=params), run
