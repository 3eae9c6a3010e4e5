"""mr1.memory.episodes: G op sequences from one bank snapshot, vmapped; window questions; the
episode reward (a DELETE of a needed memory scores lower than NOOP)."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest

from mr1.eval.metrics import f1
from mr1.memory import bank as B
from mr1.memory.env import MemoryManagerEnv, make_episode
from mr1.memory.episodes import (episode_rewards, event_counts, rollout, rollout_group,
                                 window_questions)
from tests.rl_driver import HashEmbedder

S, L, D, F, G = 3, 4, 4, 6, 5
OpCode = B.OpCode


def _snapshot(policy):
    bank = B.empty_bank(S, L, D, full_policy=policy)
    for toks, emb in (([1, 2], (1, 0, 0, 0)), ([3], (0, 1, 0, 0))):
        bank, _ = B.apply_action(bank, B.make_action(OpCode.ADD, -1, toks, emb, 0, max_len=L,
                                                     dim=D))
    return bank


def _random_actions(seed):
    """``[G, F]`` actions: random op codes (mostly ADD, incl. an unknown one), targets in and
    out of range, texts of 1-6 tokens (some truncated), random embeddings."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(G):
        acts = []
        for _ in range(F):
            n = int(rng.integers(1, 7))
            op = int(rng.choice(5, p=[0.1, 0.5, 0.15, 0.15, 0.1]))   # mostly ADDs
            acts.append(B.make_action(op, int(rng.integers(-1, S + 1)),
                                      rng.integers(1, 50, n), rng.normal(size=D), 0,
                                      max_len=L, dim=D))
        rows.append(B.stack_actions(acts))
    return B.stack_actions(rows)


@pytest.mark.parametrize("policy", ["refuse", "evict_lru", "evict_fifo"])
def test_vmapped_group_equals_a_python_loop_over_samples(policy):
    env = MemoryManagerEnv()
    ep = make_episode([[7, 8]] * (F - 1), np.eye(D)[[0, 1, 2, 3, 0]], [0, 1, 0, 1, 0],
                      max_facts=F, max_len=L)   # 5 real facts, 1 padding step
    params = env.make_params(ep, _snapshot(policy), top_k=2)
    actions = _random_actions(0)
    final, infos = jax.jit(lambda p, a: rollout_group(env, p, a))(params, actions)
    counts = jax.device_get(event_counts(infos))
    step = jax.jit(env.step)
    seen_events = set()
    for g in range(G):
        _, state = env.reset(jax.random.key(0), params)
        want = {"applied": 0, "evicted": 0, "truncated": 0, "refused": 0}
        for t in range(F):
            act = jax.tree.map(lambda x: x[g, t], actions)
            _, state, _, _, info = step(jax.random.key(0), state, act, params)
            for name in ("applied", "op_valid", "reason", "slot", "evicted", "truncated",
                         "active", "fact_index"):
                np.testing.assert_array_equal(infos[name][g, t], info[name],
                                              err_msg=f"{policy} g={g} t={t} {name}")
            if bool(info["active"]):
                want["applied"] += int(bool(info["applied"]))
                want["evicted"] += int(int(info["evicted"]) >= 0)
                want["truncated"] += int(bool(info["truncated"]))
                want["refused"] += int(not bool(info["op_valid"]))
        for f in ("tokens", "lengths", "valid", "embeddings", "speaker", "created", "updated",
                  "step"):
            np.testing.assert_array_equal(getattr(final.bank, f)[g], getattr(state.bank, f),
                                          err_msg=f"{policy} g={g} {f}")
        assert int(final.t[g]) == int(state.t) == F - 1
        applied = sum(int(counts[k][g]) for k in ("add", "update", "delete"))
        assert applied == want["applied"]
        for k in ("evicted", "truncated", "refused"):
            assert int(counts[k][g]) == want[k], (policy, g, k)
            if want[k]:
                seen_events.add(k)
    # the random sequences exercise the budget: truncations and refusals always, evictions
    # under the evicting policies
    assert {"truncated", "refused"} <= seen_events
    assert ("evicted" in seen_events) == (policy != "refuse")


def test_single_rollout_equals_the_group_row():
    env = MemoryManagerEnv()
    ep = make_episode([[7]] * F, np.eye(D)[[0] * F], [0] * F, max_facts=F, max_len=L)
    params = env.make_params(ep, _snapshot("evict_lru"))
    actions = _random_actions(1)
    final, infos = rollout_group(env, params, actions)
    one, one_info = rollout(env, params, jax.tree.map(lambda x: x[2], actions))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(jax.tree.map(lambda x: x[2], final))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(one_info["slot"], infos["slot"][2])


def test_window_questions_keep_evidence_at_or_before_the_window_end():
    qas = [types.SimpleNamespace(evidence=e) for e in
           (("D1:3",), ("D2:1", "D4:2"), ("D3:9",), (), ("x",), ("D2:2", "D1:1"))]
    assert window_questions(qas, 2) == [0, 5]
    assert window_questions(qas, 3) == [0, 2, 5]
    assert window_questions(qas, 4) == [0, 1, 2, 5]


