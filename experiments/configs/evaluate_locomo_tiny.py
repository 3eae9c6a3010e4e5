"""Tiny test config: 1 validation conversation, 2 questions, 2 sessions of memories.

Uses the embedded 135M model (the random "tiny" model has no tokenizer) with very small limits
so an end-to-end test stays well under a minute on CPU.
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("evaluate_locomo_smollm2.py")))


def get_config():
    c = _base["get_config"]()
    c.split = "validation"        # conv-30
    c.max_conversations = 1       # one conversation
    c.max_questions = 2           # two questions
    c.memory.max_sessions = 2     # memories from the first 2 sessions only
    c.memory.num_slots = 64       # small banks
    c.answer.top_k = 3            # 2x3 memories
    c.answer.max_new_tokens = 8   # a few tokens
    c.answer.batch_size = 2       # one generate call
    c.rag_top_k = 3               # for method="rag" variants in tests
    c.full_context_tokens = 200   # for method="full_context" variants in tests
    c.judge = False               # never call a judge in tests
    c.progress = False            # quiet
    return c
