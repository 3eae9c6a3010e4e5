"""Memory construction: conversation -> one memory bank per speaker (Memory-R1 §3.1).

Per session (the unit of batching):

1. **facts** -- ``"observations"``: LoCoMo's ready-made per-session speaker observations (no LLM
   call; the default on CPU); ``"llm"``: the policy extracts facts from every turn of the
   session in ONE batched ``generate`` call (:data:`~mr1.agents.prompts.FACT_EXTRACTION`);
2. **embed** all the session's facts in one ``Embedder.encode`` call;
3. **manager** -- ``memory.manager`` names an entry of :data:`mr1.memory.managers.MANAGERS`. A
   rule (``"add_all"``: every fact is ADDed, the trivial baseline; ``"merge_similar"``,
   ``"skip_similar"``, ``"oracle"``) decides each fact's op on the bank as it is, applied
   before the next fact. ``"llm"``: for each
   fact the top-``retrieve_k`` memories of that speaker's bank are retrieved and the Memory
   Manager prompt is built; all prompts of the session go through ONE ``generate`` call and
   each output is parsed with :func:`mr1.memory.ops.parse_ops` (ids shown are display ids
   ``0..k-1``, mapped back to slots);
4. **apply** the ops, in fact order, to the speaker's :class:`~mr1.memory.bank.MemoryBank`
   through the environment's one transition (:func:`mr1.memory.store.apply_ops`, which uses
   :func:`mr1.memory.env.transition`). The bank has ``num_slots`` slots per speaker: an ADD
   into a full bank is refused or evicts a memory per ``full_policy``, and every refusal,
   eviction and truncation of a text longer than ``max_len`` tokens is counted.

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

Invalid manager outputs (parser reasons), bank refusals (by reason), evictions and
truncations are counted in :class:`~mr1.memory.store.BuildStats`; nothing raises on a bad
model output. The host-side banks and memory dirs (save / load / identity / manifest) live in
:mod:`mr1.memory.store`; their names stay importable from here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mr1.agents import prompts as P
from mr1.data.records import Conversation
from mr1.memory import bank as B
from mr1.memory.managers import MANAGERS, FactView, manager_spec
from mr1.run_identity import RunIdentityError
from mr1.memory.ops import (ParsedOp, ParseResult, op_choice_groups, ops_to_actions,
                            parse_op_choice, parse_ops)
# The host-side banks and memory dirs live in mr1.memory.store; their names stay importable
# from here.
from mr1.memory.store import (BANK_FIELDS, DONE, MANAGER_FILE, BuildStats,  # noqa: F401
                              ConversationMemory, SpeakerMemory, apply_ops, bank_identity,
                              budget_mismatch,
                              claim_memory_dir, is_done, load_memory, new_speaker_memory,
                              save_memory, write_manifest)

FACT_MODES = ("observations", "llm")
MANAGER_MODES = tuple(MANAGERS)   # "add_all" | "llm" | the rule baselines (mr1.memory.managers)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Memory construction settings (see the module docstring)."""

    facts: str = "observations"        # "observations" | "llm"
    manager: str = "add_all"           # a key of mr1.memory.managers.MANAGERS: "add_all" |
                                       # "llm" | "merge_similar" | "skip_similar" | "oracle"
    num_slots: int = 512               # bank slots per speaker (the memory budget)
    max_len: int = 64                  # tokens kept per memory in the bank tensors (longer
                                       # texts are truncated there, and counted)
    full_policy: str = "evict_lru"     # ADD on a full bank: "refuse" | "evict_lru" |
                                       # "evict_fifo" (mr1.memory.bank.FULL_POLICIES); counted
    skip_tau: float = 0.75             # "skip_similar": NOOP when the nearest cosine >= this
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
        if self.full_policy not in B.FULL_POLICIES:
            raise ValueError(f"full_policy must be one of {sorted(B.FULL_POLICIES)}, "
                             f"got {self.full_policy!r}")
        if self.num_slots < 1 or self.max_len < 1:
            raise ValueError(f"num_slots and max_len must be >= 1, got {self.num_slots}, "
                             f"{self.max_len}")
        if self.manager_format not in P.MANAGER_FORMS:
            raise ValueError(f"manager_format must be one of {sorted(P.MANAGER_FORMS)}, "
                             f"got {self.manager_format!r}")

    @property
    def budget(self) -> dict[str, Any]:
        """The memory budget the banks are built under (saved with them and checked on
        resume): slots per speaker, tokens per memory, full policy, session limit."""
        return {"num_slots": self.num_slots, "max_len": self.max_len,
                "full_policy": self.full_policy, "max_sessions": int(self.max_sessions or 0)}

    def refuses_add(self, used: int) -> bool:
        """Whether an ADD into a bank holding ``used`` memories is refused (full, ``refuse``)."""
        return self.full_policy == "refuse" and used >= self.num_slots

    @classmethod
    def from_mapping(cls, m: Any) -> "PipelineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        items = dict(m.items()) if hasattr(m, "items") else dict(m)
        return cls(**{k: v for k, v in items.items() if k in names})


