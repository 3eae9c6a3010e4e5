"""The Memory Manager's RL task (Memory-R1 §3.2): ops rewarded by a frozen Answer Agent.

**Training data** (as in the paper). For a LoCoMo conversation, the facts are LoCoMo's
observations, each tied to the dialogue turn it comes from (its ``evidence`` id ``D<s>:<t>``).
They are sorted by turn and ADDed in that order to one bank per speaker
(:func:`temporal_memory`): slot ``i`` of a speaker's bank is then that speaker's ``i``-th fact,
so the *temporal memory bank of the turns before turn t* is the full bank with only its first
``n_t`` slots valid (:func:`prefix_bank`) -- one bank build serves every turn, exactly. A
training sample (:class:`ManagerSample`) is one fact of a turn that is evidence for at least
one QA, with the bank of all preceding turns (every earlier turn, not a window) and the QAs
whose evidence holds that turn. ``conv-26`` gives 104 samples (174 fact-QA links, 121 of its
152 QAs), ``conv-30`` (validation) 57.

**Rollout** (:meth:`ManagerTask.rollout`). The manager sees the fact and the ``retrieve_k``
memories of that speaker most similar to it (display ids ``0..k-1``) and replies in the form
``memory.manager_format`` names (the paper's JSON, one op line, or one op word sampled from the
four op words only, :func:`mr1.memory.ops.choice_to_op`); ``G`` outputs per fact are sampled at
temperature 1. Each output is parsed (:func:`output_op`; the first op counts: one op per
fact), and all ``P * G``
ops are applied at once, each to its own copy of the sample's prefix bank, by one jitted
``vmap`` (:func:`apply_sample_ops`; the copies never see each other's ops). The frozen Answer
Agent then answers every linked question from each resulting pair of banks (its usual prompt:
top-``answer.top_k`` memories per speaker; without the distillation step when
``answer.distill`` is False), greedily, and the reward of an output is the mean
over its linked QAs of ``config.reward`` (EM, the paper's, plus optional F1), minus
``reward.invalid_penalty`` when the op was malformed or refused (it is then applied as NOOP).
Identical answer prompts (e.g. every NOOP of one fact) are answered once.

Validation runs the same scoring with greedy manager outputs on ``conv-30`` and reports the
answers' F1 / BLEU-1 / EM, the op distribution and the invalid-op rate.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mr1.agents import prompts as PR
from mr1.agents.answer import parse_answer
from mr1.agents.pipeline import (BuildStats, ConversationMemory, PipelineConfig, apply_ops,
                                 make_tokenize, new_speaker_memory)
from mr1.data.records import Conversation
from mr1.data.select import select_locomo
from mr1.eval import metrics as M
from mr1.memory import bank as B
from mr1.memory.env import step_once
from mr1.memory.ops import ParsedOp, op_choice_tokens, parse_op_choice, parse_ops
from mr1.registry import ConfigError
from mr1.rl.answer_task import PAD_MULTIPLE
from mr1.rl.rewards import combined_reward
from mr1.rl.rollout import greedy_texts, sample_and_score
from mr1.sampling import SamplingConfig, encode_prompts, left_pad

__all__ = ["ManagerSample", "ManagerData", "ManagerTask", "temporal_memory", "prefix_bank",
           "build_manager_data", "apply_sample_ops", "first_op", "OP_NAMES", "train_memory"]

OP_NAMES = tuple(op.name for op in B.OpCode)  # NOOP, ADD, UPDATE, DELETE
_TURN = re.compile(r"D(\d+):(\d+)")
NO_TURN = 10 ** 6  # facts whose evidence id does not parse go after their session's turns


def turn_key(session_idx: int, evidence: Sequence[str]) -> tuple[int, int]:
    """``(session, turn)`` of a fact's first parseable evidence id (``D<s>:<t>``)."""
    for e in evidence:
        m = _TURN.fullmatch(e.strip())
        if m:
            return int(m.group(1)), int(m.group(2))
    return session_idx, NO_TURN


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True)
class ManagerSample:
    """One fact to manage: who it is about, the bank before its turn and the linked QAs.

    ``prefix[s]`` memories of speaker ``s`` precede the fact's turn (slots ``< prefix[s]`` of
    the temporal bank); ``shown`` are the slots displayed to the manager as ids ``0..k-1``.
    """

    conv_id: str
    fact: str
    speaker: int
    turn: str
    date: str
    prefix: tuple[int, int]
    shown: tuple[int, ...]
    qa_indices: tuple[int, ...]


