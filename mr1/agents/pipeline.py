"""Memory construction: conversation -> one memory bank per speaker (Memory-R1 §3.1).

Per session (the unit of batching):

1. **facts** -- ``"observations"``: LoCoMo's ready-made per-session speaker observations (no LLM
   call; the default on CPU); ``"llm"``: the policy extracts facts from every turn of the
   session in ONE batched ``generate`` call (:data:`~mr1.agents.prompts.FACT_EXTRACTION`);
2. **embed** all the session's facts in one ``Embedder.encode`` call;
3. **manager** -- ``"add_all"``: every fact is ADDed (the trivial baseline); ``"llm"``: for each
   fact the top-``retrieve_k`` memories of that speaker's bank are retrieved and the Memory
   Manager prompt is built; all prompts of the session go through ONE ``generate`` call and
   each output is parsed with :func:`mr1.memory.ops.parse_ops` (ids shown are display ids
   ``0..k-1``, mapped back to slots);
4. **apply** the ops, in fact order, to the speaker's :class:`~mr1.memory.bank.MemoryBank`
   with the jitted :func:`~mr1.memory.bank.apply_action`.

Batching a session's manager calls means the memories shown for a fact are those of the bank
at the *start* of the session (facts of the same session do not see each other); an op whose
target an earlier op of the same session deleted is refused by the bank and counted.

**Across conversations.** With an LLM in the loop, :func:`build_all` builds
``conversations_per_batch`` conversations in lockstep (:meth:`MemoryBuilder.build_many`):
session ``i`` of every one of them shares one batched ``generate`` call per stage, so the
batches are full (a LoCoMo session has ~10 facts, the batch 32) and fewer shapes compile. Each
conversation still sees only its own banks and sessions in order, so the banks are the ones
:meth:`MemoryBuilder.build` makes alone (greedy decoding; up to float noise from the padding).

**Text storage.** The bank holds token ids (``tokens [S, L]``), truncated to ``max_len``. The
full memory text is kept host-side in :class:`SpeakerMemory` (``texts[slot]``, with the session
date in ``timestamps[slot]``), updated from each op's :class:`~mr1.memory.bank.OpResult`
(written / cleared slot), so prompts always show untruncated text while the tensors stay ready
for jitted rollouts. Tokens come from the policy tokenizer when there is one, else UTF-8
bytes (which fit the 256-token vocabulary of the ``tiny`` model).

Invalid manager outputs (parser reasons) and bank refusals are counted by reason in
:class:`BuildStats`; nothing raises on a bad model output.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import re
import shutil
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mr1.agents import prompts as P
from mr1.data.records import Conversation
from mr1.memory import bank as B
from mr1.memory.ops import (ParsedOp, ParseResult, op_choice_tokens, ops_to_actions,
                            parse_op_choice, parse_ops)

FACT_MODES = ("observations", "llm")
MANAGER_MODES = ("add_all", "llm")
BANK_FIELDS = ("tokens", "lengths", "valid", "embeddings", "speaker", "created", "updated",
               "step")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Memory construction settings (see the module docstring)."""

    facts: str = "observations"        # "observations" | "llm"
    manager: str = "add_all"           # "add_all" | "llm"
    num_slots: int = 512               # bank slots per speaker
    max_len: int = 64                  # tokens kept per memory in the bank tensors
    full_policy: str = "evict_lru"     # what ADD does on a full bank (mr1.memory.bank)
    retrieve_k: int = 10               # memories shown to the manager (Mem0: 10)
    manager_format: str = "json"       # manager reply, a key of prompts.MANAGER_FORMS: "json"
                                       # (paper) | "line" | "op" (one word) | "json_op"
    manager_max_new_tokens: int = 96   # manager reply budget
    extract_max_new_tokens: int = 64   # fact extraction reply budget
    max_facts_per_turn: int = 4        # extracted facts kept per turn ("llm" facts)
    max_sessions: int | None = None    # only the first N sessions (quick runs)
    batch_size: int = 32               # prompts per generate call
    conversations_per_batch: int = 8   # conversations built in lockstep (LLM facts/manager)

    def __post_init__(self):
        if self.facts not in FACT_MODES:
            raise ValueError(f"facts must be one of {FACT_MODES}, got {self.facts!r}")
        if self.manager not in MANAGER_MODES:
            raise ValueError(f"manager must be one of {MANAGER_MODES}, got {self.manager!r}")
        if self.conversations_per_batch < 1:
            raise ValueError("conversations_per_batch must be >= 1, got "
                             f"{self.conversations_per_batch}")
        if self.manager_format not in P.MANAGER_FORMS:
            raise ValueError(f"manager_format must be one of {sorted(P.MANAGER_FORMS)}, "
                             f"got {self.manager_format!r}")

    @classmethod
    def from_mapping(cls, m: Any) -> "PipelineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        items = dict(m.items()) if hasattr(m, "items") else dict(m)
        return cls(**{k: v for k, v in items.items() if k in names})


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


