"""Memory Managers by name: the LLM manager and the rule baselines that share its budget.

``memory.manager`` names one entry of :data:`MANAGERS`. The LLM manager (``"llm"``: the
prompted model, or an RL checkpoint via ``memory.manager_checkpoint``) is run by
:class:`mr1.agents.pipeline.MemoryBuilder` in batched generate calls; every other entry is a
rule that decides one op per fact, applied at once (so the next fact sees it):

* ``add_all``       -- ADD every fact; a full bank then refuses or evicts per
                       ``memory.full_policy`` (``refuse`` | ``evict_lru`` | ``evict_fifo``);
* ``merge_similar`` -- ADD while there is room; on a full bank UPDATE the most similar memory
                       to ``"<memory>; <fact>"`` (the fact is merged, nothing is lost);
* ``skip_similar``  -- NOOP when the nearest memory's cosine with the fact is
                       ``>= memory.skip_tau`` (a near-duplicate), else ADD;
* ``oracle``        -- ADD only facts whose evidence turns are gold evidence for some question
                       of the conversation, else NOOP: an upper bound that reads the answers'
                       evidence, reported, never trained on.

A rule is ``decide(view: FactView) -> ParsedOp`` over the speaker's bank as it is now; its
:class:`ManagerSpec` also names the config fields that belong to the banks' identity.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mr1.memory import bank as B
from mr1.memory.ops import ParsedOp


@dataclasses.dataclass(frozen=True)
class FactView:
    """What a rule manager sees for one fact.

    text: the fact; embedding [D]: its embedding; evidence: its dialogue turn ids
    (``D<s>:<t>``); bank / texts: the speaker's bank now and its full texts by slot;
    gold_evidence: the evidence ids of the conversation's questions (for the oracle only);
    params: the ``memory`` config (thresholds).
    """

    text: str
    embedding: np.ndarray
    evidence: tuple[str, ...]
    bank: B.MemoryBank
    texts: Sequence[str | None]
    gold_evidence: frozenset[str]
    params: Mapping


_nearest = jax.jit(lambda bank, q: B.retrieve_many(bank, q[None], 1))


def nearest(view: FactView) -> tuple[int, float] | None:
    """``(slot, cosine)`` of the memory most similar to the fact, None for an empty bank."""
    r = jax.device_get(_nearest(view.bank, jnp.asarray(view.embedding, jnp.float32)))
    if not bool(r.mask[0, 0]):
        return None
    return int(r.indices[0, 0]), float(r.scores[0, 0])


def _add(view: FactView) -> ParsedOp:
    return ParsedOp(op=B.OpCode.ADD, text=view.text, event="ADD")


def _noop() -> ParsedOp:
    return ParsedOp(op=B.OpCode.NOOP, event="NONE")


def add_all(view: FactView) -> ParsedOp:
    """ADD every fact (the full policy handles a full bank)."""
    return _add(view)


def merge_similar(view: FactView) -> ParsedOp:
    """ADD while there is room; on a full bank merge the fact into its nearest memory."""
    near = nearest(view) if bool(np.asarray(view.bank.valid).all()) else None
    if near is None:
        return _add(view)
    slot = near[0]
    old = view.texts[slot] or ""
    return ParsedOp(op=B.OpCode.UPDATE, id=slot, text=f"{old}; {view.text}", old_memory=old,
                    event="UPDATE")


def skip_similar(view: FactView) -> ParsedOp:
    """NOOP for a near-duplicate (nearest cosine >= ``skip_tau``), else ADD."""
    near = nearest(view)
    if near is not None and near[1] >= float(view.params.get("skip_tau", 0.75)):
        return _noop()
    return _add(view)


def oracle(view: FactView) -> ParsedOp:
    """ADD a fact that is gold evidence for some question, NOOP otherwise (upper bound)."""
    if any(e.strip() in view.gold_evidence for e in view.evidence):
        return _add(view)
    return _noop()


@dataclasses.dataclass(frozen=True)
class ManagerSpec:
    """One manager: ``decide`` (None: the LLM manager, run by the pipeline in batches), the
    ``memory.*`` fields that change its banks (part of the memory dir identity) and whether
    it reads the questions' gold evidence (never to be trained on)."""

    decide: Callable[[FactView], ParsedOp] | None
    identity_fields: tuple[str, ...] = ()
    reads_gold: bool = False


MANAGERS: dict[str, ManagerSpec] = {
    "add_all": ManagerSpec(add_all),
    "llm": ManagerSpec(None),
    "merge_similar": ManagerSpec(merge_similar),
    "skip_similar": ManagerSpec(skip_similar, identity_fields=("skip_tau",)),
    "oracle": ManagerSpec(oracle, reads_gold=True),
}


def manager_spec(name: str) -> ManagerSpec:
    """The :class:`ManagerSpec` of ``name``; a KeyError lists the known ones."""
    if name not in MANAGERS:
        raise KeyError(f"unknown memory manager {name!r}; known: {sorted(MANAGERS)}")
    return MANAGERS[name]
