"""The Answer Agent RL before/after comparison: LoCoMo test split, the RL configs' prompts.

Same memories and prompt as ``locomo_smollm2_135m_{grpo,ppo}.py`` (observations, 2 x 5
memories, 32 new tokens, greedy), on a seeded sample of 16 questions from each of the 8 test
conversations (128; the full 1,307 with ``--config.max_questions_per_conversation=0``):

    python experiments/evaluate.py --config=experiments/configs/evaluate_locomo_rl.py \
        --workdir=runs/eval_base
    python experiments/evaluate.py --config=experiments/configs/evaluate_locomo_rl.py \
        --config.checkpoint=runs/grpo_answer/best --workdir=runs/eval_grpo
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("evaluate_locomo_smollm2.py")))


def get_config():
    c = _base["get_config"]()
    c.max_questions_per_conversation = 16  # per test conversation (0 = all 1,307)
    c.question_sampling = "random"         # seeded, categories mixed
    c.answer.top_k = 5                     # as in the RL configs
    c.answer.max_new_tokens = 32           # as in the RL configs
    c.answer.batch_size = 16               # one generate call per conversation
    return c
