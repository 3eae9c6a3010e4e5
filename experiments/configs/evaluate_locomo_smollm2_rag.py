"""LoCoMo test split, embedded SmolLM2-135M-Instruct, RAG over raw turns (top-k by embedding)."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("evaluate_locomo_smollm2.py")))


def get_config():
    c = _base["get_config"]()
    c.method = "rag"     # LoCoMo-style RAG: top rag_top_k turns, in dialogue order
    c.rag_top_k = 20     # turns per question
    return c
