"""The Memory Manager's episode task (mr1.rl.episode_task, issue 20) on the hand-built
conversation of ``tests/test_memory_task.py`` and, end to end, on LoCoMo with the tiny model.

Checks: a session's ops applied to ``G`` copies by the jitted ``episodes.apply_group`` equal
the pipeline's op-by-op ``apply_ops`` on each copy (banks and results, refusals of a full bank
included); windows, their snapshots (the pipeline's banks after the sessions before them) and
their questions (in-window first); one scripted episode where DELETEing the memory a later
question needs scores below NONE, with the update's rows laid out ``[P, F, G]`` and the
Dr. GRPO advantages of each fact's ``G`` rows equal to the episode rewards minus their mean;
two tiny training runs (GRPO, PPO) through ``make_train_step`` with the task's layout.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import runpy
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mr1.agents.pipeline import BuildStats, MemoryBuilder, PipelineConfig, apply_ops, \
    new_speaker_memory
from mr1.memory import bank as B
from mr1.memory.episodes import apply_group
from mr1.rl import episode_task as ET
from mr1.rl.advantages import ESTIMATORS, AdvantageConfig
from tests import test_memory_task as TMT
from tests.rl_driver import ROOT, HashEmbedder, apply_overrides

EMB = HashEmbedder()
BYTES = TMT.BYTES


# ----------------------------------------------------------------------------- 1. the group apply

def _action(op, target=-1, text="", spk=0, max_len=16):
    ids = BYTES(text)
    return B.make_action(op, target, ids, EMB.encode([text])[0] if text else None, spk,
                         max_len=max_len, dim=EMB.dim, length=len(ids))


def test_apply_group_equals_apply_ops_on_each_copy():
    """Three copies of two 3-slot banks (refuse when full), each with its own op sequence
    (ADDs into a full bank, UPDATE, DELETE, a bad target, NOOP) and padding: the vmapped scan
    gives each copy the banks and results of the pipeline's op-by-op ``apply_ops``."""
    cfg = PipelineConfig(num_slots=3, max_len=16, full_policy="refuse")
    base = [new_speaker_memory(n, i, cfg, EMB.dim) for i, n in enumerate(("Alice", "Bob"))]
    apply_ops(base[0], B.stack_actions([_action(B.OpCode.ADD, text="Alice likes jazz.")]),
              ["Alice likes jazz."], "d0", BuildStats())
    A, U, D, N = B.OpCode.ADD, B.OpCode.UPDATE, B.OpCode.DELETE, B.OpCode.NOOP
    seqs = [[(A, -1, "a one", 0), (A, -1, "a two", 0), (A, -1, "a three", 0), (A, -1, "b one", 1)],
            [(U, 0, "Alice likes jazz; a one", 0), (D, 0, "", 0), (A, -1, "a two", 0)],
            [(N, -1, "", 0), (D, 5, "", 1), (A, -1, "b one", 1), (U, 0, "b merged", 1)]]
    width = max(map(len, seqs)) + 1   # one padding step at least
    acts, active = [], np.zeros((len(seqs), width), bool)
    for c, seq in enumerate(seqs):
        rows = [_action(op, t, text, spk) for op, t, text, spk in seq]
        rows += [_action(N)] * (width - len(rows))
        acts.append(B.stack_actions(rows))
        active[c, : len(seq)] = True
    actions = jax.tree.map(lambda *xs: jnp.stack(xs), *acts)
    stacked = jax.tree.map(lambda *b: jnp.stack(b), *[m.bank for m in base])
    banks = jax.tree.map(lambda x: jnp.stack([x] * len(seqs)), stacked)
    new, res = jax.device_get(apply_group(banks, actions, jnp.asarray(active)))
    for c, seq in enumerate(seqs):
        mems = copy.deepcopy(base)
        want = []
        for op, t, text, spk in seq:
            want += apply_ops(mems[spk], B.stack_actions([_action(op, t, text, spk)]), [text],
                              "d1", BuildStats())
        for spk in (0, 1):
            got = jax.tree.map(lambda x: x[c, spk], new)
            TMT.assert_banks_equal(got, mems[spk].bank, f"copy {c}, speaker {spk}")
        for k, w in enumerate(want):
            for f in ("applied", "refused", "reason", "slot", "evicted", "truncated"):
                assert np.asarray(getattr(res, f))[c, k] == np.asarray(getattr(w, f)), (c, k, f)
        assert all(np.asarray(res.refused)[c, len(seq):])          # padding: nothing applied
        assert not np.asarray(res.applied)[c, len(seq):].any()
    # copy 0's fourth op (a third Alice ADD) found Alice's bank full: refused, counted as such
    assert int(res.reason[0, 2]) == int(B.Refusal.BANK_FULL)


