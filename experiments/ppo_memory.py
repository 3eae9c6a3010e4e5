"""PPO for the Memory-R1 Memory Manager on LoCoMo (a frozen Answer Agent gives the reward).

    python experiments/ppo_memory.py \
        --config=experiments/configs/locomo_smollm2_135m_ppo_memory.py \
        --config.answer.checkpoint=runs/grpo_answer/best --workdir=runs/ppo_memory

Re-running with the same ``--workdir`` resumes from the latest checkpoint. Writes
``metrics.csv``, ``tb/``, ``checkpoints/``, ``best/`` (best validation F1), ``curves.png`` and
``summary.json``. Evaluate the manager inside the full pipeline with ``experiments/evaluate.py
--config.memory.manager=llm --config.memory.manager_checkpoint=<workdir>/best``.
"""

from mr1.rl.cli import run_trainer
from mr1.rl.episode_task import train_manager

if __name__ == "__main__":
    run_trainer(train_manager, "ppo", default_workdir="runs/ppo_memory")