@dataclasses.dataclass
class ManagerData:
    """The samples of one split, with everything scoring needs (host side)."""

    convs: dict[str, Conversation]
    memories: dict[str, ConversationMemory]
    samples: list[ManagerSample]
    fact_embeddings: np.ndarray      # [N, D]
    question_embeddings: dict[str, np.ndarray]  # conv id -> [num QAs, D]
    prompts: list[str]               # manager prompts, one per sample

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def max_links(self) -> int:
        """The most QAs linked to one sample (the padded question axis of a scoring call)."""
        return max((len(s.qa_indices) for s in self.samples), default=1)


def temporal_memory(conv: Conversation, cfg: PipelineConfig, embedder, tokenize, *,
                    pad_id: int = 0) -> tuple[ConversationMemory, list[tuple]]:
    """Both speakers' banks with every observation ADDed in turn order.

    Returns the memory and, per observation in that order, ``(key, speaker index, fact,
    date)``. Slot ``i`` of a speaker's bank holds that speaker's ``i``-th fact.
    """
    names = {conv.speaker_a: 0, conv.speaker_b: 1}
    dates = {s.idx: s.date for s in conv.sessions}
    facts = sorted(((turn_key(o.session_idx, o.evidence), i, names[o.speaker], o.text,
                     dates.get(o.session_idx, ""))
                    for i, o in enumerate(conv.observations)
                    if o.speaker in names and o.text.strip()), key=lambda r: r[:2])
    dim = int(embedder.dim)
    mems = [new_speaker_memory(conv.speaker_a, 0, cfg, dim, pad_id),
            new_speaker_memory(conv.speaker_b, 1, cfg, dim, pad_id)]
    counts = collections.Counter(spk for _, _, spk, _, _ in facts)
    if max(counts.values(), default=0) > cfg.num_slots:
        raise ConfigError(f"{conv.sample_id}: {max(counts.values())} facts for one speaker do not "
                          f"fit {cfg.num_slots} slots; raise memory.num_slots")
    stats = BuildStats(facts=len(facts))
    emb = (np.asarray(embedder.encode([f[3] for f in facts]), np.float32) if facts
           else np.zeros((0, dim), np.float32))
    for (key, _, spk, text, date), e in zip(facts, emb):
        mem = mems[spk]
        act = B.make_action(B.OpCode.ADD, -1, tokenize(text), e, spk, max_len=cfg.max_len,
                            dim=dim, pad_id=pad_id)
        apply_ops(mem, B.stack_actions([act]), [text], date, stats)
    rows = [(key, spk, text, date) for key, _, spk, text, date in facts]
    return ConversationMemory(conv.sample_id, mems, stats), rows


def prefix_bank(bank: B.MemoryBank, n) -> B.MemoryBank:
    """The bank as it was after its first ``n`` ADDs (slots ``>= n`` freed); jittable.

    Only valid for banks built by :func:`temporal_memory` (ADDs only, in slot order).
    """
    keep = jnp.arange(bank.num_slots) < n
    return bank.replace(
        tokens=jnp.where(keep[:, None], bank.tokens, bank.pad_id),
        lengths=jnp.where(keep, bank.lengths, 0), valid=bank.valid & keep,
        embeddings=jnp.where(keep[:, None], bank.embeddings, 0.0),
        speaker=jnp.where(keep, bank.speaker, -1), created=jnp.where(keep, bank.created, -1),
        updated=jnp.where(keep, bank.updated, -1), step=jnp.asarray(n, jnp.int32))


_retrieve_many = jax.jit(B.retrieve_many, static_argnums=2)