# ----------------------------------------------------------------------------- 2. windows

CFG = PipelineConfig(num_slots=4, max_len=32, retrieve_k=2, full_policy="refuse",
                     manager_format="op_budget")


@pytest.fixture(scope="module")
def conv():
    return TMT.make_conv()


@pytest.fixture(scope="module")
def policy(embedded_gguf):
    from mr1.models import load_policy
    from mr1.models.policy import load_tokenizer_from_gguf

    return load_policy("tiny-smollm2", tokenizer=load_tokenizer_from_gguf(embedded_gguf), seed=0)


def test_windows_snapshots_and_questions(conv, policy):
    data = ET.build_episode_data([(conv, conv.qas)], CFG, EMB, policy, window_sessions=1,
                                 snapshot_manager="add_all", max_questions=0, seed=0)
    # QA 5's evidence (D9:9) lies in no session; QA 3's last evidence is in session 2
    assert [(w.sessions, w.questions) for w in data.windows] == [
        ((0,), (1, 2)), ((1,), (0, 1, 2, 3)), ((2,), (0, 1, 2, 3, 4))]
    assert [len(f) for f in data.facts[TMT.CONV_ID]] == [4, 3, 2]   # Carol / blank dropped
    for w in data.windows:
        pos = w.sessions[0]
        snap = data.snapshots[(TMT.CONV_ID, pos)]
        if pos == 0:
            assert not any(np.asarray(s.bank.valid).any() for s in snap.speakers)
            continue
        want = MemoryBuilder(dataclasses.replace(CFG, manager="add_all", max_sessions=pos), EMB,
                             policy).build(conv)
        for got, exp in zip(snap.speakers, want.speakers):
            TMT.assert_banks_equal(got.bank, exp.bank, f"snapshot {pos}")
            assert got.texts == exp.texts
    # at most 2: the in-window questions first (session 3: QA 4), then a seeded earlier one
    two = ET.pick_questions(conv, (2,), 2, seed=0)
    assert len(two) == 2 and 4 in two
    whole = ET.build_episode_data([(conv, conv.qas)], CFG, EMB, policy, window_sessions=1,
                                  snapshot_manager="add_all", max_questions=3, seed=0,
                                  whole=True)
    assert [w.sessions for w in whole.windows] == [(0, 1, 2)] and len(whole.windows[0].questions) == 3
    with pytest.raises(ValueError, match="rule manager"):
        ET.build_episode_data([(conv, conv.qas)], CFG, EMB, policy, window_sessions=1,
                              snapshot_manager="oracle", max_questions=0, seed=0)


# ----------------------------------------------------------------------------- 3. one episode

