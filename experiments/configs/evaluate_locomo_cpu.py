"""The issue-4 table at CPU scale: the untrained embedded model and each baseline on the FULL
LoCoMo test split (8 conversations, 1,307 questions), with the RL configs' answer budget.

One config, the method picked by the config string (``path:method``):

    python experiments/evaluate.py --config=experiments/configs/evaluate_locomo_cpu.py:memory \
        --workdir=runs/cpu_memory        # Memory-R1 pipeline, untrained, observations ADDed
    python experiments/evaluate.py --config=experiments/configs/evaluate_locomo_cpu.py:mem0 \
        --workdir=runs/cpu_mem0          # Mem0-style prompted JSON manager (no RL)
    python experiments/evaluate.py --config=experiments/configs/evaluate_locomo_cpu.py:rag \
        --workdir=runs/cpu_rag           # LoCoMo-style RAG over raw turns
    python experiments/evaluate.py \
        --config=experiments/configs/evaluate_locomo_cpu.py:full_context --workdir=runs/cpu_fc

CPU-scale choices, shared by every method so the columns compare: 2 x 5 memories (or 10
turns for RAG) per question, 32 new tokens, greedy; the manager sees 5 related memories and
writes up to 64 tokens. A LoCoMo test conversation (26k-34k tokens with its dates) does not
fit SmolLM2's 8,192-token window, so ``full_context`` keeps the newest turns that fit (~7.6k
tokens), prefilled once per conversation and shared by its questions (``share_prefix`` in
``mr1.sampling.generate``). The paper-scale settings are ``evaluate_locomo_smollm2*.py``.
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("evaluate_locomo_smollm2.py")))

#: method name -> overrides of the base config (dotted keys).
METHODS = {
    "memory": {},
    "mem0": {"memory.manager": "llm", "memory.manager_format": "json"},
    "rag": {"method": "rag"},
    "full_context": {"method": "full_context"},
}


def get_config(method: str = "memory"):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {sorted(METHODS)}")
    c = _base["get_config"]()
    c.max_questions_per_conversation = 0   # the full split
    c.answer.top_k = 5                     # memories per speaker, as in the RL configs
    c.answer.max_new_tokens = 32           # as in the RL configs
    c.answer.batch_size = 16
    c.rag_top_k = 10                       # as many turns as memories (2 x 5)
    c.memory.retrieve_k = 5                # related memories shown to the manager
    c.memory.manager_max_new_tokens = 64   # one JSON op with its text
    c.update_from_flattened_dict(METHODS[method])
    return c
