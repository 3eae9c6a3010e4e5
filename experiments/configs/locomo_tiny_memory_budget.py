"""Tiny episode config for tests: the budget config of
``locomo_smollm2_135m_grpo_memory_budget.py`` on a random 2-layer model with the embedded
tokenizer, 4 slots per speaker, the first sessions only; runs in seconds on CPU."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name(
    "locomo_smollm2_135m_grpo_memory_budget.py")))
_tiny = runpy.run_path(str(pathlib.Path(__file__).with_name("locomo_tiny_memory_rl.py")))


def get_config():
    c = _base["get_config"]()
    c.update_from_flattened_dict(_tiny["TINY_MANAGER"])
    c.memory.num_slots = 4
    c.memory.max_sessions = 4        # the first sessions of each conversation
    c.rollout.group_size = 2
    c.rollout.microbatch_prompts = 4
    c.episode.max_questions = 2
    c.episode.sample_batch = 8
    c.eval.num_questions = 3
    return c
