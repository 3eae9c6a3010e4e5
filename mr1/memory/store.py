"""Host-side banks: texts beside the slot tensors, counted op application, memory dirs.

* :class:`SpeakerMemory` -- one speaker's :class:`~mr1.memory.bank.MemoryBank` plus the full
  memory texts and session dates indexed by slot (the tensors keep only ``max_len`` tokens);
* :func:`apply_ops` -- applies a batch of manager actions, op by op, through the environment's
  one transition (:func:`mr1.memory.env.transition`), keeps the texts in step and counts what
  happened in :class:`BuildStats`: ops, refusals by reason (a full bank under the ``refuse``
  policy is ``bank_full``), **evictions** (an ADD into a full bank under ``evict_lru`` /
  ``evict_fifo``) and **truncations** (a memory text longer than ``max_len`` tokens). Nothing
  is dropped silently;
* a memory dir -- ``<dir>/<sample_id>/`` (``memory.json`` + ``banks.npz`` + ``DONE``) per
  conversation (:func:`save_memory` / :func:`load_memory`), ``manager.json`` naming who built
  the banks under which budget (:func:`bank_identity`, :func:`claim_memory_dir`) and
  ``manifest.json`` summing every finished conversation's counts (:func:`write_manifest`).

A dir's identity covers the manager (mode, checkpoint, model, facts, its own parameters) and
the budget: slots per speaker, full policy, tokens per memory and the session limit, so a run
with other values never resumes old banks.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mr1.memory import bank as B
from mr1.memory.env import transition
from mr1.fileio import write_json_atomic
from mr1.run_identity import RunIdentityError

BANK_FIELDS = ("tokens", "lengths", "valid", "embeddings", "speaker", "created", "updated",
               "step")
DONE = "DONE"
MANAGER_FILE = "manager.json"
MANIFEST_FILE = "manifest.json"


@dataclasses.dataclass
class SpeakerMemory:
    """One speaker's bank plus the host-side full texts and timestamps indexed by slot."""

    name: str
    index: int
    bank: B.MemoryBank
    texts: list[str | None]
    timestamps: list[str]

    def items(self) -> list[tuple[int, str, str]]:
        """``(slot, text, timestamp)`` of every valid memory, by slot."""
        valid = np.asarray(self.bank.valid)
        return [(i, self.texts[i] or "", self.timestamps[i]) for i in np.flatnonzero(valid)]


def new_speaker_memory(name: str, index: int, cfg, dim: int, pad_id: int = 0) -> SpeakerMemory:
    """An empty bank of ``cfg.num_slots`` slots (``cfg.max_len`` tokens, ``cfg.full_policy``)."""
    bank = B.empty_bank(cfg.num_slots, cfg.max_len, dim, pad_id=pad_id,
                        full_policy=cfg.full_policy)
    return SpeakerMemory(name, index, bank, [None] * cfg.num_slots, [""] * cfg.num_slots)


@dataclasses.dataclass
class BuildStats:
    """What building a conversation's banks did (summed over both speakers).

    ``ops``: applied ops (and NOOPs) by name; ``invalid``: manager outputs the parser rejected,
    by reason; ``refused``: ops the bank refused, by :class:`~mr1.memory.bank.Refusal` name
    (``bank_full``: an ADD into a full bank under ``refuse``); ``evicted``: memories
    overwritten by an ADD into a full bank; ``truncated``: written texts cut to ``max_len``
    tokens.
    """

    facts: int = 0
    manager_calls: int = 0
    ops: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    invalid: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    refused: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped_facts: int = 0
    evicted: int = 0
    truncated: int = 0

    @property
    def num_invalid(self) -> int:
        return sum(self.invalid.values()) + sum(self.refused.values())

    @property
    def capacity(self) -> dict[str, int]:
        """The full-bank and length events: ``bank_full`` refusals, evictions, truncations."""
        return {"bank_full": self.refused.get(B.Refusal.BANK_FULL.name.lower(), 0),
                "evicted": self.evicted, "truncated": self.truncated}

    def to_dict(self) -> dict[str, Any]:
        return {"facts": self.facts, "manager_calls": self.manager_calls, "ops": dict(self.ops),
                "invalid": dict(self.invalid), "refused": dict(self.refused),
                "skipped_facts": self.skipped_facts, "num_invalid": self.num_invalid,
                "evicted": self.evicted, "truncated": self.truncated}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BuildStats":
        return cls(facts=d.get("facts", 0), manager_calls=d.get("manager_calls", 0),
                   ops=collections.Counter(d.get("ops", {})),
                   invalid=collections.Counter(d.get("invalid", {})),
                   refused=collections.Counter(d.get("refused", {})),
                   skipped_facts=d.get("skipped_facts", 0), evicted=d.get("evicted", 0),
                   truncated=d.get("truncated", 0))

    def summary(self) -> str:
        """One log line: facts, ops and the capacity events."""
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items())) or "none"
        c = self.capacity
        return (f"{self.facts} facts; ops {ops}; full bank: {c['bank_full']} ADDs refused, "
                f"{c['evicted']} memories evicted; {c['truncated']} texts truncated")


