"""PPO for the Memory-R1 Answer Agent on LoCoMo.

    python experiments/ppo_answer.py \
        --config=experiments/configs/locomo_smollm2_135m_ppo.py --workdir=runs/ppo_answer

Re-running with the same ``--workdir`` resumes from the latest checkpoint. Writes
``metrics.csv``, ``tb/`` (TensorBoard), ``checkpoints/``, ``curves.png`` and ``summary.json``.
Evaluate the result with ``experiments/evaluate.py --config.checkpoint=<workdir>/checkpoints``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from mr1.parallel import maybe_initialize_distributed
from mr1.rl.trainer import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/ppo_answer", "checkpoints, metrics, curves")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    maybe_initialize_distributed()
    config = _CONFIG.value
    if config.algo != "ppo":
        raise app.UsageError(f"ppo_answer.py needs algo='ppo', the config has {config.algo!r}")
    train(config, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
