"""Tiny Memory Manager RL config for tests: a random 2-layer model with the embedded
tokenizer, a few facts, 2 steps; runs in seconds on CPU. ``--config.algo=ppo`` for PPO."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("locomo_smollm2_135m_grpo_memory.py")))


def get_config():
    c = _base["get_config"]()
    c.model = "tiny-smollm2"            # random weights, SmolLM2 vocabulary
    c.tokenizer = "embedded"
    c.num_steps = 2
    c.progress = False
    c.data.max_train_samples = 6
    c.memory.num_slots = 128
    c.memory.retrieve_k = 2
    c.manager.max_new_tokens = 8
    c.answer.top_k = 2
    c.answer.max_new_tokens = 4
    c.answer.batch_size = 8
    c.rollout.prompts_per_step = 2
    c.rollout.group_size = 4
    c.rollout.microbatch_prompts = 1
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 0
    c.eval.every = 1
    c.eval.num_samples = 3
    c.eval.batch_size = 4
    c.checkpoint_every = 1
    return c
