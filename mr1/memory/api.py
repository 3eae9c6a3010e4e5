"""``mr1.Memory``: a persistent, multi-user memory layer around the Memory-R1 agents.

Mem0-shaped::

  from mr1 import Memory
  m = Memory.open("mem/", manager="add_all")             # or "prompted", or <run>/best
  m.add("I moved to Lisbon in May.", user_id="ana")      # -> [{"id", "memory", "event"}]
  m.search("where does Ana live?", user_id="ana")         # -> [{"id", "memory", "score", ...}]
  m.get(id); m.get_all(user_id="ana"); m.delete(id); m.history(id); m.reset(user_id="ana")
  Memory.open("mem/", answer="runs/grpo_answer/best").answer("Where?", user_id="ana")

**Storage.** Everything lives in :mod:`mr1.memory.sqlite_store` (SQLite, WAL). Each user has one
slot-tensor :class:`~mr1.memory.bank.MemoryBank` of ``capacity`` slots, rebuilt from the rows
when another process changed them (``users.version``) and cached otherwise.

**add.** ``messages`` is a string or a list of ``{"role", "content"}`` messages. Facts: with
``manager="add_all"`` each message is one fact; with an LLM manager the manager's model extracts
them (the pipeline's :data:`~mr1.agents.prompts.FACT_EXTRACTION` prompt and
:func:`~mr1.agents.pipeline.parse_facts`). Every fact gets exactly one op: ``add_all`` ADDs it;
an LLM manager sees the fact with the ``retrieve_k`` most similar memories of the user's bank at
the start of the add (as a pipeline session does) and its reply (in ``manager_format``) is
parsed; the first op of a reply is the fact's op. Ops are applied in fact order by the bank's
own :func:`~mr1.memory.bank.apply_actions` (a scan of the ``apply_action`` that training and
evaluation use), one jitted call per add. The result has one entry per fact, ``event`` ADD /
UPDATE / DELETE / NOOP; a NOOP carries ``"reason"`` when the reply was unusable (a
:class:`~mr1.memory.ops.Reason`) or ``"refused"`` when the bank refused the op (a
:class:`~mr1.memory.bank.Refusal` name, e.g. ``bank_full`` under ``full_policy="refuse"``); an
ADD into a full ``evict_lru`` bank is preceded by a ``DELETE`` entry with ``"reason":
"evicted"`` for the memory it replaced.

**Transactions.** One ``Memory`` may be shared by threads (its calls take turns on its one
connection); processes open their own. Facts and their embeddings are computed first; then one
``BEGIN IMMEDIATE`` transaction reads the user's bank, decides and applies the ops, writes rows
and history and commits. A process killed before the commit leaves the store as it was before
the add; a second process's add waits for the lock (``busy_timeout_s``) and then sees the first
one's memories.

**Input rules** (errors are ``ValueError`` / ``TypeError`` with the reason):
``user_id`` a non-empty string; a message longer than ``max_chars`` characters (default
10,000) is an error, never silently cut (the bank's token view keeps the first ``max_len``
tokens and the embedder the first 256, the stored text is whole); empty messages are skipped
and an add with nothing left is an error; an unknown ``memory_id`` raises
:class:`~mr1.memory.sqlite_store.MemoryNotFoundError` (a ``KeyError``); a user who never added
anything has no memories: ``search`` / ``get_all`` return ``[]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import threading
import uuid
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mr1.agents import prompts as P
from mr1.agents.pipeline import SpeakerMemory, make_tokenize, parse_facts
from mr1.memory import bank as B
from mr1.memory.ops import ParsedOp, ops_to_actions, op_choice_tokens, parse_op_choice, parse_ops
from mr1.memory.sqlite_store import MemoryNotFoundError, Row, Store

__all__ = ["Memory", "MemoryNotFoundError", "MAX_CHARS", "DEFAULT_CAPACITY"]

MAX_CHARS = 10_000             # characters per message (longer: ValueError)
DEFAULT_CAPACITY = 1024        # bank slots per user
DEFAULT_MAX_LEN = 64           # tokens per memory in the bank view (as PipelineConfig)
DEFAULT_FULL_POLICY = "evict_lru"
MANAGERS = ("add_all", "prompted")  # or a checkpoint directory
ANSWERS = (None, "base")            # or a checkpoint directory

_retrieve = jax.jit(B.retrieve_many, static_argnums=2)
_apply_many = jax.jit(B.apply_actions, donate_argnums=0)


@dataclasses.dataclass
class _View:
    """A user's bank (with full texts by slot) and the stored rows by slot, as of ``version``."""

    mem: SpeakerMemory
    rows: list[Row | None]
    version: int


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a store is created with (kept in its ``meta`` table; reopening must agree)."""

    capacity: int
    max_len: int
    full_policy: str
    embedding_dim: int


# ----------------------------------------------------------------------------- input checks

def _user(user_id) -> str:
    if not isinstance(user_id, str) or not user_id.strip():
        raise ValueError(f"user_id must be a non-empty string, got {user_id!r}")
    return user_id.strip()


def _text(value, what: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} is empty")
    if len(value) > max_chars:
        raise ValueError(f"{what} has {len(value)} characters; the limit is {max_chars} "
                         "(Memory.open(max_chars=...)); split it into several messages")
    return value.strip()


def messages_of(messages, max_chars: int = MAX_CHARS) -> list[tuple[str, str]]:
    """``(role, content)`` of each non-empty message of ``messages`` (a string, one message
    dict or a list of them; ``role`` defaults to ``"user"``).

    Raises:
      TypeError: not a string / message dict / list of message dicts.
      ValueError: a message over ``max_chars`` characters, or no non-empty message.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    elif isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, (list, tuple)):
        raise TypeError("messages must be a string or a list of {'role', 'content'} dicts, got "
                        f"{type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise TypeError(f"message {i} must be a dict with a string 'content', got {m!r:.80}")
        role = m.get("role", "user")
        if not isinstance(role, str) or not role.strip():
            raise TypeError(f"message {i} has role {role!r}; expected a non-empty string")
        if m["content"].strip():
            out.append((role.strip(), _text(m["content"], f"message {i}", max_chars)))
    if not out:
        raise ValueError("nothing to remember: the messages are empty")
    return out


def timestamp_of(ts=None) -> str:
    """The stored form of an ``add`` timestamp: None -> now (UTC, ISO 8601); a ``datetime``
    (naive = UTC) or epoch seconds -> ISO 8601; a non-empty string is kept as written (e.g.
    LoCoMo's ``"1:56 pm on 8 May, 2023"``: the agents read it as text)."""
    if ts is None:
        return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if isinstance(ts, dt.datetime):
        return (ts if ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)).isoformat()
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")
    if isinstance(ts, str) and ts.strip():
        return ts.strip()
    raise ValueError(f"timestamp must be None, a datetime, epoch seconds or a non-empty "
                     f"string, got {ts!r}")