def scripted(task, words_by_copy):
    """``task._sample`` with the real sampler, the texts replaced: copy ``g``'s outputs for a
    session are ``words_by_copy[g]`` in fact order. A window's first session is sampled once
    per fact with G samples (rows fact-major, sample ``g`` = copy ``g``); later sessions once
    per copy and fact (prompts copy-major)."""
    real = task._sample
    calls = []

    def sample(params, prompts, key, cfg):
        ids, tokens, logp, lengths, _ = real(params, prompts, key, cfg)
        k = cfg.num_samples
        calls.append((len(prompts), k))
        if k > 1:
            texts = [words_by_copy[r % k][r // k] for r in range(len(prompts) * k)]
        else:
            per_copy = len(prompts) // len(words_by_copy)
            texts = [words_by_copy[i // per_copy][i % per_copy] for i in range(len(prompts))]
        assert len(tokens) == len(texts) and len(ids) == len(prompts)
        return ids, tokens, logp, lengths, texts
    sample.calls = calls
    return sample


def test_delete_of_a_needed_memory_scores_below_none(conv, policy):
    """The last session from the snapshot of the first two (Alice's cat Tom is in memory), in
    the one-line reply form: copy 0 DELETEs the Tom memory (shown to Alice's fact as id 1),
    copy 1 keeps it (NONE). Asked about the cat, the stand-in Answer Agent finds Tom only in
    copy 1: its episode reward is 1, copy 0's is 0."""
    cfg = dataclasses.replace(CFG, manager_format="line")
    data = ET.build_episode_data([(conv, conv.qas)], cfg, EMB, policy, window_sessions=1,
                                 snapshot_manager="add_all", max_questions=0, seed=0)
    window = data.windows.index(next(w for w in data.windows if w.sessions == (2,)))
    data.windows[window] = dataclasses.replace(data.windows[window], questions=(0,))
    agent = TMT.CatAgent()
    # answer_top_k 4: the stand-in agent sees all of Alice's memories (the bank holds 4)
    task = ET.EpisodeTask(data, data, policy, EMB, cfg, {"em": 1.0}, 0.5, 8, 4, group_size=2,
                          episodes_per_step=1, rows_multiple=4, answer_fn=agent)
    assert task.max_new_tokens == 8 and task.facts_per_episode == 4   # 4 facts, padded to 4
    # one-session windows: a fact's G copies share its prompt (the Answer Agent's layout)
    assert task.shared_prompts
    assert task.step_layout == ET.StepLayout(prompts=4, group_size=2, advantage_group=2)
    # session 3's facts in file order: Bob's marathon, then Alice's dog, who is shown
    # "[0] Alice likes jazz." and "[1] Alice has a cat named Tom." (hash-embedding cosine)
    snap = data.snapshots[(TMT.CONV_ID, 2)]
    prompts, shown, no_add = task._prompts_of_session(snap, data.facts[TMT.CONV_ID][2],
                                                      data.fact_embeddings[TMT.CONV_ID][2])
    assert no_add == [False, False]          # an unmasked form may always choose ADD
    assert snap.speakers[0].texts[shown[1][1]] == "Alice has a cat named Tom."
    assert "[1] Alice has a cat named Tom." in prompts[1]
    task._sample = scripted(task, [["NONE", "DELETE 1"], ["NONE", "NONE"]])
    sampler = task._sample
    from mr1.sampling import SamplingConfig
    arrays, metrics = task.rollout(policy, policy.params, np.asarray([window]),
                                   jax.random.PRNGKey(0),
                                   SamplingConfig(max_new_tokens=8, temperature=1.0))
    E, F, G = 1, 4, 2
    assert sampler.calls == [(2, 2)]     # the session's 2 facts, 2 samples each (one prefill)
    rewards = arrays["rewards"].reshape(E, F, G)
    np.testing.assert_allclose(rewards[0, :2], [[0.0, 1.0], [0.0, 1.0]])   # the two facts
    assert metrics["episode_reward"] == 0.5 and metrics["op_delete"] == 0.25
    assert metrics["op_noop"] == 0.75 and metrics["op_non_add"] == 1.0
    cm = arrays["completion_mask"].reshape(E, F, G, -1)
    assert cm[0, :2].all() and not cm[0, 2:].any()          # facts 3, 4 are padding
    assert arrays["prompt_ids"].shape[0] == E * F and arrays["tokens"].shape[0] == E * F * G
    # a two-session window: every completion has its own prompt
    two = ET.build_episode_data([(conv, conv.qas)], cfg, EMB, policy, window_sessions=2,
                                snapshot_manager="add_all", max_questions=0, seed=0)
    t2 = ET.EpisodeTask(two, two, policy, EMB, cfg, {"em": 1.0}, 0.5, 8, 4, group_size=2,
                        episodes_per_step=1, rows_multiple=4, answer_fn=agent)
    # sessions 1-2 have 7 facts; 7 x 2 rows padded to a multiple of 4: 8 facts
    assert not t2.shared_prompts and t2.facts_per_episode == 8
    assert t2.step_layout == ET.StepLayout(prompts=16, group_size=1, advantage_group=2)
    # its first session is sampled once per fact (2 samples), the second once per copy
    t2._sample = scripted(t2, [["NONE"] * 3, ["NONE"] * 3])
    w2 = next(w for w in two.windows if w.sessions == (1, 2))
    played = t2.play(two, [w2], 2, policy.params, jax.random.PRNGKey(0),
                     SamplingConfig(max_new_tokens=8, temperature=1.0))
    assert t2._sample.calls == [(3, 2), (4, 1)]          # 3 facts x 2 samples; 2 copies x 2
    assert played.active[0].sum() == 10                    # 5 facts x 2 copies
    assert (played.op[0][played.active[0]] == int(B.OpCode.NOOP)).all()
    # NONE everywhere: both copies still hold the snapshot, so their later prompts coincide
    assert played.prompt_ids[0][3][0] == played.prompt_ids[0][3][1] is not None
    # Dr. GRPO advantages over each fact's G rows: the episode rewards minus their mean
    est = ESTIMATORS.get("drgrpo")
    adv, _ = est.fn(jnp.asarray(arrays["rewards"]), jnp.asarray(arrays["completion_mask"]),
                    None, AdvantageConfig(group_size=G))
    np.testing.assert_allclose(np.asarray(adv).reshape(E, F, G)[0, :2], [[-0.5, 0.5]] * 2)
    assert "Alice has a cat named Tom." in snap.speakers[0].texts   # the snapshot is intact


def test_played_copies_keep_their_own_ops(conv, policy):
    """``play`` returns each copy's memories: the DELETE copy lost the Tom memory (counted in
    its stats), the NONE copy kept it, and a refused ADD into a full bank is marked."""
    cfg = dataclasses.replace(CFG, num_slots=2)
    data = ET.build_episode_data([(conv, conv.qas)], cfg, EMB, policy, window_sessions=1,
                                 snapshot_manager="add_all", max_questions=0, seed=0)
    w = next(w for w in data.windows if w.sessions == (2,))
    task = ET.EpisodeTask(data, data, policy, EMB, cfg, {"em": 1.0}, 0.0, 8, 2, group_size=2,
                          episodes_per_step=1, answer_fn=TMT.CatAgent())
    task._sample = scripted(task, [["ADD", "DELETE"], ["NONE", "ADD"]])
    from mr1.sampling import SamplingConfig
    played = task.play(data, [w], 2, policy.params, jax.random.PRNGKey(0),
                       SamplingConfig(max_new_tokens=1, temperature=1.0))
    delete_copy, add_copy = played.memories[0]
    snap = data.snapshots[(TMT.CONV_ID, 2)]
    gone = set(snap.speakers[0].texts) - set(delete_copy.speakers[0].texts)
    assert len(gone) == 1 and delete_copy.stats.ops["DELETE"] == 1
    assert add_copy.speakers[0].texts == snap.speakers[0].texts   # Alice's bank was full:
    assert played.full[0, 1, 1] and played.invalid[0, 1, 1]       # her ADD was refused
    assert add_copy.stats.refused["bank_full"] == 1
    assert played.op[0, 1, 1] == int(B.OpCode.NOOP)


def test_masked_form_never_adds_into_a_full_bank(conv, policy):
    """``op_budget_mask``: a fact whose bank is full at the session's start (Alice's, 4 slots)
    samples only UPDATE / DELETE / NONE, in training (``play``) and in the pipeline's build;
    Bob's, with room, may still ADD. The rows come back in prompt order."""
    from mr1.memory.ops import FULL_BANK_CHOICE_WORDS, op_choice_tokens
    from mr1.sampling import SamplingConfig

    cfg = dataclasses.replace(CFG, manager_format="op_budget_mask")    # 4 slots
    data = ET.build_episode_data([(conv, conv.qas)], cfg, EMB, policy, window_sessions=1,
                                 snapshot_manager="add_all", max_questions=0, seed=0)
    w = next(w for w in data.windows if w.sessions == (2,))
    task = ET.EpisodeTask(data, data, policy, EMB, cfg, {"em": 1.0}, 0.0, 8, 2, group_size=16,
                          episodes_per_step=1, answer_fn=TMT.CatAgent())
    rows = data.facts[TMT.CONV_ID][2]
    snap = data.snapshots[(TMT.CONV_ID, 2)]
    _, _, no_add = task._prompts_of_session(snap, rows, data.fact_embeddings[TMT.CONV_ID][2])
    used = [int(np.asarray(m.bank.valid).sum()) for m in snap.speakers]
    assert used == [4, 3] and no_add == [False, True]     # Bob's marathon, Alice's dog
    played = task.play(data, [w], 16, policy.params, jax.random.PRNGKey(3),
                       SamplingConfig(max_new_tokens=1, temperature=1.0,
                                      allowed_tokens=task.allowed_tokens))
    masked = set(op_choice_tokens(task.tokenize, FULL_BANK_CHOICE_WORDS))
    for i, full in enumerate(no_add):
        first = {int(t) for t in played.tokens[0, i, :, 0]}
        assert first <= (masked if full else set(task.allowed_tokens)), (i, first)
        if full:   # never an ADD, so never a refusal
            assert not (played.op[0, i] == int(B.OpCode.ADD)).any()
            assert not played.full[0, i].any()
    # the pipeline builds with the same mask: a prompt of a full bank is never offered ADD
    # (a scripted manager that ADDs whenever it may, else says NONE, fills the banks)
    builder = MemoryBuilder(dataclasses.replace(cfg, manager="llm"), EMB, policy)
    add, offered = op_choice_tokens(task.tokenize, ["ADD"])[0], []

    def generate(prompts, max_new_tokens, **kw):
        offered.extend((p, kw["allowed_tokens"]) for p in prompts)
        return ["ADD" if add in kw["allowed_tokens"] else "NONE" for _ in prompts]
    builder._generate = generate
    builder.build(conv)
    full_prompt = "It holds 4 of at most 4 memories"
    assert {full_prompt in p for p, _ in offered} == {True, False}
    for p, allowed in offered:
        assert set(allowed) == (masked if full_prompt in p else set(task.allowed_tokens))
    with pytest.raises(ValueError, match="episodes"):     # the facts task cannot model it
        from mr1.rl.memory_task import ManagerTask
        ManagerTask.__post_init__(types.SimpleNamespace(policy=policy, pipeline=cfg))


# ----------------------------------------------------------------------------- 4. training

@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_tiny_episode_training(tmp_path, algo, locomo_available, embedded_gguf):
    """The tiny budget config trains on LoCoMo episodes through the trainer: the update sees
    the task's layout, metrics carry the op shares and validation, checkpoints are written."""
    from tests.memory_rl_driver import toy_answer

    c = runpy.run_path(str(ROOT / "experiments" / "configs" / "locomo_tiny_memory_budget.py")
                       )["get_config"]()
    c = apply_overrides(c, {"algo": algo, "num_steps": 1 if algo == "ppo" else 2})
    out = ET.train_manager(c, tmp_path / algo, embedder=EMB, answer_fn=toy_answer,
                           log=lambda s: None)
    assert out["final_step"] == c.num_steps
    import csv
    rows = list(csv.DictReader(open(tmp_path / algo / "metrics.csv")))
    steps = [r for r in rows if r.get("op_add")]
    assert len(steps) == c.num_steps
    for r in steps:
        shares = [float(r[f"op_{k}"]) for k in ("add", "update", "delete", "noop")]
        assert abs(sum(shares) + float(r["invalid_frac"]) - 1.0) < 1e-6
        assert float(r["grad_norm"]) > 0
    assert "val_f1" in rows[0] and (tmp_path / algo / "checkpoints").exists()
    cfg = json.loads((tmp_path / algo / "config.json").read_text())
    assert cfg["manager"]["task"] == "episodes"
