"""The Memory Manager environment, gymnax style: pure ``reset`` / ``step`` over struct pytrees.

An episode walks the extracted facts of one conversation in order. At fact ``t`` the agent
observes the fact (tokens, embedding, speaker) and the ``top_k`` related memories retrieved
from the bank by cosine similarity (slot ids, tokens, scores, mask); its action is a
:class:`~mr1.memory.bank.MemoryAction` (op, target id, new memory tokens + embedding). ``step``
applies it to the bank, reports what happened in ``info`` and moves to fact ``t + 1``.

Rewards in Memory-R1 arrive later: a frozen Answer Agent answers the QA pairs linked to the
turn once the op is applied. ``MemoryManagerEnv(reward_fn=...)`` takes a pure, jittable hook
``reward_fn(state, action, result, next_state, params) -> float32 []``; the default gives 0 and
the training loop assigns the delayed reward from ``info`` and the final bank.

**The one transition.** :func:`transition` is the only function through which a manager op
changes a bank: :meth:`MemoryManagerEnv.step` applies it, the memory construction pipeline
(:func:`mr1.memory.store.apply_ops`) applies it op by op, and the Memory Manager's RL reward
(:mod:`mr1.rl.memory_task`) and the replayed episodes of :mod:`mr1.memory.episodes` run
``env.step`` on it. A full bank's refusal (``Refusal.BANK_FULL``), eviction (``evicted``) and
truncation of an over-long text (``truncated``) come back in its :class:`OpResult` and in
``step``'s ``info``, for the caller to count.

Unlike gymnax, the end of an episode is absorbing instead of auto-resetting: once
``t == num_facts`` the state stops changing (actions are ignored, reported as not applied) so
the final bank stays available to score the episode. Everything is fixed-shape: episodes,
states and params ``vmap`` over a leading batch axis, and ``step`` has no Python branches on
traced values.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mr1.memory.bank import (MemoryAction, MemoryBank, OpCode, OpResult, apply_action, retrieve)

Array = jax.Array
DEFAULT_TOP_K = 10  # Mem0 (which the paper follows) shows the manager 10 related memories


@flax.struct.dataclass
class Episode:
    """The extracted facts of one conversation, padded to ``F`` facts.

    tokens     [F, L] int32    fact text token ids (``L`` = the bank's ``max_len``)
    lengths    [F]    int32
    embeddings [F, D] float32  fact embeddings (the retrieval queries)
    speaker    [F]    int32    who the fact is about / whose bank it goes to
    turn       [F]    int32    dialogue turn the fact came from (links facts to QA rewards)
    num_facts  []     int32    real facts; the rest is padding
    """

    tokens: Array
    lengths: Array
    embeddings: Array
    speaker: Array
    turn: Array
    num_facts: Array


def make_episode(fact_tokens: Sequence[Sequence[int]], embeddings, speaker: Sequence[int],
                 turn: Sequence[int] | None = None, *, max_facts: int, max_len: int,
                 pad_id: int = 0) -> Episode:
    """Packs host-side facts (token lists, ``[n, D]`` embeddings) into a padded Episode.

    Facts beyond ``max_facts`` are dropped and tokens beyond ``max_len`` truncated.
    """
    emb = np.asarray(embeddings, np.float32)
    emb = emb.reshape(len(fact_tokens), emb.shape[-1])   # [n, D], n may be 0
    n = min(len(fact_tokens), max_facts)
    tokens = np.full((max_facts, max_len), pad_id, np.int32)
    lengths = np.zeros((max_facts,), np.int32)
    for i, toks in enumerate(fact_tokens[:n]):
        toks = np.asarray(list(toks), np.int32)[:max_len]
        tokens[i, : toks.size] = toks
        lengths[i] = toks.size
    out_emb = np.zeros((max_facts, emb.shape[1]), np.float32)
    out_emb[:n] = emb[:n]
    spk = np.zeros((max_facts,), np.int32)
    spk[:n] = np.asarray(speaker, np.int32)[:n]
    trn = np.full((max_facts,), -1, np.int32)
    trn[:n] = np.arange(n) if turn is None else np.asarray(turn, np.int32)[:n]
    return Episode(tokens=jnp.asarray(tokens), lengths=jnp.asarray(lengths),
                   embeddings=jnp.asarray(out_emb), speaker=jnp.asarray(spk),
                   turn=jnp.asarray(trn), num_facts=jnp.asarray(n, jnp.int32))


@flax.struct.dataclass
class EnvParams:
    """What an episode is played on: its facts and the bank it starts from.

    ``top_k`` (memories shown per fact) and ``same_speaker`` (retrieve only memories of the
    fact's speaker) are static.
    """

    episode: Episode
    init_bank: MemoryBank
    top_k: int = flax.struct.field(pytree_node=False, default=DEFAULT_TOP_K)
    same_speaker: bool = flax.struct.field(pytree_node=False, default=False)


@flax.struct.dataclass
class EnvState:
    """bank: the current bank; t [] int32: index of the fact being decided."""

    bank: MemoryBank
    t: Array


@flax.struct.dataclass
class Observation:
    """The current fact and its related memories (``k = top_k``).

    fact_tokens     [L] int32    fact_length [] int32   fact_embedding [D] float32
    fact_speaker    []  int32    t           [] int32
    memory_ids      [k] int32    slot ids, best first, -1 where masked
    memory_tokens   [k, L] int32 (pad where masked)     memory_lengths [k] int32
    memory_scores   [k] float32  cosine with the fact   memory_mask    [k] bool
    """

    fact_tokens: Array
    fact_length: Array
    fact_embedding: Array
    fact_speaker: Array
    t: Array
    memory_ids: Array
    memory_tokens: Array
    memory_lengths: Array
    memory_scores: Array
    memory_mask: Array


def transition(bank: MemoryBank, action: MemoryAction) -> tuple[MemoryBank, OpResult]:
    """One manager op on one bank (pure, jittable; vmap it for batches of banks).

    The bank's static ``full_policy`` decides an ADD into a full bank (refuse or evict); the
    result says what happened (applied, refusal reason, slot, evicted slot, truncation).
    """
    return apply_action(bank, action)


RewardFn = Callable[[EnvState, MemoryAction, OpResult, EnvState, EnvParams], Array]


def zero_reward(state, action, result, next_state, params) -> Array:
    """The default hook: rewards are assigned later from the Answer Agent."""
    del state, action, result, next_state, params
    return jnp.zeros((), jnp.float32)


class MemoryManagerEnv:
    """Pure, jittable environment; instances hold only static configuration (the reward hook)."""

    num_actions = len(OpCode)

    def __init__(self, reward_fn: RewardFn | None = None):
        self.reward_fn = reward_fn or zero_reward

    @staticmethod
    def make_params(episode: Episode, init_bank: MemoryBank, top_k: int = DEFAULT_TOP_K,
                    same_speaker: bool = False) -> EnvParams:
        if episode.tokens.shape[-1] != init_bank.max_len:
            raise ValueError(f"fact length {episode.tokens.shape[-1]} != bank max_len "
                             f"{init_bank.max_len}")
        if episode.embeddings.shape[-1] != init_bank.dim:
            raise ValueError(f"fact dim {episode.embeddings.shape[-1]} != bank dim "
                             f"{init_bank.dim}")
        return EnvParams(episode=episode, init_bank=init_bank, top_k=top_k,
                         same_speaker=same_speaker)

    def reset(self, key: Array, params: EnvParams) -> tuple[Observation, EnvState]:
        """Starts at fact 0 with ``params.init_bank``. ``key`` is unused (deterministic)."""
        del key
        state = EnvState(bank=params.init_bank, t=jnp.zeros((), jnp.int32))
        return self.get_obs(state, params), state

    def step(self, key: Array, state: EnvState, action: MemoryAction, params: EnvParams
             ) -> tuple[Observation, EnvState, Array, Array, dict[str, Any]]:
        """Applies ``action`` for the current fact; returns ``(obs, state, reward, done, info)``.

        An ADD records the fact's speaker (``action.speaker`` is overridden). ``info``:
        ``op`` (as given), ``active`` (a fact was pending), ``op_valid`` (applied or a NOOP;
        False if refused or after the end),
        ``applied``, ``reason`` (:class:`~mr1.memory.bank.Refusal`), ``slot`` (slot written or
        cleared, -1), ``evicted`` (-1 if none), ``truncated`` (text cut to ``max_len``),
        ``fact_index`` and ``turn`` of the fact decided.
        """
        del key
        ep = params.episode
        active = state.t < ep.num_facts
        fact = jnp.clip(state.t, 0, ep.tokens.shape[0] - 1)
        act = action.replace(op=jnp.where(active, action.op, OpCode.NOOP).astype(jnp.int32),
                             speaker=ep.speaker[fact])
        bank, result = transition(state.bank, act)
        bank = bank.replace(step=jnp.where(active, bank.step, state.bank.step))
        result = result.replace(refused=result.refused | ~active)
        next_state = EnvState(bank=bank, t=jnp.where(active, state.t + 1, state.t))
        reward = jnp.asarray(self.reward_fn(state, act, result, next_state, params), jnp.float32)
        done = self.is_terminal(next_state, params)
        info = {"op": action.op, "active": active, "op_valid": ~result.refused,
                "applied": result.applied,
                "reason": result.reason, "slot": result.slot, "evicted": result.evicted,
                "truncated": result.truncated & active,
                "fact_index": jnp.where(active, state.t, -1), "turn": ep.turn[fact]}
        return self.get_obs(next_state, params), next_state, reward, done, info

    def get_obs(self, state: EnvState, params: EnvParams) -> Observation:
        ep = params.episode
        f = jnp.clip(state.t, 0, ep.tokens.shape[0] - 1)
        speaker = ep.speaker[f] if params.same_speaker else None
        r = retrieve(state.bank, ep.embeddings[f], params.top_k, speaker=speaker)
        slots = jnp.maximum(r.indices, 0)
        mem_tokens = jnp.where(r.mask[:, None], state.bank.tokens[slots], state.bank.pad_id)
        return Observation(
            fact_tokens=ep.tokens[f], fact_length=ep.lengths[f],
            fact_embedding=ep.embeddings[f], fact_speaker=ep.speaker[f], t=state.t,
            memory_ids=r.indices, memory_tokens=mem_tokens,
            memory_lengths=jnp.where(r.mask, state.bank.lengths[slots], 0),
            memory_scores=r.scores, memory_mask=r.mask)

    def is_terminal(self, state: EnvState, params: EnvParams) -> Array:
        return state.t >= params.episode.num_facts


def one_fact_params(bank: MemoryBank, speaker: int | Array, embedding: Array | None = None,
                    top_k: int = 1) -> EnvParams:
    """Params of a one-fact episode that starts from ``bank``: a single manager decision
    (e.g. a training sample's op on its prefix bank). The fact's text is not needed to apply
    an op (its tokens are zeros); ``embedding`` (default zeros) only feeds the observation.
    Jittable and vmappable (``speaker`` may be traced)."""
    emb = (jnp.zeros((1, bank.dim), jnp.float32) if embedding is None
           else jnp.reshape(jnp.asarray(embedding, jnp.float32), (1, bank.dim)))
    episode = Episode(tokens=jnp.full((1, bank.max_len), bank.pad_id, jnp.int32),
                      lengths=jnp.zeros((1,), jnp.int32), embeddings=emb,
                      speaker=jnp.reshape(jnp.asarray(speaker, jnp.int32), (1,)),
                      turn=jnp.full((1,), -1, jnp.int32), num_facts=jnp.ones((), jnp.int32))
    return EnvParams(episode=episode, init_bank=bank, top_k=top_k)


def result_of(info: dict[str, Any]) -> OpResult:
    """The :class:`OpResult` of one ``step``'s ``info``."""
    return OpResult(applied=info["applied"], refused=~info["op_valid"], reason=info["reason"],
                    slot=info["slot"], evicted=info["evicted"], truncated=info["truncated"])


def step_once(bank: MemoryBank, action: MemoryAction, speaker: int | Array,
              env: MemoryManagerEnv | None = None) -> tuple[MemoryBank, OpResult]:
    """``env.reset`` on ``bank`` and one ``env.step`` with ``action`` for a fact of
    ``speaker``: the bank after the op and its :class:`OpResult` (pure, vmappable)."""
    env = env or MemoryManagerEnv()
    params = one_fact_params(bank, speaker)
    _, state = env.reset(None, params)
    _, state, _, _, info = env.step(None, state, action, params)
    return state.bank, result_of(info)

