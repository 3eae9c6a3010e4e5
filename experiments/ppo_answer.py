"""PPO (actor + linear critic, GAE) for the Memory-R1 Answer Agent on LoCoMo.

    python experiments/ppo_answer.py \
        --config=experiments/configs/locomo_smollm2_135m_ppo.py --workdir=runs/ppo_answer

Same outputs and resume behaviour as ``grpo_answer.py``.
"""

from mr1.rl.cli import run_trainer
from mr1.rl.trainer import train

if __name__ == "__main__":
    run_trainer(train, "ppo", default_workdir="runs/ppo_answer")
