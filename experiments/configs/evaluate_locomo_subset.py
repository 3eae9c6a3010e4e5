"""A LoCoMo test-split subset for the embedded model that runs in a few minutes on CPU.

4 conversations x 10 seeded-random questions (40), observations + add_all memories, 2x5
memories per question, 64-token answers.
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("evaluate_locomo_smollm2.py")))


def get_config():
    c = _base["get_config"]()
    c.max_conversations = 4                # first 4 test conversations
    c.max_questions_per_conversation = 10  # 10 per conversation
    c.question_sampling = "random"         # seeded sample (categories mixed)
    c.answer.top_k = 5                     # 2x5 memories keep the prefill short on CPU
    c.answer.max_new_tokens = 64           # room for a short distillation + answer line
    c.answer.batch_size = 20               # 2 generate calls
    return c
