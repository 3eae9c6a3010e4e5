"""GRPO for the Memory-R1 Answer Agent on LoCoMo.

    python experiments/grpo_answer.py \
        --config=experiments/configs/locomo_smollm2_135m_grpo.py --workdir=runs/grpo_answer

Re-running with the same ``--workdir`` resumes from the latest checkpoint. Writes
``metrics.csv``, ``tb/`` (TensorBoard), ``checkpoints/``, ``curves.png`` and ``summary.json``.
Evaluate the result with ``experiments/evaluate.py --config.checkpoint=<workdir>/checkpoints``.
"""

from mr1.rl.cli import run_trainer
from mr1.rl.trainer import train

if __name__ == "__main__":
    run_trainer(train, "grpo", default_workdir="runs/grpo_answer")
