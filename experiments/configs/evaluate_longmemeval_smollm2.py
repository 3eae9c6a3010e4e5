"""LongMemEval (oracle), zero-shot, embedded SmolLM2-135M-Instruct, Memory-R1 memory method.

    python experiments/evaluate.py --config=experiments/configs/evaluate_longmemeval_smollm2.py \
        --workdir=runs/longmemeval_smollm2

The paper evaluates LongMemEval zero-shot with the agents trained on LoCoMo: give the LoCoMo
runs' checkpoints, e.g. ``--config.checkpoint=runs/grpo_answer/best --config.memory.manager=llm
--config.memory.manager_checkpoint=runs/grpo_memory/best``. Nothing here is trained on it.

**Data.** ``longmemeval_oracle.json`` (500 questions, evidence sessions only), found as
``$MR1_DATA_DIR/longmemeval/longmemeval_oracle.json`` -- this project's copy is under
``shared/data/longmemeval/`` (rebuilt from the per-question files of ``hussainzs/Memoria``; see
``shared/data/SOURCES.md``) -- or downloaded once while online with
``python -m mr1.data.paths download longmemeval_oracle`` (HF ``xiaowu0162/longmemeval-cleaned``,
sha256-checked), or given with ``--config.data_path``. ``--config.longmemeval_variant=s`` reads
LongMemEval_S (``longmemeval_s_cleaned.json``, or the local 499-of-500 rebuild
``longmemeval_s_cleaned.499of500.json.gz``; ~50 sessions per question, far slower).

Each question is its own conversation (its haystack; speakers ``user`` / ``assistant``). The
table has one row per question type; results.json's ``abstention`` block scores the 30 ``_abs``
questions (gold: "not enough information ...") apart from the others. LongMemEval ships no
per-session facts, so memories come from the policy's fact extraction (``memory.facts="llm"``,
one prompt per turn) added as-is (``manager="add_all"``); set ``memory.manager="llm"`` for the
Memory Manager. Defaults are a CPU-sized run: 6 seeded-random questions; fact extraction
dominates (one question of 26 turns took ~4.5 min on 2 shared CPU cores), so raise
``max_conversations`` (0 = all 500) on an accelerator.
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("evaluate_locomo_smollm2.py")))


def get_config():
    c = _base["get_config"]()
    c.benchmark = "longmemeval"
    c.longmemeval_variant = "oracle"       # "oracle" | "s"
    c.max_conversations = 6                # 6 questions (one per conversation); 0 = all 500
    c.conversation_sampling = "random"     # seeded sample across the question types
    c.memory.facts = "llm"                 # no ready-made facts in LongMemEval
    c.answer.top_k = 5                     # 2x5 memories keep the prefill short on CPU
    c.answer.max_new_tokens = 64           # room for a short distillation + answer line
    c.answer.batch_size = 16               # prompts per generate call
    return c
