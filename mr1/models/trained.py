"""A trained policy from an RL run's checkpoint, ready to serve or export.

An RL run's workdir holds ``config.json`` (the run's config) beside ``checkpoints/`` and
``best/``. :func:`load_trained_policy` loads the run's base model (its ``model``, ``tokenizer``,
``seed`` and ``param_dtype``: a LoRA run's adapters only fit that exact base, random presets
included) and puts the checkpoint's params in, LoRA adapters merged
(:func:`mr1.rl.trainer.load_trained_params`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

DEFAULT_MODEL = "smollm2-135m-instruct"


def load_base_policy(model: str = DEFAULT_MODEL, tokenizer: str = "", *, seed: int = 0,
                     param_dtype: str = "float32"):
    """``load_policy`` of ``model`` with the experiment configs' ``tokenizer`` switch (``""``:
    the model's own; ``"embedded"``: the embedded GGUF's; a GGUF path)."""
    import ml_collections

    from mr1.rl.trainer import load_policy_from_config

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
    from mr1.rl.trainer import load_trained_params, run_config

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