@dataclasses.dataclass
class ConversationMemory:
    """The banks of one conversation (speaker_a first), how they were built and under which
    budget (``num_slots``, ``max_len``, ``full_policy``, ``max_sessions``; saved with them)."""

    sample_id: str
    speakers: list[SpeakerMemory]
    stats: BuildStats
    budget: dict[str, Any] = dataclasses.field(default_factory=dict)

    def by_name(self, name: str) -> SpeakerMemory | None:
        return next((s for s in self.speakers if s.name == name), None)


# ----------------------------------------------------------------------------- applying ops

_transition = jax.jit(transition)


def apply_ops(mem: SpeakerMemory, actions: B.MemoryAction, texts: Sequence[str],
              timestamp: str, stats: BuildStats) -> list[B.OpResult]:
    """Applies batched ``actions [N]`` in order through :func:`mr1.memory.env.transition`;
    keeps ``mem.texts`` in step with the bank and counts every outcome in ``stats``.

    ``texts[i]`` is the text written by action ``i`` (ignored unless it is an ADD/UPDATE).
    Refusals are counted in ``stats.refused`` by :class:`~mr1.memory.bank.Refusal` name, an
    ADD that evicted a memory in ``stats.evicted`` (the slot's text is replaced by the new
    one), a text cut to ``max_len`` tokens in ``stats.truncated``.
    """
    results = []
    n = int(np.asarray(actions.op).shape[0])
    for i in range(n):
        act = jax.tree.map(lambda x: jnp.asarray(x[i]), actions)
        mem.bank, res = _transition(mem.bank, act)
        res = jax.device_get(res)
        record_result(mem, int(act.op), res, texts[i], timestamp, stats)
        results.append(res)
    return results


def record_result(mem: SpeakerMemory, op: int, res: B.OpResult, text: str, timestamp: str,
                  stats: BuildStats) -> None:
    """The host side of one applied op (``res``: its host :class:`OpResult`, the bank
    already updated): ``mem.texts`` / ``timestamps`` follow the written or cleared slot and
    ``stats`` counts the outcome (refusal by reason, op, eviction, truncation)."""
    code = B.OpCode(op) if 0 <= op < len(B.OpCode) else None
    if bool(res.refused):
        stats.refused[B.Refusal(int(res.reason)).name.lower()] += 1
    elif bool(res.applied) and code is not None:
        stats.ops[code.name] += 1
        slot = int(res.slot)
        stats.evicted += int(int(res.evicted) >= 0)
        stats.truncated += int(bool(res.truncated))
        if code in (B.OpCode.ADD, B.OpCode.UPDATE):
            mem.texts[slot] = text
            mem.timestamps[slot] = timestamp
        elif code == B.OpCode.DELETE:
            mem.texts[slot] = None
            mem.timestamps[slot] = ""
    elif code == B.OpCode.NOOP:
        stats.ops["NOOP"] += 1


# ----------------------------------------------------------------------------- save / load

def save_memory(mem: ConversationMemory, directory: str | os.PathLike) -> pathlib.Path:
    """Atomically writes ``directory/<sample_id>/`` (``memory.json`` + ``banks.npz``) and a
    ``DONE`` marker last; a rerun skips conversations whose marker exists."""
    root = pathlib.Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / mem.sample_id
    tmp = root / f".{mem.sample_id}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = {"sample_id": mem.sample_id, "stats": mem.stats.to_dict(), "budget": mem.budget,
            "speakers": [{"name": s.name, "index": s.index, "texts": s.texts,
                          "timestamps": s.timestamps, "pad_id": s.bank.pad_id,
                          "full_policy": s.bank.full_policy} for s in mem.speakers]}
    (tmp / "memory.json").write_text(json.dumps(meta))
    arrays = {f"{s.index}/{f}": np.asarray(getattr(s.bank, f))
              for s in mem.speakers for f in BANK_FIELDS}
    with open(tmp / "banks.npz", "wb") as fh:
        np.savez(fh, **arrays)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    (final / DONE).write_text("ok\n")
    return final


def is_done(directory: str | os.PathLike, sample_id: str) -> bool:
    return (pathlib.Path(directory) / sample_id / DONE).is_file()


def load_memory(directory: str | os.PathLike, sample_id: str) -> ConversationMemory:
    path = pathlib.Path(directory) / sample_id
    if not (path / DONE).is_file():
        raise FileNotFoundError(f"no finished memory for {sample_id} under {directory}")
    meta = json.loads((path / "memory.json").read_text())
    arrays = np.load(path / "banks.npz")
    speakers = []
    for s in meta["speakers"]:
        fields = {f: jnp.asarray(arrays[f"{s['index']}/{f}"]) for f in BANK_FIELDS}
        bank = B.MemoryBank(**fields, pad_id=s["pad_id"], full_policy=s["full_policy"])
        speakers.append(SpeakerMemory(s["name"], s["index"], bank, s["texts"], s["timestamps"]))
    budget = meta.get("budget") or {}
    if speakers:   # banks saved before the budget was: what their tensors tell
        b = speakers[0].bank
        budget = {"num_slots": b.num_slots, "max_len": b.max_len,
                  "full_policy": b.full_policy, **budget}
    return ConversationMemory(meta["sample_id"], speakers, BuildStats.from_dict(meta["stats"]),
                              budget)