@dataclasses.dataclass
class BuildStats:
    facts: int = 0
    manager_calls: int = 0
    ops: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    invalid: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    refused: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped_facts: int = 0

    @property
    def num_invalid(self) -> int:
        return sum(self.invalid.values()) + sum(self.refused.values())

    def to_dict(self) -> dict[str, Any]:
        return {"facts": self.facts, "manager_calls": self.manager_calls, "ops": dict(self.ops),
                "invalid": dict(self.invalid), "refused": dict(self.refused),
                "skipped_facts": self.skipped_facts, "num_invalid": self.num_invalid}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BuildStats":
        return cls(facts=d.get("facts", 0), manager_calls=d.get("manager_calls", 0),
                   ops=collections.Counter(d.get("ops", {})),
                   invalid=collections.Counter(d.get("invalid", {})),
                   refused=collections.Counter(d.get("refused", {})),
                   skipped_facts=d.get("skipped_facts", 0))


@dataclasses.dataclass
class ConversationMemory:
    """The banks of one conversation (speaker_a first) and how they were built."""

    sample_id: str
    speakers: list[SpeakerMemory]
    stats: BuildStats

    def by_name(self, name: str) -> SpeakerMemory | None:
        return next((s for s in self.speakers if s.name == name), None)


# ----------------------------------------------------------------------------- helpers

def make_tokenize(policy) -> Callable[[str], list[int]]:
    """Policy tokenizer (no special tokens) if any, else UTF-8 bytes."""
    tok = getattr(policy, "tokenizer", None) if policy is not None else None
    if tok is None:
        return lambda s: list(s.encode("utf-8"))
    return lambda s: list(tok(s, add_special_tokens=False)["input_ids"])


def new_speaker_memory(name: str, index: int, cfg: PipelineConfig, dim: int,
                       pad_id: int = 0) -> SpeakerMemory:
    bank = B.empty_bank(cfg.num_slots, cfg.max_len, dim, pad_id=pad_id,
                        full_policy=cfg.full_policy)
    return SpeakerMemory(name, index, bank, [None] * cfg.num_slots, [""] * cfg.num_slots)


_apply = jax.jit(B.apply_action)
_retrieve_many = jax.jit(B.retrieve_many, static_argnums=2)


def apply_ops(mem: SpeakerMemory, actions: B.MemoryAction, texts: Sequence[str],
              timestamp: str, stats: BuildStats) -> list[B.OpResult]:
    """Applies batched ``actions [N]`` in order; keeps ``mem.texts`` in step with the bank.

    ``texts[i]`` is the text written by action ``i`` (ignored unless it is an ADD/UPDATE).
    Refusals are counted in ``stats.refused`` by :class:`~mr1.memory.bank.Refusal` name.
    """
    results = []
    n = int(np.asarray(actions.op).shape[0])
    for i in range(n):
        act = jax.tree.map(lambda x: jnp.asarray(x[i]), actions)
        mem.bank, res = _apply(mem.bank, act)
        res = jax.device_get(res)
        op = B.OpCode(int(act.op)) if 0 <= int(act.op) < len(B.OpCode) else None
        if bool(res.refused):
            stats.refused[B.Refusal(int(res.reason)).name.lower()] += 1
        elif bool(res.applied) and op is not None:
            stats.ops[op.name] += 1
            slot = int(res.slot)
            if op in (B.OpCode.ADD, B.OpCode.UPDATE):
                mem.texts[slot] = texts[i]
                mem.timestamps[slot] = timestamp
            elif op == B.OpCode.DELETE:
                mem.texts[slot] = None
                mem.timestamps[slot] = ""
        elif op == B.OpCode.NOOP:
            stats.ops["NOOP"] += 1
        results.append(res)
    return results


_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*")


