"""The Memory Manager ablation grid on the LoCoMo test split, sized for a 2-core CPU.

Prompted (base) or RL manager x base or RL Answer Agent, one command per cell (the manager's
banks are built once per manager and resumed from ``memory.dir``):

    python experiments/evaluate.py --config=experiments/configs/evaluate_locomo_memory_ablation.py \
        --config.memory.dir=runs/abl/mem_prompted --workdir=runs/abl/prompted_base
    python experiments/evaluate.py --config=experiments/configs/evaluate_locomo_memory_ablation.py \
        --config.memory.dir=runs/abl/mem_prompted --config.checkpoint=runs/grpo_answer/best \
        --workdir=runs/abl/prompted_rl
    python experiments/evaluate.py --config=experiments/configs/evaluate_locomo_memory_ablation.py \
        --config.memory.dir=runs/abl/mem_rl --config.memory.manager_checkpoint=runs/grpo_memory/best \
        --workdir=runs/abl/rl_base
    python experiments/evaluate.py --config=experiments/configs/evaluate_locomo_memory_ablation.py \
        --config.memory.dir=runs/abl/mem_rl --config.memory.manager_checkpoint=runs/grpo_memory/best \
        --config.checkpoint=runs/grpo_answer/best --workdir=runs/abl/rl_rl

Without memory distillation (the paper's ablation: the Answer Agent's prompt asks for the
``**Answer:**`` line only, ``--config.answer.distill=False``; results.json records
``"distill": false``), on the RL manager's banks: the base Answer Agent, the RL one (trained
with distillation), and one trained without it:

    python experiments/grpo_answer.py --config=experiments/configs/locomo_smollm2_135m_grpo.py \
        --config.answer.distill=False --workdir=runs/grpo_answer_nodistill

    python experiments/evaluate.py --config=experiments/configs/evaluate_locomo_memory_ablation.py \
        --config.memory.dir=runs/abl/mem_rl --config.memory.manager_checkpoint=runs/grpo_memory/best \
        --config.answer.distill=False --workdir=runs/abl/rl_base_nodistill
    python experiments/evaluate.py --config=experiments/configs/evaluate_locomo_memory_ablation.py \
        --config.memory.dir=runs/abl/mem_rl --config.memory.manager_checkpoint=runs/grpo_memory/best \
        --config.checkpoint=runs/grpo_answer/best --config.answer.distill=False \
        --workdir=runs/abl/rl_rl_nodistill
    python experiments/evaluate.py --config=experiments/configs/evaluate_locomo_memory_ablation.py \
        --config.memory.dir=runs/abl/mem_rl --config.memory.manager_checkpoint=runs/grpo_memory/best \
        --config.checkpoint=runs/grpo_answer_nodistill/best --config.answer.distill=False \
        --workdir=runs/abl/rl_rlnodistill_nodistill

Same prompts and budgets as the RL configs (observations as facts; the manager given the
paper's JSON prompt with the 5 most similar memories, its reply forced up to the op word and
the op word constrained, ``memory.manager_format="json_op"``;
2 x 5 memories and 32 new tokens for the answer) and the same 128 seeded test questions as
``evaluate_locomo_rl.py`` (16 per test conversation; every fact of the 8 conversations, 2,188,
goes through the manager); ``--config.max_questions_per_conversation=0`` answers all 1,307.
``--config.memory.manager=add_all`` gives the no-manager reference (every fact ADDed),
``--config.memory.manager_format=json`` the paper's JSON prompt with a free reply and
``--config.memory.manager_format=op`` the one-word prompt.
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("evaluate_locomo_rl.py")))


def get_config():
    c = _base["get_config"]()
    c.memory.manager = "llm"            # the Memory Manager decides every fact's op
    c.memory.retrieve_k = 5             # as in locomo_smollm2_135m_grpo_memory.py
    c.memory.manager_format = "json_op"  # as in locomo_smollm2_135m_grpo_memory.py
    c.memory.manager_max_new_tokens = 64
    return c