def build_manager_data(selected: Sequence[tuple[Conversation, Sequence]], cfg: PipelineConfig,
                       embedder, tokenize, *, pad_id: int = 0, max_samples: int = 0,
                       seed: int = 0) -> ManagerData:
    """Samples of the conversations in ``selected`` (``(conv, qas)`` pairs; ``qas`` are the
    QAs that may be linked). ``max_samples`` > 0 keeps a seeded random subset."""
    convs, memories, samples, fact_emb, q_emb, prompts = {}, {}, [], [], {}, []
    for conv, qas in selected:
        memory, rows = temporal_memory(conv, cfg, embedder, tokenize, pad_id=pad_id)
        position = {id(qa): i for i, qa in enumerate(conv.qas)}  # question ids may be ""
        by_turn = collections.defaultdict(list)
        for qa in qas:
            i = position.get(id(qa))
            i = conv.qas.index(qa) if i is None else i  # an equal copy of one of conv.qas
            for e in qa.evidence:
                by_turn[e.strip()].append(i)
        convs[conv.sample_id], memories[conv.sample_id] = conv, memory
        q_emb[conv.sample_id] = np.asarray(embedder.encode([qa.question for qa in conv.qas]),
                                           np.float32)
        picked = []
        for key, spk, text, date in rows:
            turn = f"D{key[0]}:{key[1]}"
            linked = tuple(sorted(set(by_turn.get(turn, ()))))
            before = tuple(sum(1 for k, s, _, _ in rows if s == sp and k < key) for sp in (0, 1))
            if linked:
                picked.append((text, spk, turn, date, before, linked))
        if not picked:
            continue
        emb = np.asarray(embedder.encode([p[0] for p in picked]), np.float32)
        for (text, spk, turn, date, before, linked), e in zip(picked, emb):
            mem = memory.speakers[spk]
            bank = prefix_bank(mem.bank, before[spk])
            r = jax.device_get(_retrieve_many(bank, jnp.asarray(e[None]), cfg.retrieve_k))
            shown = tuple(int(s) for s, ok in zip(r.indices[0], r.mask[0]) if ok)
            samples.append(ManagerSample(conv.sample_id, text, spk, turn, date, before, shown,
                                         linked))
            fact_emb.append(e)
            prompts.append(PR.memory_manager_prompt(
                mem.name, text, [(d, mem.texts[s] or "") for d, s in enumerate(shown)],
                form=cfg.manager_format, used=before[spk], capacity=cfg.num_slots))
    order = np.arange(len(samples))
    if max_samples and max_samples < len(samples):
        order = np.sort(np.random.default_rng(seed).choice(len(samples), max_samples,
                                                           replace=False))
    dim = int(embedder.dim)
    return ManagerData(convs, memories, [samples[i] for i in order],
                       np.asarray(fact_emb, np.float32).reshape(-1, dim)[order], q_emb,
                       [prompts[i] for i in order])


# ----------------------------------------------------------------------------- ops on bank copies

def first_op(text: str, num_shown: int) -> ParsedOp:
    """The op an output stands for: its first parsed entry (invalid -> NOOP, marked)."""
    return parse_ops(text, valid_ids=range(num_shown)).ops[0]


def output_op(text: str, sample: ManagerSample, memory: ConversationMemory, form: str
              ) -> ParsedOp:
    """The op of one manager output in prompt form ``form`` (a choice form, "op" or
    "json_op": a one-word choice whose target and text follow from the fact; otherwise the
    first op the parser finds)."""
    if PR.manager_form(form).choice:
        texts = memory.speakers[sample.speaker].texts
        return parse_op_choice(text, sample.fact, [texts[s] or "" for s in sample.shown])
    return first_op(text, len(sample.shown))


@jax.jit
def apply_sample_ops(banks: B.MemoryBank, speaker, prefix, actions: B.MemoryAction
                     ) -> tuple[B.MemoryBank, B.OpResult]:
    """Each sample's op applied to its own copy of its speaker's prefix bank.

    ``banks``: both speakers' full temporal banks stacked ``[2, ...]``; ``speaker [B]``,
    ``prefix [B]`` (memories before the sample's turn), ``actions [B]``. Returns ``B`` banks
    and results (one ``vmap``: sample ``b``'s bank only ever receives action ``b``). Each op
    is one step of the manager environment (:func:`mr1.memory.env.step_once`), the one place
    an op changes a bank.
    """
    def one(spk, n, act):
        bank = jax.tree.map(lambda x: x[spk], banks)
        return step_once(prefix_bank(bank, n), act, spk)
    return jax.vmap(one)(speaker, prefix, actions)


