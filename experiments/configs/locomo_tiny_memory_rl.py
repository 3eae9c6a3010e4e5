"""Tiny Memory Manager RL config for tests: a random 2-layer model with the embedded
tokenizer, a few facts, 2 steps; runs in seconds on CPU. ``--config.algo=ppo`` for PPO."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("locomo_smollm2_135m_grpo_memory.py")))

#: what makes a Memory Manager config tiny (shared with ``locomo_tiny_memory_budget.py``): random
#: weights with the SmolLM2 vocabulary, short answers, visible updates in 2 steps.
TINY_MANAGER = {
    "model": "tiny-smollm2", "tokenizer": "embedded", "num_steps": 2, "progress": False,
    "memory.retrieve_k": 2, "answer.top_k": 2, "answer.max_new_tokens": 4,
    "answer.batch_size": 8, "optim.learning_rate": 1e-3, "optim.warmup_steps": 0,
    "eval.every": 1, "eval.batch_size": 4, "checkpoint_every": 1,
}


def get_config():
    c = _base["get_config"]()
    c.update_from_flattened_dict(TINY_MANAGER)
    c.data.max_train_samples = 6
    c.memory.num_slots = 128
    c.manager.max_new_tokens = 8
    c.rollout.prompts_per_step = 2
    c.rollout.group_size = 4
    c.rollout.microbatch_prompts = 1
    c.eval.num_samples = 3
    return c
