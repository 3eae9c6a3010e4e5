"""Tiny episode config for tests: the budget config of
``locomo_smollm2_135m_grpo_memory_budget.py`` on a random 2-layer model with the embedded
tokenizer, 4 slots per speaker, the first sessions only; runs in seconds on CPU."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name(
    "locomo_smollm2_135m_grpo_memory_budget.py")))


def get_config():
    c = _base["get_config"]()
    c.model = "tiny-smollm2"            # random weights, SmolLM2 vocabulary
    c.tokenizer = "embedded"
    c.num_steps = 2
    c.progress = False
    c.memory.num_slots = 4
    c.memory.max_sessions = 4        # the first sessions of each conversation
    c.memory.retrieve_k = 2
    c.answer.top_k = 2
    c.answer.max_new_tokens = 4
    c.answer.batch_size = 8
    c.rollout.group_size = 2
    c.rollout.microbatch_prompts = 4
    c.episode.max_questions = 2
    c.episode.sample_batch = 8
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 0
    c.eval.every = 1
    c.eval.num_questions = 3
    c.eval.batch_size = 4
    c.checkpoint_every = 1
    return c