def parse_facts(text: str, limit: int) -> list[str]:
    """Fact lines of an extraction reply (bullets stripped, NONE and blanks dropped)."""
    out = []
    for line in (text or "").splitlines():
        line = _BULLET.sub("", line).strip()
        if not line or line.strip(".").upper() in ("NONE", "NO FACTS") or line.endswith(":"):
            continue
        out.append(line)
    return out[:limit]


# ----------------------------------------------------------------------------- builder

class MemoryBuilder:
    """Builds :class:`ConversationMemory` from conversations (see module docstring).

    Args:
      config: a :class:`PipelineConfig`.
      embedder: anything with ``encode(list[str]) -> [N, D]`` and ``dim``.
      policy: the LLM for ``"llm"`` facts/manager (may be None for observations + add_all).
      generate_fn: ``mr1.sampling.generate`` or a stand-in with the same signature (tests).
    """

    def __init__(self, config: PipelineConfig, embedder, policy=None, generate_fn=None):
        self.cfg = config
        self.embedder = embedder
        self.policy = policy
        if generate_fn is None:
            from mr1.sampling import generate as generate_fn
        self.generate = generate_fn
        self.tokenize = make_tokenize(policy)
        if (config.facts == "llm" or config.manager == "llm") and policy is None:
            raise ValueError("llm facts/manager need a policy")

    def sessions_of(self, conv: Conversation) -> Sequence:
        """The sessions built for ``conv`` (the first ``max_sessions`` when set)."""
        return conv.sessions[: self.cfg.max_sessions or None]

    @property
    def uses_llm(self) -> bool:
        """Whether building calls the LLM (then conversations are worth building in lockstep)."""
        return self.cfg.facts == "llm" or self.cfg.manager == "llm"

    # -- facts
    def session_facts(self, conv: Conversation, session) -> list[tuple[str, str]]:
        """``(speaker, fact)`` pairs of one session."""
        return self._facts_many([(conv, session)])[0]

    def _facts_many(self, pairs) -> list[list[tuple[str, str]]]:
        """``(speaker, fact)`` pairs of each ``(conversation, session)``; LLM extraction of all
        their turns goes through one batched generate."""
        if self.cfg.facts == "observations":
            return [[(o.speaker, o.text) for o in conv.observations
                     if o.session_idx == session.idx] for conv, session in pairs]
        turns = [[t for t in session.turns if t.text.strip()] for _, session in pairs]
        prompts = [P.fact_extraction_prompt(t.speaker, t.text, session.date)
                   for (_, session), ts in zip(pairs, turns) for t in ts]
        texts = iter(self._generate(prompts, self.cfg.extract_max_new_tokens) if prompts else [])
        return [[(t.speaker, f) for t in ts
                 for f in parse_facts(next(texts), self.cfg.max_facts_per_turn)] for ts in turns]

    def _generate(self, prompts: list[str], max_new_tokens: int, **kw) -> list[str]:
        out = []
        for s in range(0, len(prompts), self.cfg.batch_size):
            chunk = prompts[s:s + self.cfg.batch_size]
            out += list(self.generate(self.policy, chunk, max_new_tokens=max_new_tokens,
                                      temperature=0.0, **kw).texts)
        return out

    # -- conversations
    def build(self, conv: Conversation) -> ConversationMemory:
        """The banks of one conversation."""
        return self.build_many([conv])[0]

    def build_many(self, convs: Sequence[Conversation],
                   on_session: Callable[[int], None] | None = None,
                   on_done: Callable[[ConversationMemory], None] | None = None,
                   ) -> list[ConversationMemory]:
        """The banks of several conversations, built in lockstep: session ``i`` of each of them
        shares one batched generate per stage (see the module docstring).

        ``on_session(n)`` is called after each lockstep step with the number of sessions it
        processed (progress bars); ``on_done(memory)`` as soon as a conversation's last session
        is applied (saving it then, a conversation shorter than the others survives an
        interruption of the group).
        """
        pad = getattr(self.policy, "pad_token_id", 0) if self.policy is not None else 0
        dim = int(getattr(self.embedder, "dim", 384))
        out, schedules = [], []
        for conv in convs:
            mems = [new_speaker_memory(conv.speaker_a, 0, self.cfg, dim, pad),
                    new_speaker_memory(conv.speaker_b, 1, self.cfg, dim, pad)]
            out.append(ConversationMemory(conv.sample_id, mems, BuildStats()))
            schedules.append(self.sessions_of(conv))
        for step in range(max(map(len, schedules), default=0)):
            active = [i for i, sched in enumerate(schedules) if step < len(sched)]
            facts = self._facts_many([(convs[i], schedules[i][step]) for i in active])
            to_manage = []
            for i, session_facts in zip(active, facts):
                mem, date = out[i], schedules[i][step].date
                by_name = {m.name: m for m in mem.speakers}
                kept = [(by_name[s], f) for s, f in session_facts if s in by_name and f.strip()]
                mem.stats.skipped_facts += len(session_facts) - len(kept)
                if not kept:
                    continue
                mem.stats.facts += len(kept)
                emb = np.asarray(self.embedder.encode([f for _, f in kept]), np.float32)
                if self.cfg.manager == "add_all":
                    self._add_all(kept, emb, date, mem.stats)
                else:
                    to_manage.append((kept, emb, date, mem.stats))
            if to_manage:
                self._llm_manage_many(to_manage)
            if on_session is not None:
                on_session(len(active))
            if on_done is not None:
                for i in active:
                    if step == len(schedules[i]) - 1:
                        on_done(out[i])
        if on_done is not None:
            for i, sched in enumerate(schedules):
                if not sched:
                    on_done(out[i])
        return out

    def _add_all(self, kept, emb, date, stats):
        per_speaker = collections.defaultdict(list)
        for (mem, fact), e in zip(kept, emb):
            per_speaker[mem.name].append((mem, fact, e))
        for rows in per_speaker.values():
            mem = rows[0][0]
            acts = [B.make_action(B.OpCode.ADD, -1, self.tokenize(f), e, mem.index,
                                  max_len=self.cfg.max_len, dim=emb.shape[1],
                                  pad_id=mem.bank.pad_id) for _, f, e in rows]
            apply_ops(mem, B.stack_actions(acts), [f for _, f, _ in rows], date, stats)

    def _manager_prompts(self, kept, emb) -> tuple[list[str], list[list[int]]]:
        """One session's Memory Manager prompts and, per fact, the slots shown (display id
        ``d`` is ``slots[d]``), retrieved from the bank at the start of the session."""
        k = self.cfg.retrieve_k
        retrieved = {}
        for mem in {id(m): m for m, _ in kept}.values():
            rows = [i for i, (m, _) in enumerate(kept) if m is mem]
            r = jax.device_get(_retrieve_many(mem.bank, jnp.asarray(emb[rows]), k))
            for j, i in enumerate(rows):
                retrieved[i] = [int(s) for s, ok in zip(r.indices[j], r.mask[j]) if ok]
        shown = [retrieved[i] for i in range(len(kept))]
        prompts = [P.memory_manager_prompt(
            mem.name, fact, [(d, mem.texts[s] or "") for d, s in enumerate(slots)],
            form=self.cfg.manager_format) for (mem, fact), slots in zip(kept, shown)]
        return prompts, shown

    def _llm_manage_many(self, sessions):
        """Manager ops for the sessions ``[(kept, emb, date, stats)]`` of different
        conversations: one batched generate for all their facts, then each session's ops
        are applied to its own banks in fact order."""
        built = [self._manager_prompts(kept, emb) for kept, emb, _, _ in sessions]
        prompts = [p for ps, _ in built for p in ps]
        form = P.manager_form(self.cfg.manager_format)
        choice = form.choice
        kw = {"allowed_tokens": op_choice_tokens(self.tokenize)} if choice else {}
        if form.reply_prefix:
            kw["reply_prefix"] = form.reply_prefix
        outs = iter(self._generate(prompts, 1 if choice else self.cfg.manager_max_new_tokens,
                                   **kw))
        for (kept, emb, date, stats), (ps, shown) in zip(sessions, built):
            stats.manager_calls += len(ps)
            for (mem, fact), slots in zip(kept, shown):
                out = next(outs)
                if choice:  # one constrained word; target (id 0) and text follow from the fact
                    op = parse_op_choice(out, fact, [mem.texts[s] or "" for s in slots])
                    parsed = ParseResult((op,), "choice")
                else:
                    parsed = parse_ops(out, valid_ids=range(len(slots)))
                for reason in parsed.reasons:
                    stats.invalid[reason.value] += 1
                ops: list[ParsedOp] = list(parsed.ops)
                actions = ops_to_actions(ops, self.tokenize, max_len=self.cfg.max_len,
                                         dim=emb.shape[1], embed=self._embed_texts,
                                         speaker=mem.index, pad_id=mem.bank.pad_id,
                                         id_to_slot=dict(enumerate(slots)))
                apply_ops(mem, actions, [o.text for o in ops], date, stats)

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.embedder.encode(list(texts)), np.float32)


