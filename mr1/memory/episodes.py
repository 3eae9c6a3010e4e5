"""Manager episodes: a window of facts replayed from a shared bank snapshot, G op sequences
at once, scored by the questions the window makes answerable.

An episode (Memory-R2's LoCoMo-style rollouts, issue 20) starts from a bank snapshot (the bank
after the sessions before the window) and walks the window's facts, one
:meth:`~mr1.memory.env.MemoryManagerEnv.step` per fact. ``G`` sampled op sequences start from
the same snapshot and are vmapped over ``G`` copies of it (:func:`rollout_group`); each copy
only ever sees its own ops. Pure functions of fixed-shape pytrees, so they jit, vmap and fit
inside a train step:

* :func:`rollout` -- ``actions [F]`` through ``env.step`` (``lax.scan``): final state and the
  per-step ``info`` (``[F]`` leaves);
* :func:`rollout_group` -- ``actions [G, F]`` from one snapshot: ``[G]`` final states and
  ``[G, F]`` infos (equal to a Python loop over the samples, tested);
* :func:`event_counts` -- per sample: applied ops by code, refusals, full-bank refusals,
  evictions, truncations (what the budget did);
* :func:`apply_in_order` / :func:`apply_group` -- a session's ops applied in fact order to a
  conversation's speaker banks (leaves ``[S, ...]``; ``action.speaker`` picks the bank)
  through :func:`~mr1.memory.env.transition`, and the same vmapped over ``G`` copies: how the
  Memory Manager's episode task (:mod:`mr1.rl.episode_task`) plays its ``G`` op sequences;
* :func:`window_episode` -- a speaker's facts of sessions ``start..end`` of a conversation as
  an :class:`~mr1.memory.env.Episode` (the snapshot is the pipeline's bank after session
  ``start - 1``: ``MemoryBuilder`` with ``max_sessions=start - 1``); :func:`fact_actions`
  turns an episode's facts into actions of one op (ADD: the ``add_all`` sequence);
* :func:`window_questions` -- the questions whose evidence lies at or before the window's last
  session (so deleting or overwriting a memory a later question needs costs reward);
* :func:`episode_rewards` -- each sample's final bank answers those questions (top-``k``
  retrieval, then a host ``answer_fn`` -- the frozen Answer Agent -- and ``score_fn``, e.g. EM
  + F1 as in :func:`mr1.rl.rewards.combined_reward`); the reward is the mean score.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mr1.memory import bank as B
from mr1.memory.env import (EnvParams, EnvState, Episode, MemoryManagerEnv, make_episode,
                            transition)

Array = jax.Array
_TURN = re.compile(r"D(\d+):(\d+)")


def rollout(env: MemoryManagerEnv, params: EnvParams, actions: B.MemoryAction,
            key: Array | None = None) -> tuple[EnvState, dict[str, Array]]:
    """Plays ``actions [F]`` (one per fact, in order) from ``params.init_bank``.

    Returns the final :class:`~mr1.memory.env.EnvState` and the stacked ``info`` of every
    step (leaves ``[F]``). Steps after the episode's last fact leave the state unchanged.
    """
    key = jax.random.key(0) if key is None else key
    _, state = env.reset(key, params)

    def body(state, act):
        _, state, reward, _, info = env.step(key, state, act, params)
        return state, {**info, "reward": reward}
    return jax.lax.scan(body, state, actions)


def rollout_group(env: MemoryManagerEnv, params: EnvParams, actions: B.MemoryAction,
                  key: Array | None = None) -> tuple[EnvState, dict[str, Array]]:
    """``G`` op sequences ``actions [G, F]`` from the same snapshot ``params.init_bank``,
    vmapped over ``G`` copies: final states ``[G]`` and infos ``[G, F]``."""
    return jax.vmap(functools.partial(rollout, env, params, key=key))(actions)


def apply_in_order(banks: B.MemoryBank, actions: B.MemoryAction, active: Array
                   ) -> tuple[B.MemoryBank, B.OpResult]:
    """Ops ``actions [F]`` applied in order to the speaker banks ``banks`` (leaves
    ``[S, ...]``, one bank per speaker; ``actions.speaker`` picks each op's bank) through
    :func:`~mr1.memory.env.transition` (a ``lax.scan``). Steps with ``active`` False
    (padding) change nothing and report a refused NOOP. Returns the banks and the results
    ``[F]``: what :func:`mr1.memory.store.apply_ops` does op by op on one speaker's bank."""
    def body(bs, xs):
        act, on = xs
        spk = jnp.clip(act.speaker, 0, bs.tokens.shape[0] - 1)
        bank = jax.tree.map(lambda x: x[spk], bs)
        new, res = transition(bank, act)
        bs = jax.tree.map(lambda x, y: x.at[spk].set(jnp.where(on, y, x[spk])), bs, new)
        res = jax.tree.map(lambda r: jnp.where(on, r, jnp.zeros_like(r)), res)
        res = res.replace(refused=res.refused | ~on, slot=jnp.where(on, res.slot, -1),
                          evicted=jnp.where(on, res.evicted, -1))
        return bs, res
    return jax.lax.scan(body, banks, (actions, active))


#: ``apply_in_order`` over ``G`` copies: banks ``[G, S, ...]``, actions / active ``[G, F]``.
apply_group = jax.jit(jax.vmap(apply_in_order))


def event_counts(info: dict[str, Array]) -> dict[str, Array]:
    """Per episode (leading axes but the last): ops applied by code (``add`` / ``update`` /
    ``delete``), ``noop`` (NOOPs of real facts), ``refused`` (refused ops of real facts),
    ``bank_full``, ``evicted``, ``truncated``."""
    active = info["active"]
    applied = info["applied"] & active
    op = info["op"]
    out = {name.lower(): jnp.sum(applied & (op == int(code)), axis=-1)
           for name, code in (("ADD", B.OpCode.ADD), ("UPDATE", B.OpCode.UPDATE),
                              ("DELETE", B.OpCode.DELETE))}
    out["noop"] = jnp.sum(active & (op == int(B.OpCode.NOOP)) & info["op_valid"], axis=-1)
    out["refused"] = jnp.sum(active & ~info["op_valid"], axis=-1)
    out["bank_full"] = jnp.sum(active & (info["reason"] == int(B.Refusal.BANK_FULL)), axis=-1)
    out["evicted"] = jnp.sum(active & (info["evicted"] >= 0), axis=-1)
    out["truncated"] = jnp.sum(active & info["truncated"], axis=-1)
    return out


def evidence_session(evidence: Sequence[str]) -> int | None:
    """The last session any ``D<s>:<t>`` id of ``evidence`` lies in (None: none parses)."""
    sessions = [int(m.group(1)) for e in evidence if (m := _TURN.fullmatch(e.strip()))]
    return max(sessions) if sessions else None


def window_questions(qas: Sequence[Any], end_session: int) -> list[int]:
    """Indices of the ``qas`` (anything with ``.evidence``) whose evidence lies at or before
    session ``end_session`` (the window's last)."""
    out = []
    for i, qa in enumerate(qas):
        s = evidence_session(qa.evidence)
        if s is not None and s <= end_session:
            out.append(i)
    return out


@functools.partial(jax.jit, static_argnums=2)
def _retrieve_group(banks: B.MemoryBank, queries: Array, k: int) -> B.Retrieved:
    return jax.vmap(lambda b: B.retrieve_many(b, queries, k))(banks)


def episode_rewards(banks: B.MemoryBank, question_embeddings, questions: Sequence[str],
                    golds: Sequence[str], memory_text: Callable[[np.ndarray], str],
                    answer_fn: Callable[[str, list[str]], str],
                    score_fn: Callable[[str, str], float], k: int) -> np.ndarray:
    """The reward of each of ``G`` final ``banks`` (leaves ``[G, ...]``): the mean over the
    questions of ``score_fn(answer, gold)``, where ``answer = answer_fn(question, memories)``
    and ``memories`` are the texts (``memory_text(tokens)``) of the top-``k`` memories by
    cosine with the question's embedding (``question_embeddings [Q, D]``). Host side (the
    Answer Agent is an LLM); the retrieval is one jitted call. No questions: zeros.
    """
    g = int(np.asarray(banks.step).shape[0])
    if not len(questions):
        return np.zeros((g,), np.float32)
    r = jax.device_get(_retrieve_group(banks, jnp.asarray(question_embeddings, jnp.float32), k))
    tokens, lengths = np.asarray(banks.tokens), np.asarray(banks.lengths)
    out = np.zeros((g,), np.float32)
    for i in range(g):
        scores = []
        for q, (question, gold) in enumerate(zip(questions, golds)):
            mems = [memory_text(tokens[i, s, : lengths[i, s]])
                    for s, ok in zip(r.indices[i, q], r.mask[i, q]) if ok]
            scores.append(float(score_fn(answer_fn(question, mems), gold)))
        out[i] = float(np.mean(scores))
    return out


def window_episode(conv, speaker: str, start: int, end: int, tokenize: Callable[[str], Any],
                   embed: Callable[[list[str]], np.ndarray], *, max_len: int, max_facts: int,
                   dim: int, pad_id: int = 0) -> Episode:
    """``speaker``'s observations of sessions ``start..end`` (1-based, inclusive) of ``conv``
    in file order, padded to ``max_facts`` (``turn`` = the fact's session)."""
    facts = [o for o in conv.observations
             if o.speaker == speaker and start <= o.session_idx <= end and o.text.strip()]
    emb = (np.asarray(embed([o.text for o in facts]), np.float32).reshape(len(facts), dim)
           if facts else np.zeros((0, dim), np.float32))
    return make_episode([list(tokenize(o.text)) for o in facts], emb,
                        [0] * len(facts), [o.session_idx for o in facts],
                        max_facts=max_facts, max_len=max_len, pad_id=pad_id)


def fact_actions(episode: Episode, op: int = int(B.OpCode.ADD)) -> B.MemoryAction:
    """Actions ``[F]`` applying ``op`` with each fact's text and embedding (ADD: store every
    fact, the ``add_all`` manager; padding steps are ignored by the env)."""
    f = episode.tokens.shape[0]
    return B.MemoryAction(op=jnp.full((f,), op, jnp.int32), target=jnp.full((f,), -1, jnp.int32),
                          tokens=episode.tokens, length=episode.lengths,
                          embedding=episode.embeddings, speaker=episode.speaker)

