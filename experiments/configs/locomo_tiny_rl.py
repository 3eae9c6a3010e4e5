"""Tiny RL config for tests: a random 2-layer model with the embedded tokenizer, a few
questions, 2 steps; runs in seconds on CPU. ``--config.algo=ppo`` for PPO."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("locomo_smollm2_135m_grpo.py")))


def get_config():
    c = _base["get_config"]()
    c.model = "tiny-smollm2"            # random weights, SmolLM2 vocabulary
    c.tokenizer = "embedded"            # the embedded GGUF's tokenizer
    c.num_steps = 4
    c.progress = False
    c.data.max_train_questions = 8
    c.memory.num_slots = 64
    c.answer.top_k = 2
    c.answer.max_new_tokens = 8
    c.rollout.prompts_per_step = 2
    c.rollout.group_size = 4
    c.rollout.microbatch_prompts = 1
    c.optim.learning_rate = 1e-3        # visible parameter changes in a few steps
    c.optim.warmup_steps = 0
    c.eval.every = 2
    c.eval.num_questions = 4
    c.eval.batch_size = 4
    c.checkpoint_every = 1
    c.optim.epochs = 1                  # the tests' reference update (1 x 1); 2 x 2 is
    c.optim.minibatches = 1             # set per test
    return c