# ----------------------------------------------------------------------------- save / load

DONE = "DONE"


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
    meta = {"sample_id": mem.sample_id, "stats": mem.stats.to_dict(),
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
    return ConversationMemory(meta["sample_id"], speakers, BuildStats.from_dict(meta["stats"]))


MANAGER_FILE = "manager.json"


def manager_identity(config) -> dict[str, str]:
    """Who builds the banks of an evaluate config: manager mode, its checkpoint ("" = the
    loaded model), the model and the fact source -- banks of another identity differ.

    A benchmark other than LoCoMo adds ``"data"`` ("longmemeval/oracle", "longmemeval/s",
    "msc"): LongMemEval's oracle and S haystacks share question ids, so their banks must not
    mix. LoCoMo identities stay as they were (memory dirs built before the field resume).
    An LLM manager in a reply form other than the paper's JSON adds ``"manager_format"``
    (``"op"`` and ``"json_op"`` banks differ from the same checkpoint's JSON banks).
    """
    ckpt = config.memory.get("manager_checkpoint", "") or ""
    identity = {"manager": config.memory.manager, "manager_checkpoint": os.path.normpath(ckpt)
                if ckpt else "", "model": config.model, "facts": config.memory.facts}
    form = config.memory.get("manager_format", "json")
    if config.memory.manager != "add_all" and form != "json":
        identity["manager_format"] = form
    name = benchmark_name(config)
    if name == "longmemeval":
        identity["data"] = f"longmemeval/{config.get('longmemeval_variant') or 'oracle'}"
    elif name != "locomo":
        identity["data"] = name
    return identity


def claim_memory_dir(directory: str | os.PathLike, identity: dict[str, str]) -> bool:
    """Writes ``identity`` to ``directory/manager.json``, or checks the one already there.

    Returns whether the directory was already claimed (False: written now; a directory of
    banks from before ``manager.json`` existed is accepted and claimed as it is).

    Raises:
      ValueError: the directory holds banks of another manager identity.
    """
    path = pathlib.Path(directory) / MANAGER_FILE
    if path.is_file():
        found = json.loads(path.read_text())
        if found != identity:
            raise ValueError(
                f"memory dir {directory} was built by {found}, not {identity}; pick another "
                "--config.memory.dir (or --workdir) for this manager")
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity, indent=1) + "\n")
    return False


