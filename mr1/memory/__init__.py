"""The memory bank and what acts on it.

* :mod:`mr1.memory.bank`: fixed-shape slot tensors, pure ops (ADD/UPDATE/DELETE/NOOP), retrieval,
  rendering memories into prompt token segments;
* :mod:`mr1.memory.env`: the gymnax-style Memory Manager environment; its ``transition`` is
  the one place a manager op changes a bank;
* :mod:`mr1.memory.episodes`: G op sequences from one bank snapshot (vmapped ``env.step``),
  window questions and the episode reward;
* :mod:`mr1.memory.store`: host-side banks with their texts, counted op application
  (refusals, evictions, truncations), memory dirs (save/load, identity, manifest);
* :mod:`mr1.memory.managers`: the Memory Managers by name (LLM, rule baselines, oracle);
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
                            make_episode, one_fact_params, step_once, transition)
from mr1.memory.ops import ParsedOp, ParseResult, Reason, ops_to_actions, parse_ops

__all__ = [
    "FULL_POLICIES", "MemoryAction", "MemoryBank", "OpCode", "OpResult", "Refusal",
    "RenderTemplate", "Rendered", "Retrieved", "apply_action", "apply_actions",
    "apply_actions_batched", "empty_bank", "make_action", "make_render_template", "render",
    "retrieve", "retrieve_many", "stack_actions",
    "EnvParams", "EnvState", "Episode", "MemoryManagerEnv", "Observation", "make_episode",
    "one_fact_params", "step_once", "transition",
    "ParsedOp", "ParseResult", "Reason", "ops_to_actions", "parse_ops",
]
