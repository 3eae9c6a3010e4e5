"""MSC (MSC-Self-Instruct), zero-shot, embedded SmolLM2-135M-Instruct, memory method.

    python experiments/evaluate.py --config=experiments/configs/evaluate_msc_smollm2.py \
        --workdir=runs/msc_smollm2

The paper evaluates MSC zero-shot with the agents trained on LoCoMo: give the LoCoMo runs'
checkpoints, e.g. ``--config.checkpoint=runs/grpo_answer/best --config.memory.manager=llm
--config.memory.manager_checkpoint=runs/grpo_memory/best``.

**Data.** MemGPT's ``msc_self_instruct.jsonl`` (500 five-session chats, one question each; the
DMR benchmark), found as ``$MR1_DATA_DIR/msc/msc_self_instruct.jsonl`` (gzip content is read
too), or downloaded once while online with ``python -m mr1.data.paths download msc_self_instruct``
(HF ``MemGPT/MSC-Self-Instruct`` at a pinned revision, sha256-checked), or given with
``--config.data_path``. This project's ``shared/data`` does NOT have it (``SOURCES.md`` §3:
no public snapshot was found; ``msc/msc_personas_all.json`` there is persona sets only and
cannot serve), so without one of those the run stops with a DataNotFoundError saying this.

Memories: the persona lines of each earlier session (the loader's observations) added as-is,
the cheap analogue of LoCoMo's observations; ``memory.facts="llm"`` extracts facts from the
turns instead. All questions are one kind (table row ``dmr``). Defaults are a CPU-sized run:
20 seeded-random chats.
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("evaluate_locomo_smollm2.py")))


def get_config():
    c = _base["get_config"]()
    c.benchmark = "msc"
    c.max_conversations = 20               # 20 chats, one question each; 0 = all 500
    c.conversation_sampling = "random"     # seeded sample
    c.memory.facts = "observations"        # persona lines of the earlier sessions
    c.answer.top_k = 5                     # 2x5 memories keep the prefill short on CPU
    c.answer.max_new_tokens = 64           # room for a short distillation + answer line
    c.answer.batch_size = 20               # one generate call
    return c