@functools.partial(jax.jit, static_argnums=5)
def retrieve_after_ops(banks: B.MemoryBank, own: B.MemoryBank, speaker, prefix, queries,
                       k: int):
    """Top-``k`` slots per speaker for each sample's questions after its op.

    ``own``: the per-sample banks of :func:`apply_sample_ops` ``[B, ...]``; the other speaker's
    bank is its prefix of ``banks``. ``queries [B, Q, D]``. Returns indices and masks
    ``[B, 2, Q, k]`` in speaker order (a, b).
    """
    def one(own_bank, spk, n2, q):
        other = prefix_bank(jax.tree.map(lambda x: x[1 - spk], banks), n2[1 - spk])
        r_own = B.retrieve_many(own_bank, q, k)
        r_other = B.retrieve_many(other, q, k)
        first = spk == 0
        idx = jnp.stack([jnp.where(first, r_own.indices, r_other.indices),
                         jnp.where(first, r_other.indices, r_own.indices)])
        mask = jnp.stack([jnp.where(first, r_own.mask, r_other.mask),
                          jnp.where(first, r_other.mask, r_own.mask)])
        return idx, mask
    return jax.vmap(one)(own, speaker, prefix, queries)


def stack_banks(memory: ConversationMemory) -> B.MemoryBank:
    """A conversation's two speaker banks as one bank with leaves ``[2, ...]``."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[s.bank for s in memory.speakers])


# ----------------------------------------------------------------------------- the task

MANAGER_PANELS = (("rollout reward (train samples)", ["reward_mean"]),
                  ("validation answers after the manager's ops (greedy, conv-30)",
                   ["val_f1", "val_bleu1", "val_em"]),
                  ("rollout ops (train samples, T=1)", ["op_add", "op_update", "op_delete",
                                                        "op_noop", "invalid_frac"]),
                  ("validation ops (greedy)", ["val_add", "val_update", "val_delete",
                                               "val_noop", "val_invalid"]))


@dataclasses.dataclass
class ManagerTask:
    """The Memory Manager's RL task (:class:`mr1.rl.trainer.RLTask`).

    ``answer_fn(prompts) -> outputs`` answers Answer-Agent prompts (default: greedy generation
    with ``answer_params``, the frozen Answer Agent); ``answer_distill`` picks their form
    (:func:`mr1.agents.prompts.answer_form`: with or without the distillation step).
    """

    train: ManagerData
    val: ManagerData
    policy: object
    embedder: object
    pipeline: PipelineConfig
    reward_weights: Mapping[str, float]
    invalid_penalty: float
    reply_max_new_tokens: int     # free-text forms' reply budget (a choice form samples 1)
    answer_top_k: int
    answer_max_new_tokens: int = 32
    answer_batch_size: int = 16
    eval_batch_size: int = 16
    answer_params: object = None
    answer_fn: Callable[[list[str]], list[str]] | None = None
    answer_distill: bool = True
    name = "Memory Manager"
    best_metric = "val_f1"
    curve_panels = MANAGER_PANELS

    def __post_init__(self):
        self.tokenize = make_tokenize(self.policy)
        # a choice form ("op", "json_op") samples one constrained word (the op) per output,
        # after the form's forced reply prefix (part of the encoded prompt)
        self.form = PR.manager_form(self.pipeline.manager_format)
        if self.form.mask_full_add:
            raise ConfigError(f"memory.manager_format={self.pipeline.manager_format!r} masks "
                              "ADD for full banks, which the facts task does not model: train "
                              "it with --config.manager.task=episodes")
        self.allowed_tokens = op_choice_tokens(self.tokenize) if self.form.choice else ()
        self.train_ids, self.train_mask = self._encode(self.train.prompts)
        self.val_ids, self.val_mask = self._encode(self.val.prompts)
        self._stacked = {}

    def __len__(self) -> int:
        return len(self.train)

    @property
    def max_new_tokens(self) -> int:
        """The sampling budget: one constrained word for a choice form ("op", "json_op"),
        else ``reply_max_new_tokens``."""
        return reply_budget(self.form, self.reply_max_new_tokens)

    def _encode(self, prompts):
        if not prompts:
            return np.zeros((0, PAD_MULTIPLE), np.int32), np.zeros((0, PAD_MULTIPLE), np.int32)
        ids = encode_prompts(self.policy, prompts, chat=True, reply_prefix=self.form.reply_prefix)
        length = -(-max(map(len, ids)) // PAD_MULTIPLE) * PAD_MULTIPLE
        return left_pad(ids, self.policy.pad_token_id, length)

    def _banks(self, conv_id: str) -> B.MemoryBank:
        if conv_id not in self._stacked:
            mem = (self.train.memories.get(conv_id) or self.val.memories[conv_id])
            self._stacked[conv_id] = stack_banks(mem)
        return self._stacked[conv_id]

    # -- scoring
    def score_outputs(self, data: ManagerData, idx: Sequence[int], texts: Sequence[str],
                      group: int) -> dict[str, np.ndarray]:
        """Rewards of manager outputs ``texts`` (``group`` consecutive outputs per sample of
        ``idx``): parse, apply to bank copies, answer the linked QAs, score.

        Returns per-output ``reward``, ``f1``, ``em``, ``bleu1`` (answer means over the linked
        QAs), ``invalid`` (0/1), ``op`` (an :class:`~mr1.memory.bank.OpCode` as applied).
        """
        samples = [data.samples[i] for i in idx for _ in range(group)]
        n = len(samples)
        form = self.pipeline.manager_format
        ops = [output_op(t, s, data.memories[s.conv_id], form) for t, s in zip(texts, samples)]
        actions = self._actions(ops, samples)
        out = {k: np.zeros(n, np.float32) for k in ("reward", "f1", "em", "bleu1", "invalid")}
        out["op"] = np.zeros(n, np.int32)
        # One vmapped bank copy per output, grouped by conversation (banks differ in shape
        # only when conversations' configs differ; they share one here).
        by_conv = collections.defaultdict(list)
        for j, s in enumerate(samples):
            by_conv[s.conv_id].append(j)
        golds: list[list[str]] = [[] for _ in range(n)]
        prompt_rows: list[list[str]] = [[] for _ in range(n)]
        for conv_id, rows in by_conv.items():
            conv, mem = data.convs[conv_id], data.memories[conv_id]
            banks = self._banks(conv_id)
            spk = jnp.asarray([samples[j].speaker for j in rows], jnp.int32)
            pre = jnp.asarray([samples[j].prefix for j in rows], jnp.int32)
            own_n = jnp.asarray([samples[j].prefix[samples[j].speaker] for j in rows], jnp.int32)
            acts = jax.tree.map(lambda x: jnp.asarray(x[np.asarray(rows)]), actions)
            own, res = apply_sample_ops(banks, spk, own_n, acts)
            # one query count per data set (not per batch): retrieve_after_ops compiles once
            q_max = data.max_links
            qe = data.question_embeddings[conv_id]
            queries = np.zeros((len(rows), q_max, qe.shape[1]), np.float32)
            for r, j in enumerate(rows):
                qi = list(samples[j].qa_indices)
                queries[r, : len(qi)] = qe[qi]
            idx_, mask_ = jax.device_get(retrieve_after_ops(banks, own, spk, pre,
                                                            jnp.asarray(queries),
                                                            self.answer_top_k))
            res = jax.device_get(res)
            for r, j in enumerate(rows):
                s, op = samples[j], ops[j]
                refused = bool(res.refused[r])
                out["invalid"][j] = float((not op.valid) or refused)
                out["op"][j] = int(op.op) if not refused else int(B.OpCode.NOOP)
                written = {}
                if bool(res.applied[r]) and op.op in (B.OpCode.ADD, B.OpCode.UPDATE):
                    written[int(res.slot[r])] = (s.date, op.text)
                for qn, qi in enumerate(s.qa_indices):
                    qa = conv.qas[qi]
                    per_speaker = []
                    for sp in (0, 1):
                        m = mem.speakers[sp]
                        items = []
                        for slot, ok in zip(idx_[r, sp, qn], mask_[r, sp, qn]):
                            if not ok:
                                continue
                            slot = int(slot)
                            if sp == s.speaker and slot in written:
                                items.append(written[slot])
                            else:
                                items.append((m.timestamps[slot], m.texts[slot] or ""))
                        per_speaker.append(items)
                    prompt_rows[j].append(PR.answer_prompt(
                        qa.question, conv.speaker_a, conv.speaker_b, *per_speaker,
                        form=PR.answer_form(self.answer_distill)))
                    golds[j].append(qa.answer)
        flat = [p for rows in prompt_rows for p in rows]
        unique = list(dict.fromkeys(flat))
        answers = dict(zip(unique, self._answer(unique)))
        for j in range(n):
            outs = [answers[p] for p in prompt_rows[j]]
            parsed = [parse_answer(o).answer for o in outs]
            r = [combined_reward(self.reward_weights, a, g, o)
                 for a, g, o in zip(parsed, golds[j], outs)]
            out["reward"][j] = float(np.mean(r)) - self.invalid_penalty * out["invalid"][j]
            out["f1"][j] = float(np.mean([M.f1(a, g) for a, g in zip(parsed, golds[j])]))
            out["em"][j] = float(np.mean([M.exact_match(a, g) for a, g in zip(parsed, golds[j])]))
            out["bleu1"][j] = float(np.mean([M.bleu1(a, g) for a, g in zip(parsed, golds[j])]))
        out["num_answer_prompts"] = np.asarray(len(unique))
        return out

    def _actions(self, ops: Sequence[ParsedOp], samples: Sequence[ManagerSample]
                 ) -> B.MemoryAction:
        """Batched actions ``[n]`` (targets mapped from display ids to slots; ADD/UPDATE texts
        embedded in one call)."""
        cfg, dim = self.pipeline, int(self.embedder.dim)
        n = len(ops)
        op = np.zeros((n,), np.int32)
        target = np.full((n,), -1, np.int32)
        tokens = np.full((n, cfg.max_len), self.policy.pad_token_id, np.int32)
        length = np.zeros((n,), np.int32)
        emb = np.zeros((n, dim), np.float32)
        texts, rows = [], []
        for i, (p, s) in enumerate(zip(ops, samples)):
            if not p.valid:
                continue
            op[i] = int(p.op)
            if p.id is not None and 0 <= p.id < len(s.shown):
                target[i] = s.shown[p.id]
            if p.op in (B.OpCode.ADD, B.OpCode.UPDATE):
                ids = np.asarray(list(self.tokenize(p.text)), np.int32)
                tokens[i, : min(ids.size, cfg.max_len)] = ids[: cfg.max_len]
                length[i] = ids.size   # untruncated: the bank reports the truncation
                texts.append(p.text)
                rows.append(i)
        if texts:
            emb[rows] = np.asarray(self.embedder.encode(texts), np.float32)
        speaker = np.asarray([s.speaker for s in samples], np.int32)
        return B.MemoryAction(op=op, target=target, tokens=tokens, length=length, embedding=emb,
                              speaker=speaker)

    def _answer(self, prompts: list[str]) -> list[str]:
        if self.answer_fn is not None:
            return list(self.answer_fn(prompts)) if prompts else []
        return frozen_answers(self.policy, self.answer_params, prompts,
                              self.answer_max_new_tokens, self.answer_batch_size)

    # -- RLTask
    def score(self, idx, texts, group: int) -> tuple[np.ndarray, dict]:
        """Rewards of training outputs ``texts`` (:meth:`score_outputs`) and their answers'
        EM / F1, the op distribution and the invalid-op rate."""
        scores = self.score_outputs(self.train, idx, texts, group)
        return scores["reward"], {"em_mean": float(scores["em"].mean()),
                                  "f1_mean": float(scores["f1"].mean()),
                                  "invalid_frac": float(scores["invalid"].mean()),
                                  **op_fractions(scores, prefix="op_"),
                                  "answer_prompts": float(scores["num_answer_prompts"])}

    def rollout(self, policy, params, idx, key, cfg: SamplingConfig) -> tuple[dict, dict]:
        """:func:`mr1.rl.rollout.sample_and_score` on the training facts ``idx``."""
        return sample_and_score(policy, params, self.train_ids[idx], self.train_mask[idx], key,
                                cfg, lambda texts: self.score(idx, texts, cfg.num_samples))

    def validate(self, policy, params, cfg: SamplingConfig) -> dict:
        """Greedy manager outputs on the validation facts, scored like the rollouts."""
        if not len(self.val):
            return {}
        texts = greedy_texts(policy, params, self.val_ids, self.val_mask, cfg,
                             min(self.eval_batch_size, len(self.val)))
        scores = self.score_outputs(self.val, np.arange(len(self.val)), texts, 1)
        return {"val_reward": float(scores["reward"].mean()),
                "val_f1": 100 * float(scores["f1"].mean()),
                "val_bleu1": 100 * float(scores["bleu1"].mean()),
                "val_em": 100 * float(scores["em"].mean()),
                **op_fractions(scores, prefix="val_")}


def frozen_answers(policy, params, prompts: list[str], max_new_tokens: int,
                   batch_size: int, bucket: int = 2 * PAD_MULTIPLE) -> list[str]:
    """Greedy answers of the frozen Answer Agent (``params``) to Answer-Agent prompts, in
    batches of ``batch_size`` (short lists wrap around: the number of distinct answer prompts
    varies per step and each batch shape would compile anew), padded to a multiple of
    ``bucket`` tokens."""
    if not prompts:
        return []
    ids = encode_prompts(policy, prompts, chat=True)
    length = -(-max(map(len, ids)) // bucket) * bucket
    arr, mask = left_pad(ids, policy.pad_token_id, length)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens)
    return greedy_texts(policy, params, arr, mask, cfg, batch_size)


def reply_budget(form: PR.ManagerForm, free_text_tokens: int) -> int:
    """New tokens a manager reply of ``form`` is sampled with: 1 (the op word) for a choice
    form, else ``free_text_tokens``."""
    return 1 if form.choice else int(free_text_tokens)


def op_fractions(scores: Mapping[str, np.ndarray], prefix: str) -> dict[str, float]:
    """Fractions of outputs applied as each op, and of invalid ones (``<prefix>add`` ...)."""
    ops, invalid = scores["op"], scores["invalid"].astype(bool)
    out = {f"{prefix}{name.lower()}": float(np.mean((ops == int(B.OpCode[name])) & ~invalid))
           for name in ("ADD", "UPDATE", "DELETE", "NOOP")}
    out[f"{prefix}invalid"] = float(np.mean(invalid))
    return out


# ----------------------------------------------------------------------------- entry point

def manager_data(config, split: str, policy, embedder, *, max_samples: int = 0) -> ManagerData:
    """:func:`build_manager_data` for a LoCoMo split under ``config``."""
    sel = select_locomo(ml_collections.ConfigDict(
        {"data_path": config.get("data_path", ""), "split": split}))
    return build_manager_data(sel, PipelineConfig.from_mapping(config.memory), embedder,
                              make_tokenize(policy), pad_id=policy.pad_token_id,
                              max_samples=max_samples, seed=config.seed)


def load_answer_params(config, policy, log=print):
    """The frozen Answer Agent's params: ``config.answer.checkpoint`` (an Answer Agent RL run's
    ``best`` or ``checkpoints``) or, if empty, the base model's."""
    ckpt = config.answer.get("checkpoint", "")
    if not ckpt:
        log("frozen Answer Agent: the base model (answer.checkpoint is empty)")
        return policy.params
    from mr1.models.trained import load_trained_params, run_config
    log(f"frozen Answer Agent: {ckpt}")
    return load_trained_params(ckpt, policy.params, run=run_config(ckpt))