def budget_mismatch(found: Mapping[str, Any], want: Mapping[str, Any]) -> dict[str, tuple]:
    """``field -> (found, wanted)`` for the budget fields both name and that differ."""
    return {k: (found[k], want[k]) for k in want if k in found and found[k] != want[k]}


# ----------------------------------------------------------------------------- identity

def bank_identity(*, manager: str, manager_checkpoint: str, model: str, facts: str,
                  num_slots: int, max_len: int, full_policy: str, max_sessions: int | None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Who built a memory dir's banks, under which budget (``manager.json``).

    ``extra`` adds manager-specific fields (a reply form, a similarity threshold, the
    benchmark data); any difference means other banks.
    """
    identity = {"manager": manager,
                "manager_checkpoint": os.path.normpath(manager_checkpoint)
                if manager_checkpoint else "",
                "model": model, "facts": facts, "num_slots": int(num_slots),
                "full_policy": full_policy, "max_len": int(max_len),
                "max_sessions": int(max_sessions or 0)}
    identity.update(extra or {})
    return identity


def claim_memory_dir(directory: str | os.PathLike, identity: Mapping[str, Any]) -> bool:
    """Writes ``identity`` to ``directory/manager.json``, or checks the one already there.

    Returns whether the directory was already claimed (False: written now; a directory of
    banks from before ``manager.json`` existed is accepted and claimed as it is).

    Raises:
      RunIdentityError: (a ValueError) the directory holds banks of another identity (the message names the
        fields that differ).
    """
    path = pathlib.Path(directory) / MANAGER_FILE
    identity = dict(identity)
    if path.is_file():
        found = json.loads(path.read_text())
        if found != identity:
            diff = sorted(k for k in set(found) | set(identity) if found.get(k) != identity.get(k))
            detail = ", ".join(f"{k}: {found.get(k)!r} there, {identity.get(k)!r} now"
                               for k in diff)
            raise RunIdentityError(
                f"memory dir {directory} was built by {found}, not {identity} ({detail}); "
                "pick another --config.memory.dir (or --workdir) for this manager")
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity, indent=1) + "\n")
    return False


def write_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Writes ``directory/manifest.json``: the identity and, per finished conversation and in
    total, facts, ops, refusals, evictions and truncations. Atomic (temp file + rename)."""
    root = pathlib.Path(directory)
    convs = {}
    for done in sorted(root.glob(f"*/{DONE}")):
        meta = json.loads((done.parent / "memory.json").read_text())
        stats = BuildStats.from_dict(meta["stats"])
        convs[meta["sample_id"]] = {**stats.to_dict(), **stats.capacity}
    total = sum_stats([BuildStats.from_dict(d) for d in convs.values()])
    ident = root / MANAGER_FILE
    manifest = {"identity": json.loads(ident.read_text()) if ident.is_file() else None,
                "conversations": convs, "total": {**total.to_dict(), **total.capacity}}
    write_json_atomic(root / MANIFEST_FILE, manifest, indent=1)
    return manifest


def sum_stats(stats: Sequence[BuildStats]) -> BuildStats:
    """The sum of several conversations' :class:`BuildStats`."""
    total = BuildStats()
    for s in stats:
        total.facts += s.facts
        total.manager_calls += s.manager_calls
        total.ops += s.ops
        total.invalid += s.invalid
        total.refused += s.refused
        total.skipped_facts += s.skipped_facts
        total.evicted += s.evicted
        total.truncated += s.truncated
    return total


def evidence_coverage(memory: ConversationMemory, observations: Sequence[Any],
                      qas: Sequence[Any]) -> tuple[int, int]:
    """``(covered, n)``: how many of the ``n`` questions ``qas`` (with ``.evidence``) have a
    fact of one of their evidence turns in ``memory``'s banks -- what a budget kept of what the
    questions need, whatever the Answer Agent makes of it. Facts are ``observations`` (with
    ``.text`` and ``.evidence``); a fact counts when its text is part of a valid memory (so a
    fact merged into another memory counts too).
    """
    held = [t for s in memory.speakers for _, t, _ in s.items()]
    kept_turns = set()
    for o in observations:
        if o.text.strip() and any(o.text in t for t in held):
            kept_turns.update(e.strip() for e in o.evidence)
    covered = sum(any(e.strip() in kept_turns for e in qa.evidence) for qa in qas)
    return covered, len(qas)