# ----------------------------------------------------------------------------- agents

def _load_agent(spec: str | None, allowed: tuple, model: str | None, tokenizer: str | None,
                cache: dict):
    """``(policy or None, run config)`` for a manager / answer spec (see :meth:`Memory.open`)."""
    from mr1.models.trained import (DEFAULT_MODEL, is_checkpoint, load_base_policy,
                                    load_trained_policy)

    if spec is None or spec == "add_all":
        return None, {}
    if spec in ("prompted", "base"):
        key = (model or DEFAULT_MODEL, tokenizer or "")
        if key not in cache:
            cache[key] = load_base_policy(*key)
        return cache[key], {}
    if isinstance(spec, (str, os.PathLike)) and is_checkpoint(spec):
        return load_trained_policy(spec, model=model, tokenizer=tokenizer)
    raise ValueError(f"{spec!r} is neither one of {[a for a in allowed if a]} nor a trainer "
                     "checkpoint directory (<run>/best or <run>/checkpoints)")


class Memory:
    """A store of per-user memories, managed by a Memory Manager and read by an Answer Agent.

    Open one with :meth:`open`; see the module docstring for the semantics of every call.
    """

    def __init__(self, store: Store, settings: Settings, embedder, *, manager=None,
                 manager_format: str = "json_op", retrieve_k: int = 10, answer=None,
                 answer_top_k: int = 30, answer_distill: bool = True,
                 max_chars: int = MAX_CHARS, generate_fn: Callable | None = None,
                 batch_size: int = 32, manager_max_new_tokens: int = 96,
                 extract_max_new_tokens: int = 64, answer_max_new_tokens: int = 96,
                 max_facts_per_message: int = 4):
        self.store, self.settings, self.embedder = store, settings, embedder
        self.manager, self.answer_policy = manager, answer
        self.form = P.manager_form(manager_format)
        self.manager_format = manager_format
        self.retrieve_k, self.answer_top_k, self.answer_distill = retrieve_k, answer_top_k, \
            answer_distill
        self.max_chars, self.batch_size = max_chars, batch_size
        self.manager_max_new_tokens = manager_max_new_tokens
        self.extract_max_new_tokens = extract_max_new_tokens
        self.answer_max_new_tokens = answer_max_new_tokens
        self.max_facts_per_message = max_facts_per_message
        if generate_fn is None:
            from mr1.sampling import generate as generate_fn
        self.generate_fn = generate_fn
        token_source = manager if manager is not None else answer
        self.tokenize = make_tokenize(token_source)
        self.pad_id = int(getattr(token_source, "pad_token_id", 0)) if token_source else 0
        self._views: dict[str, _View] = {}
        self._lock = threading.RLock()   # one connection: one transaction at a time

    # ------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike, manager: str = "add_all", answer: str | None = None,
             model: str | None = None, capacity: int | None = None, *,
             tokenizer: str | None = None, embedder=None, manager_format: str | None = None,
             retrieve_k: int | None = None, answer_top_k: int = 30, max_len: int | None = None,
             full_policy: str | None = None, max_chars: int = MAX_CHARS,
             busy_timeout_s: float = 600.0, generate_fn: Callable | None = None) -> "Memory":
        """Opens (or creates) the store directory ``path``.

        Args:
          manager: ``"add_all"`` (every message is ADDed as it is; no model), ``"prompted"``
            (``model`` as the Memory Manager, prompted) or an RL run's checkpoint directory
            (``<run>/best``: its trained Memory Manager).
          answer: None (no :meth:`answer`), ``"base"`` (``model``) or an Answer Agent run's
            checkpoint directory.
          model: a ``load_policy`` name / GGUF / HF folder; default: a checkpoint's run model,
            else the embedded SmolLM2-135M-Instruct. ``tokenizer``: the experiment configs'
            switch (``"embedded"`` for random presets such as ``tiny-smollm2``).
          capacity: bank slots per user (default 1024 for a new store; a store keeps the
            capacity it was created with, and reopening with another is an error).
          manager_format: the manager's reply form (a key of ``prompts.MANAGER_FORMS``);
            default: the checkpoint run's ``memory.manager_format``, else ``"json_op"``.
          retrieve_k: memories shown to the manager per fact (default: the run's, else 10).
          answer_top_k: memories retrieved for :meth:`answer` (the paper: 30 per speaker).
          max_len / full_policy: the bank view's tokens per memory and what ADD does on a full
            bank (``"evict_lru"`` default, ``"evict_oldest"``, ``"refuse"``); fixed at creation.
          max_chars: longest message accepted by :meth:`add`.
          busy_timeout_s: how long a write waits for another process's write.
          embedder: anything with ``encode(list[str]) -> [N, D]`` and ``dim`` (default: the
            embedded all-MiniLM-L6-v2).
          generate_fn: ``mr1.sampling.generate`` or a stand-in with its signature.
        """
        cache: dict = {}
        mgr_policy, mgr_run = _load_agent(manager, MANAGERS, model, tokenizer, cache)
        ans_policy, ans_run = _load_agent(answer, ANSWERS, model, tokenizer, cache)
        if embedder is None:
            from mr1.memory.embedder import load_embedder
            embedder = load_embedder()
        store = Store(path, busy_timeout_s)
        want = {"capacity": capacity, "max_len": max_len, "full_policy": full_policy,
                "embedding_dim": int(embedder.dim)}
        defaults = {"capacity": DEFAULT_CAPACITY, "max_len": DEFAULT_MAX_LEN,
                    "full_policy": DEFAULT_FULL_POLICY}
        with store.write():
            meta = store.meta()
            if not meta:
                meta = {k: (defaults[k] if v is None else v) for k, v in want.items()}
                B.empty_bank(1, 1, 1, full_policy=meta["full_policy"])  # validates the policy
                if int(meta["capacity"]) < 1 or int(meta["max_len"]) < 1:
                    raise ValueError(f"capacity and max_len must be >= 1, got {meta}")
                store.set_meta(meta)
        for k, v in want.items():
            if v is not None and meta[k] != v:
                store.close()
                raise ValueError(f"{path} was created with {k}={meta[k]!r}, not {v!r}; open "
                                 f"it with {k}=None (or {meta[k]!r}) or use another directory")
        settings = Settings(int(meta["capacity"]), int(meta["max_len"]), meta["full_policy"],
                            int(meta["embedding_dim"]))
        mem_cfg = mgr_run.get("memory") or {}
        return cls(store, settings, embedder, manager=mgr_policy,
                   manager_format=manager_format or mem_cfg.get("manager_format") or "json_op",
                   retrieve_k=int(retrieve_k or mem_cfg.get("retrieve_k") or 10),
                   answer=ans_policy, answer_top_k=answer_top_k,
                   answer_distill=bool((ans_run.get("answer") or {}).get("distill", True)),
                   max_chars=max_chars, generate_fn=generate_fn)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------- the bank view
    def _view(self, user_id: str, state: tuple[int, int]) -> _View:
        """The user's bank as of ``state = (step, version)``: cached, or rebuilt from rows."""
        step, version = state
        cached = self._views.get(user_id)
        if cached is not None and cached.version == version:
            return cached
        s = self.settings
        rows = self.store.rows(user_id)
        tokens = np.full((s.capacity, s.max_len), self.pad_id, np.int32)
        lengths = np.zeros((s.capacity,), np.int32)
        valid = np.zeros((s.capacity,), bool)
        emb = np.zeros((s.capacity, s.embedding_dim), np.float32)
        speaker = np.full((s.capacity,), -1, np.int32)
        created = np.full((s.capacity,), -1, np.int32)
        updated = np.full((s.capacity,), -1, np.int32)
        texts: list[str | None] = [None] * s.capacity
        stamps = [""] * s.capacity
        by_slot: list[Row | None] = [None] * s.capacity
        for r in rows:
            ids = list(self.tokenize(r.text))[: s.max_len]
            tokens[r.slot, : len(ids)] = ids
            lengths[r.slot], valid[r.slot], emb[r.slot] = len(ids), True, r.embedding
            speaker[r.slot], created[r.slot], updated[r.slot] = 0, r.created_step, r.updated_step
            texts[r.slot], stamps[r.slot], by_slot[r.slot] = r.text, r.updated_at, r
        bank = B.MemoryBank(
            tokens=jnp.asarray(tokens), lengths=jnp.asarray(lengths), valid=jnp.asarray(valid),
            embeddings=jnp.asarray(emb), speaker=jnp.asarray(speaker),
            created=jnp.asarray(created), updated=jnp.asarray(updated),
            step=jnp.asarray(step, jnp.int32), pad_id=self.pad_id, full_policy=s.full_policy)
        view = _View(SpeakerMemory(user_id, 0, bank, texts, stamps), by_slot, version)
        self._views[user_id] = view
        return view

    @contextlib.contextmanager
    def _writing(self, user_id: str):
        """One write transaction on ``user_id``'s bank: yields the fresh view; on commit the
        user's step and version are stored, on any error the cached view is dropped."""
        try:
            with self._lock, self.store.write():
                state = self.store.user_state(user_id) or (0, 0)
                view = self._view(user_id, state)
                yield view
                version = state[1] + 1
                self.store.set_user_state(user_id, int(view.mem.bank.step), version)
            view.version = version
        except BaseException:
            self._views.pop(user_id, None)
            raise

    def _reading(self, user_id: str) -> _View | None:
        with self._lock, self.store.read():
            state = self.store.user_state(user_id)
            return None if state is None else self._view(user_id, state)

    # ------------------------------------------------------------------------- add
    def add(self, messages, user_id: str, timestamp=None, metadata: dict | None = None
            ) -> list[dict[str, Any]]:
        """Remembers ``messages`` for ``user_id``; one transaction (module docstring).

        Returns one ``{"id", "memory", "event"}`` per fact (plus a ``DELETE`` entry per
        eviction); an LLM extraction that finds no fact returns ``[]``.
        """
        user_id = _user(user_id)
        msgs = messages_of(messages, self.max_chars)
        ts = timestamp_of(timestamp)
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        facts = self._facts(msgs, user_id, ts)
        if not facts:
            return []
        emb = np.asarray(self.embedder.encode(facts), np.float32)
        with self._writing(user_id) as view:
            ops, shown = self._decide(view, user_id, facts, emb)
            return self._apply(view, user_id, facts, emb, ops, shown, ts, metadata or {})

    def _generate(self, prompts: list[str], max_new_tokens: int, **kw) -> list[str]:
        out = []
        for s in range(0, len(prompts), self.batch_size):
            out += list(self.generate_fn(self.manager, prompts[s:s + self.batch_size],
                                         max_new_tokens=max_new_tokens, temperature=0.0,
                                         **kw).texts)
        return out

    def _facts(self, msgs: list[tuple[str, str]], user_id: str, ts: str) -> list[str]:
        if self.manager is None:   # add_all: each message is a fact
            return [content for _, content in msgs]
        prompts = [P.fact_extraction_prompt(user_id if role == "user" else role, content, ts)
                   for role, content in msgs]
        return [f for out in self._generate(prompts, self.extract_max_new_tokens)
                for f in parse_facts(out, self.max_facts_per_message)]

    def _decide(self, view: _View, user_id: str, facts: list[str], emb: np.ndarray
                ) -> tuple[list[ParsedOp], list[list[int]]]:
        """One op per fact and the slots shown for it (display id ``d`` is ``shown[d]``)."""
        if self.manager is None:
            return [ParsedOp(B.OpCode.ADD, text=f, event="ADD") for f in facts], \
                [[] for _ in facts]
        shown = [[] for _ in facts]
        if bool(np.asarray(view.mem.bank.valid).any()):
            r = jax.device_get(_retrieve(view.mem.bank, jnp.asarray(emb), self.retrieve_k))
            shown = [[int(s) for s, ok in zip(r.indices[i], r.mask[i]) if ok]
                     for i in range(len(facts))]
        shown_texts = [[view.rows[s].text for s in slots] for slots in shown]
        prompts = [P.memory_manager_prompt(user_id, f, list(enumerate(t)),
                                           form=self.manager_format)
                   for f, t in zip(facts, shown_texts)]
        kw = {"allowed_tokens": op_choice_tokens(self.tokenize)} if self.form.choice else {}
        if self.form.reply_prefix:
            kw["reply_prefix"] = self.form.reply_prefix
        outs = self._generate(prompts, 1 if self.form.choice else self.manager_max_new_tokens,
                              **kw)
        ops = [parse_op_choice(o, f, t) if self.form.choice else
               parse_ops(o, valid_ids=range(len(t))).ops[0]
               for o, f, t in zip(outs, facts, shown_texts)]
        return ops, shown

    def _apply(self, view: _View, user_id: str, facts: list[str], emb: np.ndarray,
               ops: Sequence[ParsedOp], shown: Sequence[list[int]], ts: str, metadata: dict
               ) -> list[dict[str, Any]]:
        """Applies ``ops`` (one per fact) to the bank, in order, and writes rows + history."""
        s = self.settings
        known = dict(zip(facts, emb))

        def embed(texts):
            missing = [t for t in texts if t not in known]
            if missing:
                known.update(zip(missing, np.asarray(self.embedder.encode(missing), np.float32)))
            return np.stack([known[t] for t in texts])

        actions = [ops_to_actions([op], self.tokenize, max_len=s.max_len, dim=s.embedding_dim,
                                  embed=embed, pad_id=self.pad_id,
                                  id_to_slot=dict(enumerate(slots)))
                   for op, slots in zip(ops, shown)]
        results = self._apply_actions(view, actions)
        events = []
        for fact, op, action, res in zip(facts, ops, actions, results):
            events += self._record(view, user_id, fact, op, int(action.target[0]), res, ts,
                                   metadata)
        return events

    def _apply_actions(self, view: _View, actions: list[B.MemoryAction]) -> list[dict]:
        """Applies one-op ``actions`` in order with the bank's
        :func:`~mr1.memory.bank.apply_actions` (one jitted scan, the bank's buffers donated: no
        copy of a large bank per op); returns per op ``{"applied", "refused", "reason",
        "slot", "evicted"}`` plus the written slot's ``embedding`` / ``created`` / ``updated``
        as the bank holds them after the add.

        The scan length is padded to a power of two with NOOPs (few compiled shapes); the
        bank's step counter is then set back so that it counts the real ops only.
        """
        s, n = self.settings, len(actions)
        size = 1 << max(n - 1, 0).bit_length()
        pad = ops_to_actions([], self.tokenize, max_len=s.max_len, dim=s.embedding_dim,
                             num_ops=size - n, pad_id=self.pad_id)
        stacked = jax.tree.map(lambda *xs: np.concatenate(xs), *actions, *([pad] if size > n
                                                                          else []))
        bank, res = _apply_many(view.mem.bank, stacked)
        view.mem.bank = bank = bank.replace(step=bank.step - (size - n))
        res = jax.device_get(res)
        slots = np.maximum(res.slot[:n], 0)
        emb, created, updated = jax.device_get((bank.embeddings[slots], bank.created[slots],
                                                bank.updated[slots]))
        return [{"applied": bool(res.applied[i]), "refused": bool(res.refused[i]),
                 "reason": int(res.reason[i]), "slot": int(res.slot[i]),
                 "evicted": int(res.evicted[i]), "embedding": emb[i],
                 "created": int(created[i]), "updated": int(updated[i])} for i in range(n)]

    def _record(self, view: _View, user_id: str, fact: str, op: ParsedOp, target: int,
                res: dict, ts: str, metadata: dict) -> list[dict[str, Any]]:
        """Writes what one applied op did to the store and the view's texts; returns its
        event entries."""
        if res["refused"]:
            old = view.rows[target] if 0 <= target < len(view.rows) else None
            return [{"id": old.id if old else None, "memory": op.text or fact, "event": "NOOP",
                     "refused": B.Refusal(res["reason"]).name.lower(), "op": op.op.name}]
        if not res["applied"]:
            entry = {"id": None, "memory": fact, "event": "NOOP"}
            return [entry | ({"reason": op.reason.value} if not op.valid else {})]
        slot, out = res["slot"], []
        old = view.rows[slot]
        if op.op == B.OpCode.DELETE:
            self.store.remove(old.id)
            self.store.log(old.id, user_id, "DELETE", old.text, None, ts)
            view.rows[slot], view.mem.texts[slot], view.mem.timestamps[slot] = None, None, ""
            return [{"id": old.id, "memory": old.text, "event": "DELETE"}]
        if op.op == B.OpCode.ADD:
            if res["evicted"] >= 0:
                self.store.remove(old.id)
                self.store.log(old.id, user_id, "DELETE", old.text, None, ts, "evicted")
                out.append({"id": old.id, "memory": old.text, "event": "DELETE",
                            "reason": "evicted"})
            row = Row(uuid.uuid4().hex, user_id, slot, op.text, res["embedding"],
                      dict(metadata), ts, ts, res["created"], res["updated"])
            self.store.log(row.id, user_id, "ADD", None, op.text, ts)
            out.append({"id": row.id, "memory": op.text, "event": "ADD"})
        else:  # UPDATE
            row = dataclasses.replace(old, text=op.text, embedding=res["embedding"],
                                      updated_at=ts, updated_step=res["updated"])
            self.store.log(row.id, user_id, "UPDATE", old.text, op.text, ts)
            out.append({"id": row.id, "memory": op.text, "event": "UPDATE",
                        "previous_memory": old.text})
        self.store.put(row)
        view.rows[slot], view.mem.texts[slot], view.mem.timestamps[slot] = row, op.text, ts
        return out

    # ------------------------------------------------------------------------- reads
    def search(self, query: str, user_id: str, limit: int = 5) -> list[dict[str, Any]]:
        """The ``limit`` memories of ``user_id`` most similar to ``query`` (cosine, best
        first): ``[{"id", "memory", "score", "created_at", "updated_at", ...}]``; ``[]`` for a
        user without memories."""
        query, user_id = _text(query, "query", self.max_chars), _user(user_id)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        q = np.asarray(self.embedder.encode([query]), np.float32)
        with self._lock:   # a writing thread donates the bank's buffers
            view = self._reading(user_id)
            if view is None or not any(r is not None for r in view.rows):
                return []
            r = jax.device_get(_retrieve(view.mem.bank, jnp.asarray(q), limit))
            return [view.rows[int(i)].public() | {"score": float(sc)}
                    for i, sc, ok in zip(r.indices[0], r.scores[0], r.mask[0]) if ok]

    def get(self, memory_id: str) -> dict[str, Any]:
        """One memory by id (:class:`MemoryNotFoundError` if there is none)."""
        with self._lock:
            return self.store.row(memory_id).public()

    def get_all(self, user_id: str) -> list[dict[str, Any]]:
        """Every memory of ``user_id``, oldest first (``[]`` for an unknown user)."""
        with self._lock:
            return [r.public() for r in self.store.rows(_user(user_id), order="created_step")]

    def history(self, memory_id: str) -> list[dict[str, Any]]:
        """The ops that touched ``memory_id``, oldest first: ``[{"event", "old_memory",
        "new_memory", "at", "reason", ...}]`` (also after the memory was deleted)."""
        with self._lock:
            return self.store.history(memory_id)

    # ------------------------------------------------------------------------- deletes
    def delete(self, memory_id: str) -> dict[str, Any]:
        """Deletes one memory through the bank's DELETE op; returns its event entry.

        Raises:
          MemoryNotFoundError: no memory ``memory_id``.
        """
        user_id = self.store.row(memory_id).user_id
        s = self.settings
        with self._writing(user_id) as view:
            row = self.store.row(memory_id)   # again, inside the transaction
            action = ops_to_actions([ParsedOp(B.OpCode.DELETE, id=row.slot, event="DELETE")],
                                    self.tokenize, max_len=s.max_len, dim=s.embedding_dim,
                                    pad_id=self.pad_id)
            ts = timestamp_of()
            [res] = self._apply_actions(view, [action])
            if not res["applied"]:  # the rows and the bank disagree: never commit that
                raise RuntimeError(f"the bank refused to delete {memory_id} "
                                   f"({B.Refusal(res['reason']).name})")
            self.store.remove(row.id)
            self.store.log(row.id, user_id, "DELETE", row.text, None, ts, "deleted")
            view.rows[row.slot], view.mem.texts[row.slot] = None, None
            view.mem.timestamps[row.slot] = ""
        return {"id": row.id, "memory": row.text, "event": "DELETE"}

    def reset(self, user_id: str | None = None) -> dict[str, int]:
        """Deletes every memory and history entry of ``user_id`` (None: of every user);
        returns ``{"deleted": number of memories}``."""
        user_id = None if user_id is None else _user(user_id)
        try:
            with self._lock, self.store.write():
                n = self.store.reset(user_id)
        finally:
            if user_id is None:
                self._views.clear()
            else:
                self._views.pop(user_id, None)
        return {"deleted": n}

    # ------------------------------------------------------------------------- answering
    def answer(self, question: str, user_id: str) -> dict[str, Any]:
        """Answers ``question`` from ``user_id``'s memories with the Answer Agent (memory
        distillation, then the answer line): ``{"answer", "memories", "distilled", "output"}``
        where ``memories`` are the ``answer_top_k`` retrieved (as :meth:`search` returns them).
        """
        from mr1.agents.answer import AnswerAgent

        if self.answer_policy is None:
            raise RuntimeError("this Memory was opened without an Answer Agent; open it with "
                               "answer='base' or answer=<run>/best")
        question = _text(question, "question", self.max_chars)
        hits = self.search(question, user_id, limit=self.answer_top_k)
        prompt = P.answer_prompt(question, _user(user_id), "the assistant",
                                 [(h["updated_at"], h["memory"]) for h in hits], [],
                                 form=P.answer_form(self.answer_distill))
        agent = AnswerAgent(self.answer_policy, self.embedder, top_k=self.answer_top_k,
                            max_new_tokens=self.answer_max_new_tokens,
                            generate_fn=self.generate_fn, distill=self.answer_distill)
        r = agent.answer_prompts([prompt], [question])[0]
        return {"answer": r.answer, "memories": hits, "distilled": list(r.distilled),
                "output": r.output}