def build_all(builder: MemoryBuilder, convs: Sequence[Conversation],
              directory: str | os.PathLike | None, *, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, ConversationMemory]:
    """Builds (or loads, when already done under ``directory``) every conversation's memory.

    Conversations that call the LLM are built ``conversations_per_batch`` at a time in
    lockstep (:meth:`MemoryBuilder.build_many`, a progress bar over sessions); each is saved
    as soon as its last session is applied, and a rerun resumes from the saved ones. With
    ``directory=None`` nothing is saved or resumed.
    """
    out, todo = {}, []
    for conv in convs:
        if directory is not None and is_done(directory, conv.sample_id):
            log(f"{conv.sample_id}: done, loading")
            out[conv.sample_id] = load_memory(directory, conv.sample_id)
        else:
            todo.append(conv)
    lockstep = builder.uses_llm
    per = builder.cfg.conversations_per_batch if lockstep else 1
    total = sum(len(builder.sessions_of(c)) for c in todo) if lockstep else len(todo)
    bar = tqdm(total=total, desc="memory", unit="session" if lockstep else "conv",
               disable=not (progress and todo))

    def finish(mem: ConversationMemory) -> None:
        if directory is not None:
            save_memory(mem, directory)
        out[mem.sample_id] = mem

    for start in range(0, len(todo), per):
        group = todo[start:start + per]
        if lockstep:
            builder.build_many(group, on_session=bar.update, on_done=finish)
        else:
            finish(builder.build(group[0]))
            bar.update(1)
    bar.close()
    return {c.sample_id: out[c.sample_id] for c in convs}


# Benchmark selection moved to mr1.data.select; the names stay importable from here.
from mr1.data.select import (  # noqa: E402,F401
    BENCHMARKS,
    benchmark_categories,
    benchmark_name,
    select_conversations,
    select_locomo,
    subset,
)