# ----------------------------------------------------------------------------- helpers

def make_tokenize(policy) -> Callable[[str], list[int]]:
    """Policy tokenizer (no special tokens) if any, else UTF-8 bytes."""
    tok = getattr(policy, "tokenizer", None) if policy is not None else None
    if tok is None:
        return lambda s: list(s.encode("utf-8"))
    return lambda s: list(tok(s, add_special_tokens=False)["input_ids"])


_retrieve_many = jax.jit(B.retrieve_many, static_argnums=2)


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
        return [(s, f) for s, f, _ in self.session_fact_rows(conv, session)]

    def session_fact_rows(self, conv: Conversation, session
                          ) -> list[tuple[str, str, tuple[str, ...]]]:
        """``(speaker, fact, evidence turn ids)`` of one session (what the managers see)."""
        return self._facts_many([(conv, session)])[0]

    def _facts_many(self, pairs) -> list[list[tuple[str, str, tuple[str, ...]]]]:
        """``(speaker, fact, evidence turn ids)`` of each ``(conversation, session)``; LLM
        extraction of all their turns goes through one batched generate."""
        if self.cfg.facts == "observations":
            return [[(o.speaker, o.text, tuple(o.evidence)) for o in conv.observations
                     if o.session_idx == session.idx] for conv, session in pairs]
        turns = [[t for t in session.turns if t.text.strip()] for _, session in pairs]
        prompts = [P.fact_extraction_prompt(t.speaker, t.text, session.date)
                   for (_, session), ts in zip(pairs, turns) for t in ts]
        texts = iter(self._generate(prompts, self.cfg.extract_max_new_tokens) if prompts else [])
        return [[(t.speaker, f, (t.dia_id,)) for t in ts
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
        spec = manager_spec(self.cfg.manager)
        out, schedules, golds = [], [], []
        for conv in convs:
            mems = [new_speaker_memory(conv.speaker_a, 0, self.cfg, dim, pad),
                    new_speaker_memory(conv.speaker_b, 1, self.cfg, dim, pad)]
            out.append(ConversationMemory(conv.sample_id, mems, BuildStats(),
                                          self.cfg.budget))
            schedules.append(self.sessions_of(conv))
            golds.append(frozenset(e.strip() for qa in conv.qas for e in qa.evidence)
                         if spec.reads_gold else frozenset())
        for step in range(max(map(len, schedules), default=0)):
            active = [i for i, sched in enumerate(schedules) if step < len(sched)]
            facts = self._facts_many([(convs[i], schedules[i][step]) for i in active])
            to_manage = []
            for i, session_facts in zip(active, facts):
                mem, date = out[i], schedules[i][step].date
                by_name = {m.name: m for m in mem.speakers}
                rows = [(by_name[s], f, ev) for s, f, ev in session_facts
                        if s in by_name and f.strip()]
                kept = [(m, f) for m, f, _ in rows]
                mem.stats.skipped_facts += len(session_facts) - len(kept)
                if not kept:
                    continue
                mem.stats.facts += len(kept)
                emb = np.asarray(self.embedder.encode([f for _, f in kept]), np.float32)
                if spec.decide is not None:
                    self._rule_manage(spec.decide, rows, emb, date, mem.stats, golds[i])
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

    def _rule_manage(self, decide, rows, emb, date, stats, gold):
        """A rule manager (:mod:`mr1.memory.managers`) on one session: each fact's op is decided
        on the speaker's bank as it is now and applied before the next fact."""
        params = dataclasses.asdict(self.cfg)
        for (mem, fact, evidence), e in zip(rows, emb):
            op = decide(FactView(fact, e, evidence, mem.bank, mem.texts, gold, params))
            embed = (lambda texts, e=e, fact=fact: e[None] if list(texts) == [fact]
                     else self._embed_texts(texts))
            actions = ops_to_actions([op], self.tokenize, max_len=self.cfg.max_len,
                                     dim=emb.shape[1], embed=embed, speaker=mem.index,
                                     pad_id=mem.bank.pad_id)
            apply_ops(mem, actions, [op.text], date, stats)

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
        used = {id(m): int(np.asarray(m.bank.valid).sum()) for m, _ in kept}
        prompts = [P.memory_manager_prompt(
            mem.name, fact, [(d, mem.texts[s] or "") for d, s in enumerate(slots)],
            form=self.cfg.manager_format, used=used[id(mem)], capacity=self.cfg.num_slots)
            for (mem, fact), slots in zip(kept, shown)]
        return prompts, shown

    def _llm_manage_many(self, sessions):
        """Manager ops for the sessions ``[(kept, emb, date, stats)]`` of different
        conversations: one batched generate for all their facts, then each session's ops
        are applied to its own banks in fact order."""
        built = [self._manager_prompts(kept, emb) for kept, emb, _, _ in sessions]
        prompts = [p for ps, _ in built for p in ps]
        form = P.manager_form(self.cfg.manager_format)
        choice = form.choice
        kw = {"reply_prefix": form.reply_prefix} if form.reply_prefix else {}
        if choice:  # one constrained word; a masked form's full banks cannot choose ADD
            full = [self.cfg.refuses_add(int(np.asarray(mem.bank.valid).sum()))
                    for kept, _, _, _ in sessions for mem, _ in kept]
            texts = [""] * len(prompts)
            for idx, allowed in op_choice_groups(self.tokenize,
                                                 np.asarray(full, bool) & form.mask_full_add):
                got = self._generate([prompts[i] for i in idx], 1, allowed_tokens=allowed, **kw)
                for i, text in zip(idx, got):
                    texts[i] = text
            outs = iter(texts)
        else:
            outs = iter(self._generate(prompts, self.cfg.manager_max_new_tokens, **kw))
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


def manager_identity(config) -> dict[str, Any]:
    """Who builds the banks of an evaluate config under which budget
    (:func:`mr1.memory.store.bank_identity`): manager mode, its checkpoint ("" = the loaded
    model), the model, the fact source, slots per speaker, full policy, tokens per memory and
    session limit -- banks of another identity differ.

    A benchmark other than LoCoMo adds ``"data"`` ("longmemeval/oracle", "longmemeval/s",
    "msc"): LongMemEval's oracle and S haystacks share question ids, so their banks must not
    mix. An LLM manager in a reply form other than the paper's JSON adds ``"manager_format"``
    (``"op"`` and ``"json_op"`` banks differ from the same checkpoint's JSON banks); a rule
    manager adds its own parameters (``skip_tau``). Fields absent from ``config.memory`` take
    :class:`PipelineConfig`'s defaults.
    """
    cfg = PipelineConfig.from_mapping(config.memory)
    extra = {f: getattr(cfg, f) for f in manager_spec(cfg.manager).identity_fields}
    form = config.memory.get("manager_format", "json")
    if cfg.manager == "llm" and form != "json":
        extra["manager_format"] = form
    name = benchmark_name(config)
    if name == "longmemeval":
        extra["data"] = f"longmemeval/{config.get('longmemeval_variant') or 'oracle'}"
    elif name != "locomo":
        extra["data"] = name
    return bank_identity(manager=cfg.manager,
                         manager_checkpoint=config.memory.get("manager_checkpoint", "") or "",
                         model=config.model, facts=cfg.facts, num_slots=cfg.num_slots,
                         max_len=cfg.max_len, full_policy=cfg.full_policy,
                         max_sessions=cfg.max_sessions, extra=extra)


def build_all(builder: MemoryBuilder, convs: Sequence[Conversation],
              directory: str | os.PathLike | None, *, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, ConversationMemory]:
    """Builds (or loads, when already done under ``directory``) every conversation's memory.

    Conversations that call the LLM are built ``conversations_per_batch`` at a time in
    lockstep (:meth:`MemoryBuilder.build_many`, a progress bar over sessions); each is saved
    as soon as its last session is applied, and a rerun resumes from the saved ones. Each
    built conversation's counts (ops, full-bank refusals, evictions, truncations) are logged,
    and ``directory/manifest.json`` sums them (:func:`mr1.memory.store.write_manifest`). With
    ``directory=None`` nothing is saved or resumed.

    Raises:
      RunIdentityError: (a ValueError) a finished conversation under ``directory`` was built under another budget
        (slots, tokens per memory, full policy or session limit) than ``builder.cfg``'s.
    """
    out, todo = {}, []
    for conv in convs:
        if directory is not None and is_done(directory, conv.sample_id):
            log(f"{conv.sample_id}: done, loading")
            mem = load_memory(directory, conv.sample_id)
            diff = budget_mismatch(mem.budget, builder.cfg.budget)
            if diff:
                raise RunIdentityError(
                    f"{directory}/{conv.sample_id} holds banks built under another budget ("
                    + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                    + "); pick another --config.memory.dir (or --workdir)")
            out[conv.sample_id] = mem
        else:
            todo.append(conv)
    lockstep = builder.uses_llm
    per = builder.cfg.conversations_per_batch if lockstep else 1
    total = sum(len(builder.sessions_of(c)) for c in todo) if lockstep else len(todo)
    bar = tqdm(total=total, desc="memory", unit="session" if lockstep else "conv",
               disable=not (progress and todo))

    def finish(mem: ConversationMemory) -> None:
        log(f"{mem.sample_id}: {mem.stats.summary()}")
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
    if directory is not None and todo:
        write_manifest(directory)
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
