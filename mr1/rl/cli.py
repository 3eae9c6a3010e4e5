"""The shared command line of the RL entry points (``experiments/{grpo,ppo}_{answer,memory}.py``).

absl + ``ml_collections.config_flags`` as in the Flax examples: ``--config=<file>`` (locked;
override fields with ``--config.a.b=value``) and ``--workdir``; multi-host init when launched
with ``MR1_DISTRIBUTED=1``.
"""

from __future__ import annotations

from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from mr1.entry import run_main
from mr1.parallel import maybe_initialize_distributed


def run_trainer(train_fn: Callable[..., dict], algo: str, default_workdir: str) -> None:
    """Defines the flags, parses them and calls ``train_fn(config, workdir)`` (e.g.
    :func:`mr1.rl.trainer.train`, :func:`mr1.rl.memory_task.train_memory`); the config must
    have ``algo == algo``."""
    config_flag = config_flags.DEFINE_config_file("config", None, "training config",
                                                  lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", default_workdir,
                                       "checkpoints, metrics, curves (re-use to resume)")

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError("Too many command-line arguments.")
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        maybe_initialize_distributed()
        config = config_flag.value
        if config.algo != algo:
            raise app.UsageError(f"this entry point trains algo={algo!r}; the config has "
                                 f"algo={config.algo!r}")
        train_fn(config, workdir_flag.value)

    flags.mark_flags_as_required(["config"])
    run_main(main)  # user errors: one line, exit 2 (mr1.entry)