def _text_tokens(text):
    return list(text.encode("utf-8"))


def test_deleting_a_needed_memory_scores_lower_than_noop():
    """Snapshot: Bob lives in Rome (needed by a question whose evidence is before the
    window's end), Ann has a cat. Window: one fact. Three sampled ops from the same snapshot:
    NOOP, DELETE the Rome memory, ADD the fact. The Answer Agent stand-in answers with the
    last word of its top memory; the reward is F1 with the gold answer."""
    emb = HashEmbedder()
    max_len, dim = 32, emb.dim
    bank = B.empty_bank(4, max_len, dim, full_policy="refuse")
    memories = ["Bob lives in Rome", "Ann has a cat"]
    for text, e in zip(memories, emb.encode(memories)):
        bank, _ = B.apply_action(bank, B.make_action(OpCode.ADD, -1, _text_tokens(text), e, 0,
                                                     max_len=max_len, dim=dim))
    fact = "Ann likes green tea"
    ep = make_episode([_text_tokens(fact)], emb.encode([fact]), [0], max_facts=1,
                      max_len=max_len)
    env = MemoryManagerEnv()
    params = env.make_params(ep, bank, top_k=2)
    ops = [(OpCode.NOOP, -1, ""), (OpCode.DELETE, 0, ""), (OpCode.ADD, -1, fact)]
    actions = B.stack_actions([B.stack_actions([B.make_action(
        op, tgt, _text_tokens(text), emb.encode([text or "x"])[0], 0, max_len=max_len,
        dim=dim)]) for op, tgt, text in ops])
    final, infos = rollout_group(env, params, actions)
    assert np.asarray(infos["applied"])[:, 0].tolist() == [False, True, True]

    qas = [types.SimpleNamespace(question="Where does Bob live?", answer="Rome",
                                 evidence=("D1:2",)),
           types.SimpleNamespace(question="What does Ann drink?", answer="tea",
                                 evidence=("D5:1",))]   # after the window: not asked
    asked = window_questions(qas, end_session=2)
    assert asked == [0]
    questions = [qas[i].question for i in asked]

    def answer_fn(question, mems):
        return mems[0].split()[-1] if mems else ""

    rewards = episode_rewards(final.bank, emb.encode(questions), questions,
                              [qas[i].answer for i in asked],
                              lambda toks: bytes(toks.tolist()).decode("utf-8"), answer_fn, f1,
                              k=1)
    noop, delete, add = rewards.tolist()
    assert noop == pytest.approx(1.0) and add == pytest.approx(1.0)
    assert delete < noop and delete == pytest.approx(0.0)
    # no questions in the window: zero reward, whatever the banks
    np.testing.assert_array_equal(
        episode_rewards(final.bank, np.zeros((0, dim)), [], [], str, answer_fn, f1, k=1),
        np.zeros(3))


@pytest.mark.parametrize("policy", ["refuse", "evict_lru"])
def test_a_window_replayed_from_the_snapshot_equals_the_pipeline_build(policy, locomo_available):
    """conv-26 at 24 slots: the pipeline's bank after session 3 is the snapshot; ADDing the
    window's facts (sessions 4-6) through env.step gives the pipeline's bank after session 6,
    evictions / refusals included."""
    from mr1.agents.pipeline import MemoryBuilder, PipelineConfig
    from mr1.data.locomo import load_locomo, split_locomo
    from mr1.memory.episodes import fact_actions, window_episode

    conv = split_locomo(load_locomo()).train[0]
    emb = HashEmbedder()

    def build(n):
        cfg = PipelineConfig(num_slots=24, max_len=48, full_policy=policy, max_sessions=n)
        return MemoryBuilder(cfg, emb).build(conv)

    snap, full = build(3), build(6)
    ep = window_episode(conv, conv.speaker_a, 4, 6, lambda t: list(t.encode("utf-8")),
                        emb.encode, max_len=48, max_facts=64, dim=emb.dim)
    n = int(ep.num_facts)
    assert n > 0 and snap.stats.facts < full.stats.facts
    env = MemoryManagerEnv()
    params = env.make_params(ep, snap.speakers[0].bank)
    final, info = jax.jit(lambda p, a: rollout(env, p, a))(params, fact_actions(ep))
    want = full.speakers[0].bank
    for f in ("tokens", "lengths", "valid", "speaker", "created", "updated", "step"):
        np.testing.assert_array_equal(getattr(final.bank, f), getattr(want, f), err_msg=f)
    np.testing.assert_allclose(final.bank.embeddings, want.embeddings, atol=1e-6)
    counts = jax.device_get(event_counts(info))
    # n ADDs into a bank with `free` slots: n - free of them hit the full bank
    free = 24 - int(np.asarray(snap.speakers[0].bank.valid).sum())
    assert n > free, "the window must overflow the budget"
    key = "evicted" if policy == "evict_lru" else "bank_full"
    assert int(counts[key]) == n - free and int(counts["add"]) == (
        n if policy == "evict_lru" else free)
