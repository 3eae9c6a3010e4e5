"""LoCoMo test split, embedded SmolLM2-135M-Instruct, full context (newest turns that fit)."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("evaluate_locomo_smollm2.py")))


def get_config():
    c = _base["get_config"]()
    c.method = "full_context"   # all turns that fit, truncated from the start
    c.full_context_tokens = 0   # 0 = model window (8192) - answer budget - 512
    # one conversation's context is prefilled once and shared by its questions (share_prefix)
    return c
