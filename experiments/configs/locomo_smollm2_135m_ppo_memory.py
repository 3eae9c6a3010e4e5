"""PPO for the Memory Manager: the GRPO memory config with ``algo="ppo"`` (the linear critic
and learning rates of ``locomo_smollm2_135m_ppo.py``).

    python experiments/ppo_memory.py \
        --config=experiments/configs/locomo_smollm2_135m_ppo_memory.py \
        --config.answer.checkpoint=runs/grpo_answer/best --workdir=runs/ppo_memory
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("locomo_smollm2_135m_grpo_memory.py")))


def get_config():
    c = _base["get_config"]()
    c.algo = "ppo"
    return c