def manager_run(config, workdir, *, policy=None, embedder=None, answer_fn=None, log=print):
    """What every Memory Manager task's run starts from: the checked workdir, the policy, the
    embedder and the frozen Answer Agent's params (None when ``answer_fn`` stands in)."""
    from mr1.models.trained import load_policy_from_config
    from mr1.rl.trainer import prepare_workdir

    workdir = prepare_workdir(config, workdir)
    policy = policy or load_policy_from_config(config)
    if embedder is None:
        from mr1.memory.embedder import load_embedder
        embedder = load_embedder()
    answer_params = None if answer_fn is not None else load_answer_params(config, policy, log)
    return workdir, policy, embedder, answer_params


def train_memory(config, workdir, *, policy=None, embedder=None, answer_fn=None,
                 log=print) -> dict:
    """Builds the Memory Manager task from ``config`` and runs (or resumes) training."""
    from mr1.rl.trainer import build_then_train

    workdir, policy, embedder, answer_params = manager_run(
        config, workdir, policy=policy, embedder=embedder, answer_fn=answer_fn, log=log)

    def build():
        train = manager_data(config, "train", policy, embedder,
                             max_samples=config.data.max_train_samples)
        val = manager_data(config, "validation", policy, embedder,
                           max_samples=config.eval.num_samples)
        log(f"manager samples: {len(train)} train ({sum(len(s.qa_indices) for s in train.samples)}"
            f" linked QAs), {len(val)} validation")
        return ManagerTask(
            train, val, policy, embedder, PipelineConfig.from_mapping(config.memory),
            dict(config.reward.answer), config.reward.invalid_penalty,
            config.manager.max_new_tokens, config.answer.top_k,
            answer_max_new_tokens=config.answer.max_new_tokens,
            answer_batch_size=config.answer.batch_size, eval_batch_size=config.eval.batch_size,
            answer_params=answer_params, answer_fn=answer_fn,
            answer_distill=config.answer.get("distill", True))

    return build_then_train(config, workdir, build, policy=policy, log=log)
