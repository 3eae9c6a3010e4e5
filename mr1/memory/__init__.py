"""The memory bank and what acts on it.

* :mod:`mr1.memory.bank`: fixed-shape slot tensors, pure ops (ADD/UPDATE/DELETE/NOOP), retrieval,
  rendering memories into prompt token segments;
* :mod:`mr1.memory.env`: the gymnax-style Memory Manager environment;
* :mod:`mr1.memory.ops`: parsing the Memory Manager's text into bank actions;
* :mod:`mr1.memory.embedder`: all-MiniLM-L6-v2 in Flax (imported on demand: it loads
  transformers' tokenizer).
"""

from mr1.memory.bank import (FULL_POLICIES, MemoryAction, MemoryBank, OpCode, OpResult, Refusal,
                             RenderTemplate, Rendered, Retrieved, apply_action, apply_actions,
                             apply_actions_batched, empty_bank, make_action,
                             make_render_template, render, retrieve, retrieve_many,
                             stack_actions)
from mr1.memory.env import (EnvParams, EnvState, Episode, MemoryManagerEnv, Observation,
                            make_episode)
from mr1.memory.ops import ParsedOp, ParseResult, Reason, ops_to_actions, parse_ops

__all__ = [
    "FULL_POLICIES", "MemoryAction", "MemoryBank", "OpCode", "OpResult", "Refusal",
    "RenderTemplate", "Rendered", "Retrieved", "apply_action", "apply_actions",
    "apply_actions_batched", "empty_bank", "make_action", "make_render_template", "render",
    "retrieve", "retrieve_many", "stack_actions",
    "EnvParams", "EnvState", "Episode", "MemoryManagerEnv", "Observation", "make_episode",
    "ParsedOp", "ParseResult", "Reason", "ops_to_actions", "parse_ops",
]
