"""mr1.memory.env: gymnax-style reset/step over a conversation's facts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mr1.memory import bank as mb
from mr1.memory.env import MemoryManagerEnv, make_episode

S, L, D, F, K = 6, 4, 4, 5, 3
OpCode = mb.OpCode


def episode(n=4):
    facts = [[10 + i, 20 + i] for i in range(n)]
    emb = np.eye(D, dtype=np.float32)[[i % D for i in range(n)]]
    return make_episode(facts, emb, speaker=[i % 2 for i in range(n)], turn=[3 * i for i in range(n)],
                        max_facts=F, max_len=L)


def action(op, target=-1, tokens=(1,), emb=(1, 0, 0, 0), speaker=7):
    return mb.make_action(op, target, tokens, emb, speaker, max_len=L, dim=D)


def test_make_episode_pads():
    ep = episode(3)
    assert ep.tokens.shape == (F, L) and int(ep.num_facts) == 3
    assert ep.tokens[1].tolist() == [11, 21, 0, 0] and ep.lengths.tolist() == [2, 2, 2, 0, 0]
    assert ep.turn.tolist() == [0, 3, 6, -1, -1]


def test_reset_observes_first_fact_and_related_memories():
    env = MemoryManagerEnv()
    bank = mb.empty_bank(S, L, D)
    bank, _ = mb.apply_action(bank, action(OpCode.ADD, tokens=[5, 6, 7], emb=(1, 1, 0, 0)))
    bank, _ = mb.apply_action(bank, action(OpCode.ADD, tokens=[8], emb=(0, 0, 1, 0)))
    params = env.make_params(episode(), bank, top_k=K)
    obs, state = env.reset(jax.random.key(0), params)
    assert int(obs.t) == 0 and obs.fact_tokens.tolist() == [10, 20, 0, 0]
    assert obs.memory_ids.tolist() == [0, 1, -1] and obs.memory_mask.tolist() == [True, True, False]
    assert obs.memory_tokens[0].tolist() == [5, 6, 7, 0] and obs.memory_lengths.tolist() == [3, 1, 0]
    np.testing.assert_allclose(obs.memory_scores, [2 ** -0.5, 0, 0], atol=1e-6)
    assert not bool(env.is_terminal(state, params))


def test_episode_walk_info_and_absorbing_end():
    env = MemoryManagerEnv()
    params = env.make_params(episode(3), mb.empty_bank(S, L, D), top_k=K)
    step = jax.jit(env.step)
    obs, state = env.reset(jax.random.key(0), params)
    key = jax.random.key(1)
    # fact 0: ADD; fact 1: UPDATE slot 0; fact 2: DELETE a free slot (refused) -> done
    obs, state, r, done, info = step(key, state, action(OpCode.ADD, tokens=[1, 2]), params)
    assert bool(info["op_valid"]) and int(info["slot"]) == 0 and int(info["turn"]) == 0
    assert int(state.bank.speaker[0]) == 0  # the fact's speaker, not the action's 7
    assert int(obs.t) == 1 and obs.memory_ids.tolist()[0] == 0 and float(r) == 0.0
    obs, state, r, done, info = step(key, state, action(OpCode.UPDATE, 0, tokens=[3]), params)
    assert bool(info["applied"]) and state.bank.tokens[0].tolist() == [3, 0, 0, 0]
    assert not bool(done)
    obs, state, r, done, info = step(key, state, action(OpCode.DELETE, 4), params)
    assert not bool(info["op_valid"]) and int(info["reason"]) == mb.Refusal.BAD_TARGET
    assert bool(done) and int(state.t) == 3 and int(info["fact_index"]) == 2
    # After the end, the state is frozen and actions are reported as not applied.
    frozen = state
    obs, state, r, done, info = step(key, state, action(OpCode.ADD, tokens=[9]), params)
    assert bool(done) and not bool(info["active"]) and not bool(info["applied"])
    assert not bool(info["op_valid"]) and int(info["fact_index"]) == -1
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


def test_reward_hook_and_vmap_over_episodes():
    def reward_fn(state, action, result, next_state, params):
        return jnp.where(result.applied, 1.0, -1.0) * (next_state.bank.valid.sum() + 0.0)

    env = MemoryManagerEnv(reward_fn=reward_fn)
    eps = [episode(n) for n in (1, 2, 4)]
    params = jax.tree.map(lambda *x: jnp.stack(x), *[
        env.make_params(e, mb.empty_bank(S, L, D, full_policy="evict_lru"), top_k=K)
        for e in eps])
    acts = jax.tree.map(lambda *x: jnp.stack(x), *[action(OpCode.ADD, tokens=[i + 1])
                                                   for i in range(F)])

    def rollout(p):
        _, state = env.reset(jax.random.key(0), p)

        def body(s, a):
            _, s, r, d, info = env.step(jax.random.key(0), s, a, p)
            return s, (r, d, info["applied"])
        return jax.lax.scan(body, state, acts)

    final, (rewards, dones, applied) = jax.jit(jax.vmap(rollout))(params)
    assert applied.sum(1).tolist() == [1, 2, 4]
    np.testing.assert_allclose(rewards[2], [1, 2, 3, 4, -4])
    np.testing.assert_allclose(rewards[0], [1, -1, -1, -1, -1])
    assert dones.tolist()[1] == [False, True, True, True, True]
    assert final.bank.valid.sum(1).tolist() == [1, 2, 4] and final.t.tolist() == [1, 2, 4]


def test_same_speaker_retrieval_and_shape_checks():
    env = MemoryManagerEnv()
    bank = mb.empty_bank(S, L, D)
    bank, _ = mb.apply_action(bank, action(OpCode.ADD, emb=(1, 0, 0, 0), speaker=1))
    bank, _ = mb.apply_action(bank, action(OpCode.ADD, emb=(1, 0, 0, 0), speaker=0))
    obs, _ = env.reset(None, env.make_params(episode(), bank, top_k=K, same_speaker=True))
    assert obs.memory_ids.tolist() == [1, -1, -1]  # fact 0 is speaker 0's
    with pytest.raises(ValueError, match="max_len"):
        env.make_params(episode(), mb.empty_bank(S, L + 1, D))
