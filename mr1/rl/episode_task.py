"""The Memory Manager's episode task (issue 20): sessions replayed under a memory budget.

The per-fact task (:mod:`mr1.rl.memory_task`) rewards one op on the bank of *all* earlier facts,
so with room for every fact ADD is always best. Here the bank has ``memory.num_slots`` slots
per speaker and an episode is what a manager does to it over time:

**Windows.** An episode is a window of ``episode.window_sessions`` consecutive sessions of a
training conversation, replayed from a bank snapshot: both speakers' banks after the sessions
before the window, built at the run's budget by the rule manager ``episode.snapshot_manager``
(:data:`mr1.memory.managers.MANAGERS`; Memory-R2's LoCoMo-style rollouts). ``G`` op sequences
start from the same snapshot on ``G`` copies of the banks, each seeing only its own ops.

**Playing a session** is what :class:`~mr1.agents.pipeline.MemoryBuilder` does at test time:
every fact of the session is shown the top ``memory.retrieve_k`` memories of its speaker's
bank at the start of the session (and, in the ``"op_budget"`` form, how full that bank is);
all ``G x facts`` prompts go through one sampler call (one sample each at the rollout
temperature, the op word constrained in a choice form); the parsed ops are applied in fact
order to each copy by one jitted call (:func:`mr1.memory.episodes.apply_group`: ``vmap`` over
the copies of a ``scan`` of :func:`mr1.memory.env.transition`, the one place an op changes a
bank), and the host texts and :class:`~mr1.memory.store.BuildStats` follow the results
(:func:`mr1.memory.store.record_result`, as in the pipeline).

**Reward.** At the window's end the frozen Answer Agent answers the window's questions --
those whose evidence lies at or before its last session, the ones with evidence inside the
window first, at most ``episode.max_questions`` (seeded, fixed per window) -- from each copy,
with its usual prompt (:meth:`mr1.agents.answer.AnswerAgent.memory_prompts`). The episode
reward is the mean of ``config.reward.answer`` (EM + F1) over them, so deleting or
overwriting a memory a later question needs, or filling the bank with trivia that pushes the
evidence out, costs reward. ``reward.turn > 0`` adds the paper's per-turn reward: each fact's
op also earns ``reward.turn`` times the score of the questions whose evidence includes the
fact's turn, answered from its copy right after its session. A malformed or refused op (an ADD
into a full bank under ``refuse``) costs ``reward.invalid_penalty``.

**Rows of the update.** One completion per (episode, fact slot, sample), ordered
``[P, F, G]``: one sampled op each. Facts beyond a window's count are padding (completion mask
0). The ``G`` completions of one fact form an advantage group (the ``G`` op sequences'
rewards), so GRPO, Dr. GRPO and RLOO normalise over the ``G`` sequences of one snapshot; PPO's
GAE works per completion. In a one-session window (the default) the ``G`` copies are the
snapshot when the session starts, so a fact's ``G`` prompts are one: the update sees ``P * F``
prompts with ``G`` samples each (the Answer Agent's layout, each prompt scored once); longer
windows give each completion its own prompt (``P * F * G`` prompts of one sample). The train
step is :func:`mr1.rl.runner.make_train_step` with the task's :attr:`step_layout`.

**Validation** plays the whole validation conversation(s) from empty banks with greedy ops
(what evaluation does) and answers ``eval.num_questions`` seeded questions: F1 / BLEU-1 / EM,
the op distribution, full-bank refusals and evictions.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mr1.agents import prompts as PR
from mr1.agents.answer import AnswerAgent, parse_answer
from mr1.agents.pipeline import (BuildStats, ConversationMemory, MemoryBuilder, PipelineConfig,
                                 make_tokenize, new_speaker_memory)
from mr1.data.records import Conversation
from mr1.data.select import select_locomo
from mr1.eval import metrics as M
from mr1.memory import bank as B
from mr1.memory.episodes import apply_group, evidence_session
from mr1.memory.managers import manager_spec
from mr1.memory.ops import (ParsedOp, op_choice_groups, op_choice_tokens, ops_to_actions,
                            parse_op_choice, parse_ops)
from mr1.memory.store import record_result
from mr1.registry import ConfigError, Registry
from mr1.rl.memory_task import (OP_NAMES, frozen_answers, manager_run, reply_budget,
                                train_memory)
from mr1.rl.rewards import combined_reward
from mr1.rl.runner import StepLayout
from mr1.sampling import SamplingConfig, decode, encode_prompts, left_pad, sample_padded

__all__ = ["Window", "EpisodeData", "EpisodeTask", "build_episode_data", "train_episodes",
           "MANAGER_TASKS", "train_manager"]

_retrieve_many = jax.jit(B.retrieve_many, static_argnums=2)


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True)
class Window:
    """One episode: sessions ``sessions`` (positions in ``conv.sessions``) of ``conv_id``,
    replayed from the snapshot after the sessions before them; ``questions`` (indices into
    ``conv.qas``) are answered at its end."""

    conv_id: str
    sessions: tuple[int, ...]
    questions: tuple[int, ...]


@dataclasses.dataclass
class EpisodeData:
    """The windows of one split and what playing them needs (host side).

    ``facts[conv][pos]``: ``(speaker index, text, evidence ids)`` of session ``pos``;
    ``fact_embeddings[conv][pos]`` their ``[n, D]`` embeddings; ``snapshots[(conv, pos)]``:
    the banks before session ``pos``.
    """

    convs: dict[str, Conversation]
    windows: list[Window]
    facts: dict[str, list[list[tuple[int, str, tuple[str, ...]]]]]
    fact_embeddings: dict[str, list[np.ndarray]]
    snapshots: dict[tuple[str, int], ConversationMemory]

    def __len__(self) -> int:
        return len(self.windows)

    def window_facts(self, w: Window) -> int:
        """Facts of a window (its rows per sample)."""
        return sum(len(self.facts[w.conv_id][p]) for p in w.sessions)

    @property
    def max_facts(self) -> int:
        return max((self.window_facts(w) for w in self.windows), default=1)


def pick_questions(conv: Conversation, sessions: Sequence[int], limit: int, seed: int
                   ) -> tuple[int, ...]:
    """The questions a window ending at session position ``sessions[-1]`` answers: evidence
    at or before its last session; those with evidence inside the window first, then earlier
    ones, each part in a seeded order; at most ``limit`` (0: all)."""
    nums = [conv.sessions[p].idx for p in sessions]
    first, last = min(nums), max(nums)
    inside, before = [], []
    for i, qa in enumerate(conv.qas):
        s = evidence_session(qa.evidence)
        if s is None or s > last:
            continue
        (inside if s >= first else before).append(i)
    rng = np.random.default_rng([seed, last])
    order = [int(i) for part in (inside, before) for i in rng.permutation(part)]
    return tuple(sorted(order[:limit] if limit else order))


def snapshot(conv: Conversation, pos: int, cfg: PipelineConfig, embedder, policy
             ) -> ConversationMemory:
    """The banks after the first ``pos`` sessions of ``conv`` under ``cfg``'s budget, built by
    ``cfg.manager`` (a rule manager); empty banks for ``pos == 0``."""
    if pos == 0:
        pad = policy.pad_token_id if policy is not None else 0
        dim = int(embedder.dim)
        mems = [new_speaker_memory(conv.speaker_a, 0, cfg, dim, pad),
                new_speaker_memory(conv.speaker_b, 1, cfg, dim, pad)]
        return ConversationMemory(conv.sample_id, mems, BuildStats(), cfg.budget)
    builder = MemoryBuilder(dataclasses.replace(cfg, max_sessions=pos), embedder, policy)
    return builder.build(conv)


def build_episode_data(selected: Sequence[tuple[Conversation, Sequence]], cfg: PipelineConfig,
                       embedder, policy, *, window_sessions: int, snapshot_manager: str,
                       max_questions: int, seed: int, whole: bool = False,
                       min_start: int = 0) -> EpisodeData:
    """Windows of ``window_sessions`` sessions of each ``(conv, qas)`` pair (every start
    position ``>= min_start``; ``whole``: one window of all sessions from empty banks, what
    validation plays), their facts, embeddings and snapshots (built by ``snapshot_manager``
    at ``cfg``'s budget). Windows with no question are skipped."""
    spec = manager_spec(snapshot_manager)
    if spec.decide is None or spec.reads_gold:
        raise ConfigError(f"episode.snapshot_manager must be a rule manager that reads no "
                          f"answers, got {snapshot_manager!r}")
    snap_cfg = dataclasses.replace(cfg, manager=snapshot_manager)
    builder = MemoryBuilder(snap_cfg, embedder, policy)
    convs, windows, facts, embs, snaps = {}, [], {}, {}, {}
    for conv, _ in selected:
        cid = conv.sample_id
        convs[cid] = conv
        names = {conv.speaker_a: 0, conv.speaker_b: 1}
        facts[cid], embs[cid] = [], []
        sessions_used = conv.sessions[: cfg.max_sessions or None]
        for session in sessions_used:
            rows = [(names[s], f, tuple(ev))
                    for s, f, ev in builder.session_fact_rows(conv, session)
                    if s in names and f.strip()]
            facts[cid].append(rows)
            embs[cid].append(np.asarray(embedder.encode([r[1] for r in rows]), np.float32)
                             .reshape(len(rows), int(embedder.dim)))
        n = len(sessions_used)
        starts = [0] if whole else range(min_start, n - window_sessions + 1)
        for start in starts:
            sessions = tuple(range(start, n if whole else start + window_sessions))
            questions = pick_questions(conv, sessions, max_questions, seed)
            if not questions or not sum(len(facts[cid][p]) for p in sessions):
                continue
            if (cid, start) not in snaps:
                snaps[(cid, start)] = snapshot(conv, start, snap_cfg, embedder, policy)
            windows.append(Window(cid, sessions, questions))
    return EpisodeData(convs, windows, facts, embs, snaps)


# ----------------------------------------------------------------------------- playing

@dataclasses.dataclass
class Played:
    """What playing windows gave: per row ``[E, F, G]`` the prompt ids, the sampled tokens and
    their log-probs, the applied op, validity and per-turn score; per copy ``[E, G]`` the final
    memories and stats."""

    prompt_ids: list          # [E][F][G] token id lists (None: padding)
    tokens: np.ndarray        # [E, F, G, N]
    logp: np.ndarray          # [E, F, G, N]
    lengths: np.ndarray       # [E, F, G]
    op: np.ndarray            # [E, F, G] OpCode as applied (NOOP when refused / invalid)
    invalid: np.ndarray       # [E, F, G] malformed or refused
    full: np.ndarray          # [E, F, G] an ADD refused by a full bank
    active: np.ndarray        # [E, F, G]
    turn_score: np.ndarray    # [E, F, G] per-turn score (nan: no linked question)
    memories: list            # [E][G] ConversationMemory


@dataclasses.dataclass
class EpisodeTask:
    """The Memory Manager's episode task (:class:`mr1.rl.trainer.RLTask`; module docstring).

    ``answer_fn(prompts) -> outputs`` answers Answer-Agent prompts (default: greedy generation
    with ``answer_params``, the frozen Answer Agent).
    """

    train: EpisodeData
    val: EpisodeData
    policy: object
    embedder: object
    pipeline: PipelineConfig
    reward_weights: Mapping[str, float]
    invalid_penalty: float
    reply_max_new_tokens: int
    answer_top_k: int
    group_size: int
    episodes_per_step: int
    rows_multiple: int = 1          # P * F must split into mini-batches of micro-batches
    max_facts: int = 0              # F, fact slots per episode (episode.max_facts; 0: the
                                    # data's most, rounded up to split into micro-batches)
    turn_weight: float = 0.0
    sample_batch: int = 32          # sampled rows per sampler call (prompts x samples)
    prompt_bucket: int = 128        # prompt lengths round up to this (the sampler and the
                                    # update compile once per bucket; prompts grow as the
                                    # bank fills)
    answer_max_new_tokens: int = 32
    answer_batch_size: int = 16
    answer_params: object = None
    answer_fn: Callable[[list[str]], list[str]] | None = None
    answer_distill: bool = True
    name = "Memory Manager (episodes)"
    best_metric = "val_f1"

    def __post_init__(self):
        self.tokenize = make_tokenize(self.policy)
        self.form = PR.manager_form(self.pipeline.manager_format)
        self.allowed_tokens = op_choice_tokens(self.tokenize) if self.form.choice else ()
        self.agent = AnswerAgent(self.policy, self.embedder, top_k=self.answer_top_k,
                                 distill=self.answer_distill)
        # one-session windows: the G copies are the snapshot when the session starts, so a
        # fact's G prompts are one prompt with G samples (scored once in the update)
        self.shared_prompts = all(len(w.sessions) == 1 for w in self.train.windows)
        per_fact = 1 if self.shared_prompts else self.group_size
        f = self.train.max_facts
        if self.max_facts:
            if f > self.max_facts:
                raise ConfigError(f"a training window has {f} facts, more than "
                                  f"episode.max_facts={self.max_facts}; raise it")
            f = self.max_facts
        while (self.episodes_per_step * f * per_fact) % self.rows_multiple:
            f += 1
        self.facts_per_episode = f  # F: rows per sample of an episode, padded
        G = self.group_size
        self.step_layout = (StepLayout(prompts=self.episodes_per_step * f, group_size=G,
                                       advantage_group=G) if self.shared_prompts else
                            StepLayout(prompts=self.episodes_per_step * f * G, group_size=1,
                                       advantage_group=G))

    curve_panels = (("episode reward (train windows)", ["reward_mean", "episode_reward"]),
                    ("validation answers after the manager's banks (greedy)",
                     ["val_f1", "val_bleu1", "val_em"]),
                    ("rollout ops (valid choices, T=1)", ["op_add", "op_update", "op_delete",
                                                          "op_noop", "invalid_frac"]),
                    ("validation ops (greedy)", ["val_add", "val_update", "val_delete",
                                                 "val_noop", "val_invalid"]))

    def __len__(self) -> int:
        return len(self.train)

    @property
    def max_new_tokens(self) -> int:
        return reply_budget(self.form, self.reply_max_new_tokens)

    # -- the answer side
    def _answer(self, prompts: list[str]) -> list[str]:
        if self.answer_fn is not None:
            return list(self.answer_fn(prompts)) if prompts else []
        return frozen_answers(self.policy, self.answer_params, prompts,
                              self.answer_max_new_tokens, self.answer_batch_size,
                              bucket=self.prompt_bucket)

    def _scores(self, jobs: list[tuple[Conversation, ConversationMemory, list[int]]]
                ) -> list[dict[str, np.ndarray]]:
        """Per job (a conversation, its banks, question indices): the frozen agent's answers'
        reward / F1 / EM / BLEU-1 per question (identical prompts answered once)."""
        prompts = [self.agent.memory_prompts(conv, mem, [conv.qas[i].question for i in qs])
                   if qs else [] for conv, mem, qs in jobs]
        unique = list(dict.fromkeys(p for ps in prompts for p in ps))
        answers = dict(zip(unique, self._answer(unique)))
        out = []
        for (conv, _, qs), ps in zip(jobs, prompts):
            raw = [answers[p] for p in ps]
            parsed = [parse_answer(o).answer for o in raw]
            golds = [conv.qas[i].answer for i in qs]
            out.append({
                "reward": np.asarray([combined_reward(self.reward_weights, a, g, o)
                                      for a, g, o in zip(parsed, golds, raw)], np.float32),
                "f1": np.asarray([M.f1(a, g) for a, g in zip(parsed, golds)], np.float32),
                "em": np.asarray([M.exact_match(a, g) for a, g in zip(parsed, golds)],
                                 np.float32),
                "bleu1": np.asarray([M.bleu1(a, g) for a, g in zip(parsed, golds)],
                                    np.float32)})
        return out

    # -- the manager side
    def _prompts_of_session(self, mem: ConversationMemory, rows, emb
                            ) -> tuple[list, list, list]:
        """Manager prompts of one session's facts on the banks as they are (the session's
        start), the slots shown per fact, and whether a masked form may not ADD it (its bank
        is full under ``refuse``)."""
        k = self.pipeline.retrieve_k
        shown: list[list[int]] = [[] for _ in rows]
        for spk in (0, 1):
            idx = [i for i, r in enumerate(rows) if r[0] == spk]
            if not idx:
                continue
            r = jax.device_get(_retrieve_many(mem.speakers[spk].bank,
                                              jnp.asarray(emb[idx]), k))
            for j, i in enumerate(idx):
                shown[i] = [int(s) for s, ok in zip(r.indices[j], r.mask[j]) if ok]
        used = [int(np.asarray(s.bank.valid).sum()) for s in mem.speakers]
        prompts = [PR.memory_manager_prompt(
            mem.speakers[spk].name, text,
            [(d, mem.speakers[spk].texts[s] or "") for d, s in enumerate(slots)],
            form=self.pipeline.manager_format, used=used[spk],
            capacity=self.pipeline.num_slots)
            for (spk, text, _), slots in zip(rows, shown)]
        full = [self.form.mask_full_add and self.pipeline.refuses_add(used[spk])
                for spk, _, _ in rows]
        return prompts, shown, full

    def _op(self, text: str, fact: str, shown_texts: list[str]) -> ParsedOp:
        if self.form.choice:
            return parse_op_choice(text, fact, shown_texts)
        return parse_ops(text, valid_ids=range(len(shown_texts))).ops[0]

    def _sample_masked(self, params, prompts: list[str], full: list[bool], key,
                       cfg: SamplingConfig):
        """:meth:`_sample` with each prompt's op words: a choice form's prompts grouped by
        :func:`mr1.memory.ops.op_choice_groups` (``full``: no ADD), one call per group, the
        rows put back in prompt order."""
        if not (self.form.choice and any(full)):
            return self._sample(params, prompts, key, cfg)
        k, ids = cfg.num_samples, [None] * len(prompts)
        tokens = logp = lengths = None
        texts = [""] * (len(prompts) * k)
        for c, (idx, allowed) in enumerate(op_choice_groups(self.tokenize, full)):
            gi, gt, glp, gln, gtx = self._sample(
                params, [prompts[i] for i in idx], jax.random.fold_in(key, c),
                dataclasses.replace(cfg, allowed_tokens=allowed))
            rows = (idx[:, None] * k + np.arange(k)).reshape(-1)
            if tokens is None:
                n = len(prompts) * k
                tokens = np.zeros((n,) + gt.shape[1:], gt.dtype)
                logp = np.zeros((n,) + glp.shape[1:], glp.dtype)
                lengths = np.zeros((n,), gln.dtype)
            tokens[rows], logp[rows], lengths[rows] = gt, glp, gln
            for i, x in zip(idx, gi):
                ids[i] = x
            for r, x in zip(rows, gtx):
                texts[r] = x
        return ids, tokens, logp, lengths, texts

    def _sample(self, params, prompts: list[str], key, cfg: SamplingConfig):
        """``cfg.num_samples`` samples of each prompt (one prefill per prompt), in calls of
        ``sample_batch`` sampled rows (at least 8 prompts; a shorter rest goes in the smallest
        power-of-two batch, >= 8, that holds it, wrapping around: few compiled shapes, little
        padding). Returns the prompts' token id lists and, per sampled row (prompt-major),
        tokens, log-probs, lengths and texts."""
        ids = encode_prompts(self.policy, prompts, chat=True, reply_prefix=self.form.reply_prefix)
        length = -(-max(map(len, ids)) // self.prompt_bucket) * self.prompt_bucket
        arr, mask = left_pad(ids, self.policy.pad_token_id, length)
        n, k = len(prompts), cfg.num_samples
        per_call = max(8, self.sample_batch // k)
        toks, logps, lens = [], [], []
        for c, s in enumerate(range(0, n, per_call)):
            b = min(per_call, max(8, 1 << (n - s - 1).bit_length()))
            sel = np.arange(s, s + b) % n
            t, lp, ln = sample_padded(self.policy, arr[sel], mask[sel],
                                      jax.random.fold_in(key, c), cfg, params=params)
            m = min(b, n - s) * k
            toks.append(t[:m]), logps.append(lp[:m]), lens.append(ln[:m])
        tokens, logp, lengths = (np.concatenate(toks), np.concatenate(logps),
                                 np.concatenate(lens))
        return ids, tokens, logp, lengths, decode(self.policy, tokens, lengths)

    def play(self, data: EpisodeData, windows: Sequence[Window], group: int, params, key,
             cfg: SamplingConfig, rows_per_episode: int | None = None) -> Played:
        """Plays ``group`` op sequences of each window from its snapshot (module docstring)."""
        E, G = len(windows), group
        F = rows_per_episode or max(data.window_facts(w) for w in windows)
        N = cfg.max_new_tokens
        mems = [[copy.deepcopy(data.snapshots[(w.conv_id, w.sessions[0])]) for _ in range(G)]
                for w in windows]
        for row in mems:
            for m in row:
                m.stats = BuildStats()
        played = Played(prompt_ids=[[[None] * G for _ in range(F)] for _ in range(E)],
                        tokens=np.zeros((E, F, G, N), np.int32),
                        logp=np.zeros((E, F, G, N), np.float32),
                        lengths=np.zeros((E, F, G), np.int32),
                        op=np.full((E, F, G), int(B.OpCode.NOOP), np.int32),
                        invalid=np.zeros((E, F, G), bool), full=np.zeros((E, F, G), bool),
                        active=np.zeros((E, F, G), bool),
                        turn_score=np.full((E, F, G), np.nan, np.float32), memories=mems)
        offset = [0] * E
        for j in range(max(len(w.sessions) for w in windows)):
            # a window's first session starts from the snapshot in every copy: one prompt per
            # fact with G samples; later sessions: each copy's own prompts, one sample each
            shared = j == 0
            owners, prompts, full = [], [], []  # per prompt: its (e, g, i, f, row, shown)
            for e, w in enumerate(windows):
                if j >= len(w.sessions):
                    continue
                pos = w.sessions[j]
                rows, emb = data.facts[w.conv_id][pos], data.fact_embeddings[w.conv_id][pos]
                for g0 in ([0] if shared else range(G)):
                    ps, shown, no_add = self._prompts_of_session(mems[e][g0], rows, emb)
                    prompts += ps
                    full += no_add
                    owners += [[(e, g, i, offset[e] + i, r, sh)
                                for g in (range(G) if shared else [g0])]
                               for i, (r, sh) in enumerate(zip(rows, shown))]
            if not prompts:
                continue
            k = G if shared else 1
            ids, tokens, logp, lengths, texts = self._sample_masked(
                params, prompts, full, jax.random.fold_in(key, j),
                dataclasses.replace(cfg, num_samples=k))
            batch, rows_of = [], []
            for p, own in enumerate(owners):
                for s_, item in enumerate(own):
                    batch.append(item)
                    rows_of.append((p, p * k + s_))
            texts = [texts[r] for _, r in rows_of]
            self._apply_session(data, windows, j, mems, batch, texts, played)
            for (e, g, _, f, _, _), (p, r) in zip(batch, rows_of):
                t, lp, ln = tokens[r], logp[r], lengths[r]
                played.prompt_ids[e][f][g] = ids[p]
                played.tokens[e, f, g, : t.shape[0]] = t
                played.logp[e, f, g, : lp.shape[0]] = lp
                played.lengths[e, f, g] = ln
                played.active[e, f, g] = True
            if self.turn_weight:
                self._turn_scores(data, windows, mems, batch, played)
            for e, w in enumerate(windows):
                if j < len(w.sessions):
                    offset[e] += len(data.facts[w.conv_id][w.sessions[j]])
        return played

    def _apply_session(self, data, windows, j, mems, batch, texts, played) -> None:
        """Parses one session's outputs and applies them in fact order to every copy (one
        jitted call for all copies); the host texts and stats follow."""
        by_copy: dict[tuple[int, int], list] = {}
        for item, text in zip(batch, texts):
            by_copy.setdefault((item[0], item[1]), []).append((item, text))
        width = max(len(v) for v in by_copy.values())
        cfg, dim = self.pipeline, int(self.embedder.dim)
        parsed = {}
        need = []
        for key, items in by_copy.items():
            e, g = key
            mem = mems[e][g]
            for (e_, g_, i, f, (spk, fact, _), shown), text in items:
                sp = mem.speakers[spk]
                op = self._op(text, fact, [sp.texts[s] or "" for s in shown])
                parsed[(e, g, i)] = op
                if op.valid and op.op in (B.OpCode.ADD, B.OpCode.UPDATE):
                    need.append(op.text)
        unique = list(dict.fromkeys(need))
        cache = dict(zip(unique, np.asarray(self.embedder.encode(unique), np.float32)
                         .reshape(len(unique), dim))) if unique else {}
        embed = lambda ts: np.stack([cache[t] for t in ts])  # noqa: E731
        pad = self.policy.pad_token_id
        copies = sorted(by_copy)
        acts, active = [], np.zeros((len(copies), width), bool)
        for c, key in enumerate(copies):
            rows = []
            for (e, g, i, f, (spk, fact, _), shown), _ in by_copy[key]:
                rows.append(ops_to_actions([parsed[(e, g, i)]], self.tokenize,
                                           max_len=cfg.max_len, dim=dim, embed=embed,
                                           speaker=spk, pad_id=pad,
                                           id_to_slot=dict(enumerate(shown))))
            rows += [ops_to_actions([], self.tokenize, max_len=cfg.max_len, dim=dim,
                                    pad_id=pad)] * (width - len(rows))
            active[c, : len(by_copy[key])] = True
            acts.append(jax.tree.map(lambda *xs: np.concatenate(xs), *rows))
        actions = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *acts)
        banks = jax.tree.map(lambda *xs: jnp.stack(xs), *[
            jax.tree.map(lambda *b: jnp.stack(b), *[s.bank for s in mems[e][g].speakers])
            for e, g in copies])
        new, res = jax.device_get(apply_group(banks, actions, jnp.asarray(active)))
        for c, (e, g) in enumerate(copies):
            mem = mems[e][g]
            for spk, sp in enumerate(mem.speakers):
                sp.bank = jax.tree.map(lambda x: jnp.asarray(x[c, spk]), new)
            pos = windows[e].sessions[j]
            date = data.convs[windows[e].conv_id].sessions[pos].date
            for k, ((_, _, i, f, (spk, fact, _), shown), _) in enumerate(by_copy[(e, g)]):
                op = parsed[(e, g, i)]
                r = jax.tree.map(lambda x: x[c, k], res)
                mem.stats.facts += 1
                mem.stats.manager_calls += 1
                if not op.valid:
                    mem.stats.invalid[op.reason.value] += 1
                code = int(op.op) if op.valid else int(B.OpCode.NOOP)
                record_result(mem.speakers[spk], code, r, op.text, date, mem.stats)
                refused = bool(r.refused)
                played.invalid[e, f, g] = (not op.valid) or refused
                played.full[e, f, g] = refused and int(r.reason) == int(B.Refusal.BANK_FULL)
                played.op[e, f, g] = code if not refused else int(B.OpCode.NOOP)

    def _turn_scores(self, data, windows, mems, batch, played) -> None:
        """Per-turn scores of this session's facts: the questions linked to a fact's turn,
        answered from its copy after the session."""
        jobs, where = [], []
        for e, g, i, f, (spk, fact, evidence), _ in batch:
            conv = data.convs[windows[e].conv_id]
            ev = {x.strip() for x in evidence}
            qs = [q for q, qa in enumerate(conv.qas) if ev & {x.strip() for x in qa.evidence}]
            if qs:
                jobs.append((conv, mems[e][g], qs))
                where.append((e, f, g))
        for (e, f, g), s in zip(where, self._scores(jobs)):
            played.turn_score[e, f, g] = float(s["reward"].mean())

    def episode_scores(self, data, windows, played) -> list[list[dict]]:
        """Each copy's answers to its window's questions, ``[E][G]`` score dicts."""
        jobs = [(data.convs[w.conv_id], m, list(w.questions))
                for w, row in zip(windows, played.memories) for m in row]
        flat = self._scores(jobs)
        G = len(played.memories[0])
        return [flat[e * G:(e + 1) * G] for e in range(len(windows))]

    # -- RLTask
    def rollout(self, policy, params, idx, key, cfg: SamplingConfig) -> tuple[dict, dict]:
        """Plays ``G`` op sequences of each window ``idx`` and scores them: the update's rows
        (``[P, F, G]`` flattened; module docstring) and the step's metrics."""
        del policy
        t0 = time.time()
        windows = [self.train.windows[i] for i in idx]
        E, F, G = len(windows), self.facts_per_episode, self.group_size
        played = self.play(self.train, windows, G, params, key, cfg, rows_per_episode=F)
        rollout_s = time.time() - t0
        t1 = time.time()
        scores = self.episode_scores(self.train, windows, played)
        episode = np.asarray([[float(s["reward"].mean()) for s in row] for row in scores],
                             np.float32)                                   # [E, G]
        rewards = np.broadcast_to(episode[:, None, :], (E, F, G)).copy()
        if self.turn_weight:
            rewards += self.turn_weight * np.nan_to_num(played.turn_score, nan=0.0)
        rewards -= self.invalid_penalty * played.invalid
        reward_s = time.time() - t1
        arrays = self._rows(played, rewards)
        metrics = {"reward_mean": float(rewards[played.active].mean()),
                   "reward_std": float(rewards[played.active].std()),
                   "episode_reward": float(episode.mean()),
                   "episode_reward_std_in_group": float(episode.std(axis=1).mean()),
                   "f1_mean": float(np.mean([s["f1"].mean() for r in scores for s in r])),
                   "em_mean": float(np.mean([s["em"].mean() for r in scores for s in r])),
                   **op_metrics(played, prefix="op_"),
                   "rollout_s": rollout_s, "reward_s": reward_s,
                   "completion_len": float(played.lengths[played.active].mean()),
                   "truncated_frac": float(np.mean(played.lengths[played.active]
                                                   >= cfg.max_new_tokens)),
                   "rollout_tok_s": float(arrays["prompt_mask"].sum()
                                          + arrays["completion_mask"].sum()) / rollout_s}
        return arrays, metrics

    def _rows(self, played: Played, rewards: np.ndarray) -> dict:
        """The update's host arrays from ``played``: completions ``[E * F * G]``; prompts
        ``[E * F]`` (one per fact: its G copies saw one prompt) when ``shared_prompts``, else
        one per completion. Padding rows copy the first real prompt, completion mask 0."""
        E, F, G = played.active.shape
        if self.shared_prompts:
            ids = []
            for ep in played.prompt_ids:
                for fr in ep:
                    if any(p != fr[0] for p in fr):
                        raise AssertionError("a fact's copies saw different prompts in a "
                                             "one-session window")
                    ids.append(fr[0])
        else:
            ids = [p for ep in played.prompt_ids for fr in ep for p in fr]
        first = next(p for p in ids if p is not None)
        b = self.prompt_bucket
        length = -(-max(len(p) for p in ids if p is not None) // b) * b
        prompt_ids, prompt_mask = left_pad([p if p is not None else first for p in ids],
                                           self.policy.pad_token_id, length)
        n = played.tokens.shape[-1]
        tokens = played.tokens.reshape(E * F * G, n)
        lengths = played.lengths.reshape(-1)
        cmask = ((np.arange(n)[None] < lengths[:, None]) & played.active.reshape(-1, 1)
                 ).astype(np.float32)
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "tokens": tokens,
                "completion_mask": cmask, "old_logp": played.logp.reshape(E * F * G, n),
                "rewards": rewards.reshape(-1).astype(np.float32)}

    def validate(self, policy, params, cfg: SamplingConfig) -> dict:
        """Greedy ops over each validation window (the whole conversation from empty banks)
        and the frozen agent's answers to its questions."""
        del policy
        if not len(self.val):
            return {}
        played = self.play(self.val, self.val.windows, 1, params, jax.random.PRNGKey(0), cfg)
        scores = [row[0] for row in self.episode_scores(self.val, self.val.windows, played)]
        cat = {k: np.concatenate([s[k] for s in scores]) for k in ("reward", "f1", "em", "bleu1")}
        stats = [row[0].stats for row in played.memories]
        return {"val_reward": float(cat["reward"].mean()), "val_f1": 100 * float(cat["f1"].mean()),
                "val_bleu1": 100 * float(cat["bleu1"].mean()),
                "val_em": 100 * float(cat["em"].mean()),
                **op_metrics(played, prefix="val_"),
                "val_bank_full": float(sum(s.refused["bank_full"] for s in stats)),
                "val_evicted": float(sum(s.evicted for s in stats))}


def op_metrics(played: Played, prefix: str) -> dict[str, float]:
    """Fractions of active rows applied as each op and invalid ones, the non-ADD share of
    the valid choices (``<prefix>non_add``) and full-bank refusals (``<prefix>full``)."""
    act = played.active
    valid = act & ~played.invalid
    n = max(int(act.sum()), 1)
    out = {f"{prefix}{name.lower()}": float(((played.op == int(B.OpCode[name])) & valid).sum()
                                            / n) for name in OP_NAMES}
    out[f"{prefix}invalid"] = float((played.invalid & act).sum() / n)
    out[f"{prefix}non_add"] = float(((played.op != int(B.OpCode.ADD)) & valid).sum()
                                    / max(int(valid.sum()), 1))
    out[f"{prefix}full"] = float((played.full & act).sum() / n)
    if prefix == "op_":
        out["invalid_frac"] = out.pop("op_invalid")
    return out


# ----------------------------------------------------------------------------- entry point

def episode_data(config, split: str, policy, embedder, *, whole: bool) -> EpisodeData:
    """:func:`build_episode_data` for a LoCoMo split under ``config``."""
    sel = select_locomo(ml_collections.ConfigDict(
        {"data_path": config.get("data_path", ""), "split": split}))
    ep = config.episode
    if whole and config.eval.get("max_conversations", 0):
        sel = sel[: config.eval.max_conversations]
    return build_episode_data(
        sel, PipelineConfig.from_mapping(config.memory), embedder, policy,
        window_sessions=ep.window_sessions, snapshot_manager=ep.snapshot_manager,
        max_questions=config.eval.num_questions if whole else ep.max_questions,
        seed=config.seed, whole=whole, min_start=ep.get("min_start", 0))


def train_episodes(config, workdir, *, policy=None, embedder=None, answer_fn=None,
                   log=print) -> dict:
    """Builds the episode task from ``config`` and runs (or resumes) training."""
    from mr1.rl.trainer import build_then_train

    workdir, policy, embedder, answer_params = manager_run(
        config, workdir, policy=policy, embedder=embedder, answer_fn=answer_fn, log=log)
    c = config

    def build():
        train = episode_data(c, "train", policy, embedder, whole=False)
        val = episode_data(c, "validation", policy, embedder, whole=True)
        log(f"episodes: {len(train)} train windows of {c.episode.window_sessions} session(s) "
            f"(at most {train.max_facts} facts, {c.episode.max_questions or 'all'} questions "
            f"each), {len(val)} validation conversation(s); {c.memory.num_slots} slots per "
            f"speaker, {c.memory.full_policy} when full")
        mb = c.rollout.microbatch_prompts or 1
        return EpisodeTask(
            train, val, policy, embedder, PipelineConfig.from_mapping(c.memory),
            dict(c.reward.answer), c.reward.invalid_penalty, c.manager.max_new_tokens,
            c.answer.top_k, group_size=c.rollout.group_size,
            episodes_per_step=c.rollout.prompts_per_step,
            rows_multiple=mb * int(c.optim.get("minibatches", 1)),
            max_facts=int(c.episode.get("max_facts", 0)),
            turn_weight=float(c.reward.get("turn", 0.0)),
            sample_batch=c.episode.sample_batch,
            answer_max_new_tokens=c.answer.max_new_tokens, answer_batch_size=c.answer.batch_size,
            answer_params=answer_params, answer_fn=answer_fn,
            answer_distill=c.answer.get("distill", True))

    return build_then_train(config, workdir, build, policy=policy, log=log)


#: ``config.manager.task``: what the Memory Manager trains on.
MANAGER_TASKS = Registry("manager task")
MANAGER_TASKS.register("facts", train_memory)        # one op per fact, unbounded prefix banks
MANAGER_TASKS.register("episodes", train_episodes)   # windows of sessions under the budget


def train_manager(config, workdir, **kw) -> dict:
    """Trains the Memory Manager on the task ``config.manager.task`` names (default
    ``"facts"``) of :data:`MANAGER_TASKS`."""
    return MANAGER_TASKS.get(config.manager.get("task", "facts"))(config, workdir, **kw)
