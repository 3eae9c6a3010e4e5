"""Memory under a budget (issues 20 and 21): a full bank's refusals, evictions and truncations
are counted, reported and part of the memory dir's identity; the rule baselines; the env step
is the pipeline's op.

No LLM runs here (rule managers, a bag-of-words embedder, UTF-8 byte tokens), so the file
takes seconds; the conv-26 row needs LoCoMo.
"""

from __future__ import annotations

import collections
import json
import runpy

import jax
import ml_collections
import numpy as np
import pytest

from mr1.agents.pipeline import MemoryBuilder, PipelineConfig, build_all, manager_identity
from mr1.data.records import QA, Conversation, Observation, Session, Turn
from mr1.memory import bank as B
from mr1.memory.env import MemoryManagerEnv, make_episode, step_once
from mr1.memory.store import (BuildStats, apply_ops, claim_memory_dir, load_memory,
                              new_speaker_memory)
from tests.rl_driver import HashEmbedder

S, L, D = 3, 4, 4
CAPACITY_CONFIG = "experiments/configs/evaluate_locomo_capacity.py"


def _act(op, target=-1, tokens=(1,), emb=(1, 0, 0, 0)):
    return B.make_action(op, target, tokens, emb, 0, max_len=L, dim=D)


# ----------------------------------------------------------------------------- env == pipeline

@pytest.mark.parametrize("policy", ["refuse", "evict_lru", "evict_fifo"])
def test_env_step_equals_the_pipelines_op_on_a_hand_built_bank(policy):
    """The same op sequence (fills the bank, overflows it, a long text, UPDATE, DELETE of a
    free slot) through MemoryManagerEnv.step and through the pipeline's apply_ops gives the
    same bank and the same result at every step."""
    acts = [_act(B.OpCode.ADD, tokens=[1, 2], emb=(1, 0, 0, 0)),
            _act(B.OpCode.ADD, tokens=[3], emb=(0, 1, 0, 0)),
            _act(B.OpCode.UPDATE, 0, tokens=[4, 5, 6, 7, 8, 9], emb=(0, 0, 1, 0)),
            _act(B.OpCode.ADD, tokens=[5], emb=(0, 0, 0, 1)),
            _act(B.OpCode.ADD, tokens=[6], emb=(1, 1, 0, 0)),   # full bank
            _act(B.OpCode.DELETE, 2),
            _act(B.OpCode.DELETE, 2),                            # now free: refused
            _act(B.OpCode.NOOP)]
    cfg = PipelineConfig(num_slots=S, max_len=L, full_policy=policy)
    mem = new_speaker_memory("Ann", 0, cfg, D)
    stats = BuildStats()
    pipe = apply_ops(mem, B.stack_actions(acts), [f"t{i}" for i in range(len(acts))], "d",
                     stats)

    env = MemoryManagerEnv()
    ep = make_episode([[9]] * len(acts), np.eye(D)[[0] * len(acts)], [0] * len(acts),
                      max_facts=len(acts), max_len=L)
    params = env.make_params(ep, B.empty_bank(S, L, D, full_policy=policy))
    _, state = env.reset(jax.random.key(0), params)
    step = jax.jit(env.step)
    for i, a in enumerate(acts):
        _, state, _, _, info = step(jax.random.key(i), state, a, params)
        got = jax.device_get(info)
        assert bool(got["op_valid"]) == (not bool(pipe[i].refused)), i
        for f in ("applied", "reason", "slot", "evicted", "truncated"):
            assert np.asarray(got[f]) == np.asarray(getattr(pipe[i], f)), (i, f)
    for f in ("tokens", "lengths", "valid", "embeddings", "speaker", "created", "updated",
              "step"):
        np.testing.assert_array_equal(getattr(state.bank, f), getattr(mem.bank, f), err_msg=f)
    # and the one-fact form the RL task uses gives the same bank for the last op
    bank, res = step_once(mem.bank, acts[-1], 0)
    assert bool(res.refused) is False and int(bank.step) == int(mem.bank.step) + 1
    # the counts: one truncation (6 tokens > 4), one full-bank ADD, one bad DELETE
    assert stats.truncated == 1
    assert stats.capacity["bank_full"] == (1 if policy == "refuse" else 0)
    assert stats.evicted == (0 if policy == "refuse" else 1)
    assert stats.refused["bad_target"] == 1


# ----------------------------------------------------------------------------- counted events

def _conv(n_ann=5, n_bob=2, long_ann=1):
    """Ann has ``n_ann`` facts (``long_ann`` of them over 16 bytes), Bob ``n_bob``; one
    session per fact pair; facts are evidence for their turn ``D<s>:<i>``."""
    obs, sessions = [], []
    for s in range(1, max(n_ann, n_bob) + 1):
        sessions.append(Session(s, f"{s} May 2023", (Turn("Ann", "hi", f"D{s}:1", s, ""),)))
        if s <= n_ann:
            text = f"Ann fact {s}" + (" with a very long tail" if s <= long_ann else "")
            obs.append(Observation(s, "Ann", text, (f"D{s}:1",)))
        if s <= n_bob:
            obs.append(Observation(s, "Bob", f"Bob fact {s}", (f"D{s}:2",)))
    qa = QA("q?", "a", ("D2:1", "D4:1", "D1:2"), 4, "c", question_id="c/q0")
    return Conversation("c", "Ann", "Bob", tuple(sessions), (qa,), tuple(obs))


@pytest.mark.parametrize("policy,bank_full,evicted", [("refuse", 3, 0), ("evict_lru", 0, 3),
                                                      ("evict_fifo", 0, 3)])
def test_a_full_bank_counts_every_refusal_eviction_and_truncation(policy, bank_full, evicted,
                                                                   tmp_path):
    """Ann's 5 facts into 2 slots: 3 refused or 3 evicted, per policy; the long fact
    (31 bytes > 16) is truncated once; the counts reach the saved stats, the manifest, the
    build log and evaluate's memory_ops."""
    from tests.test_evaluate import _module   # loads the script once (its absl flags)

    ev = _module("evaluate")
    memory_ops, _ops_note = ev.memory_ops, ev._ops_note

    cfg = PipelineConfig(num_slots=2, max_len=16, full_policy=policy)
    lines = []
    out = build_all(MemoryBuilder(cfg, HashEmbedder()), [_conv()], tmp_path, progress=False,
                    log=lines.append)
    stats = out["c"].stats
    assert stats.ops["ADD"] == 7 - bank_full
    assert stats.capacity == {"bank_full": bank_full, "evicted": evicted, "truncated": 1}
    ann = out["c"].by_name("Ann")
    assert int(np.asarray(ann.bank.valid).sum()) == 2
    kept = [t for _, t, _ in ann.items()]
    # refuse keeps the first two facts; both evictions keep the last two (ADDs only)
    assert kept == (["Ann fact 1 with a very long tail", "Ann fact 2"] if policy == "refuse"
                    else ["Ann fact 5", "Ann fact 4"])
    assert load_memory(tmp_path, "c").stats.to_dict() == stats.to_dict()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["total"]["evicted"] == evicted and manifest["total"]["bank_full"] == bank_full
    assert manifest["conversations"]["c"]["truncated"] == 1
    assert any(f"{evicted} memories evicted" in x and f"{bank_full} ADDs refused" in x
               for x in lines)
    config = ml_collections.ConfigDict({"memory": {"manager": "add_all", "num_slots": 2,
                                                   "full_policy": policy, "max_len": 16}})
    ops = memory_ops(out, config)
    assert (ops["bank_full"], ops["evicted"], ops["truncated"]) == (bank_full, evicted, 1)
    assert ops["num_slots"] == 2 and ops["full_policy"] == policy
    assert f"{evicted} memories evicted" in _ops_note(ops)


def test_lru_evicts_the_least_recently_updated_fifo_the_oldest():
    """After an UPDATE of slot 0, LRU evicts slot 1 (updated earlier), FIFO still slot 0."""
    for policy, victim in (("evict_lru", 1), ("evict_fifo", 0)):
        cfg = PipelineConfig(num_slots=2, max_len=L, full_policy=policy)
        mem, stats = new_speaker_memory("Ann", 0, cfg, D), BuildStats()
        acts = [_act(B.OpCode.ADD, tokens=[1]), _act(B.OpCode.ADD, tokens=[2]),
                _act(B.OpCode.UPDATE, 0, tokens=[3]), _act(B.OpCode.ADD, tokens=[4])]
        res = apply_ops(mem, B.stack_actions(acts), ["a", "b", "a2", "new"], "d", stats)
        assert int(res[-1].evicted) == victim and stats.evicted == 1
        assert mem.texts[victim] == "new"


# ----------------------------------------------------------------------------- baselines

def _view_build(manager, **kw):
    cfg = PipelineConfig(manager=manager, max_len=64, **kw)
    return MemoryBuilder(cfg, HashEmbedder()).build(_conv(long_ann=0))


def test_oracle_keeps_only_gold_evidence_facts():
    mem = _view_build("oracle", num_slots=8)
    # gold evidence D2:1, D4:1 (Ann's turns of sessions 2 and 4) and D1:2 (Bob's session 1)
    assert [t for _, t, _ in mem.by_name("Ann").items()] == ["Ann fact 2", "Ann fact 4"]
    assert [t for _, t, _ in mem.by_name("Bob").items()] == ["Bob fact 1"]
    assert mem.stats.ops["ADD"] == 3 and mem.stats.ops["NOOP"] == 4


def test_merge_similar_merges_into_the_nearest_memory_when_full():
    mem = _view_build("merge_similar", num_slots=2, full_policy="refuse")
    ann = [t for _, t, _ in mem.by_name("Ann").items()]
    assert len(ann) == 2 and mem.stats.ops["UPDATE"] == 3 and mem.stats.capacity["bank_full"] == 0
    merged = "; ".join(ann)
    for i in range(1, 6):   # nothing lost: every fact is in one of the two memories
        assert f"Ann fact {i}" in merged


@pytest.mark.parametrize("tau", [0.7, 0.8])
def test_skip_similar_skips_near_duplicates(tau):
    """The builder's ops equal a plain loop: per speaker, NOOP when the nearest kept fact's
    cosine is >= tau, else ADD (the bag-of-words embedding makes both happen)."""
    conv = _conv(long_ann=0)
    emb = HashEmbedder()
    want = collections.Counter()
    for spk in ("Ann", "Bob"):
        kept = []
        for o in conv.observations:
            if o.speaker != spk:
                continue
            e = emb.encode([o.text])[0]
            if kept and max(float(e @ k) for k in kept) >= tau - 1e-6:
                want["NOOP"] += 1
            else:
                want["ADD"] += 1
                kept.append(e)
    assert want["NOOP"] > 0 and want["ADD"] > 2
    mem = _view_build("skip_similar", num_slots=8, skip_tau=tau)
    assert dict(mem.stats.ops) == dict(want)


# ----------------------------------------------------------------------------- identity

def _capacity(baseline="add_all_refuse"):
    return runpy.run_path(CAPACITY_CONFIG)["get_config"](baseline)


@pytest.mark.parametrize("field,value", [("num_slots", 64), ("full_policy", "evict_lru"),
                                         ("max_len", 32), ("max_sessions", 3)])
def test_memory_dir_identity_covers_the_budget(field, value, tmp_path):
    base = _capacity()
    other = _capacity()
    other.memory[field] = value
    a, b = manager_identity(base), manager_identity(other)
    assert a != b and a[field] != b[field]
    claim_memory_dir(tmp_path, a)
    with pytest.raises(ValueError, match=f"{field}: "):
        claim_memory_dir(tmp_path, b)


def test_capacity_config_baselines_differ_and_pick_their_manager():
    names = ("add_all_refuse", "add_all_lru", "add_all_fifo", "merge_similar", "skip_similar",
             "prompted", "prompted_budget", "oracle")
    ids = {n: json.dumps(manager_identity(_capacity(n)), sort_keys=True) for n in names}
    assert len(set(ids.values())) == len(names)
    assert _capacity("skip_similar").memory.num_slots == 32
    assert manager_identity(_capacity("skip_similar"))["skip_tau"] == 0.75
    with pytest.raises(ValueError, match="unknown baseline"):
        _capacity("keep_everything")


# ----------------------------------------------------------------------------- conv-26 (issue 21)

def test_conv26_with_64_slots_reports_its_evictions(locomo_available, tmp_path):
    """Issue 21's row: the build of conv-26 with 64 slots said ``ADD: 184`` with 64 memories
    per speaker and nothing counted. Now every eviction and truncation is."""
    from mr1.data.locomo import load_locomo, split_locomo

    conv = split_locomo(load_locomo()).train[0]
    assert conv.sample_id == "conv-26"
    cfg = PipelineConfig(num_slots=64, max_len=64, full_policy="evict_lru")
    mem = build_all(MemoryBuilder(cfg, HashEmbedder()), [conv], tmp_path, progress=False,
                    log=lambda s: None)["conv-26"]
    facts = [o for o in conv.observations if o.text.strip()
             and o.speaker in (conv.speaker_a, conv.speaker_b)]
    per = collections.Counter(o.speaker for o in facts)
    want_evicted = sum(max(0, n - 64) for n in per.values())
    want_truncated = sum(len(o.text.encode("utf-8")) > 64 for o in facts)
    assert mem.stats.ops["ADD"] == len(facts) == 184
    assert mem.stats.evicted == want_evicted == 56
    assert mem.stats.truncated == want_truncated > 0
    assert [int(np.asarray(s.bank.valid).sum()) for s in mem.speakers] == [64, 64]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["total"]["evicted"] == 56


def test_a_memory_dir_of_another_budget_is_not_resumed(tmp_path):
    """Issue 21's row: banks built with 2 slots / evict_lru, then a run asking 4 / refuse on
    the same dir (as AnswerTask does, without manager.json) refuses instead of loading them;
    the same budget resumes."""
    built = PipelineConfig(num_slots=2, max_len=16, full_policy="evict_lru")
    build_all(MemoryBuilder(built, HashEmbedder()), [_conv()], tmp_path, progress=False,
              log=lambda s: None)
    logs = []
    again = build_all(MemoryBuilder(built, HashEmbedder()), [_conv()], tmp_path,
                      progress=False, log=logs.append)
    assert "c: done, loading" in logs and again["c"].budget == built.budget
    for other, field in ((PipelineConfig(num_slots=4, max_len=16, full_policy="refuse"),
                          "num_slots: 2 there, 4 now"),
                         (PipelineConfig(num_slots=2, max_len=16, full_policy="refuse"),
                          "full_policy: 'evict_lru' there, 'refuse' now"),
                         (PipelineConfig(num_slots=2, max_len=16, full_policy="evict_lru",
                                         max_sessions=3), "max_sessions: 0 there, 3 now")):
        with pytest.raises(ValueError, match=field):
            build_all(MemoryBuilder(other, HashEmbedder()), [_conv()], tmp_path,
                      progress=False, log=lambda s: None)


def test_compare_prints_the_budget_of_runs_with_banks(tmp_path):
    from mr1.eval.compare import Run, capacity_table

    table = {"overall": {"f1": 10.0, "n": 2}}
    ops = {"ops": {"ADD": 64, "NOOP": 3}, "invalid": {"empty_output": 2}, "refused": {},
           "manager": "skip_similar", "num_slots": 32, "full_policy": "refuse",
           "bank_full": 203, "evicted": 0, "truncated": 1}
    runs = [Run("skip", tmp_path, {"table": table, "memory_ops": ops,
                                   "evidence_coverage": {"covered": 1, "questions": 2}}, None),
            Run("rag", tmp_path, {"table": table, "memory_ops": None}, None)]
    lines = capacity_table(runs).splitlines()
    assert len(lines) == 3   # header, rule, the one run with banks
    assert lines[2] == ("| skip | skip_similar | 32 | refuse | 64 | 0 | 0 | 3 | 203 | 0 | 1 | 2 "
                        "| 1 / 2 |")
    assert capacity_table(runs[1:]) == ""


def test_add_all_banks_are_the_same_under_lru_and_fifo():
    """With ADDs only, every memory's last update is its creation: LRU and FIFO evict the
    same memories (why the capacity table runs one of them for add_all)."""
    conv = _conv(n_ann=7, n_bob=4, long_ann=0)
    mems = [MemoryBuilder(PipelineConfig(num_slots=3, max_len=16, full_policy=p),
                          HashEmbedder()).build(conv) for p in ("evict_lru", "evict_fifo")]
    assert mems[0].stats.evicted == mems[1].stats.evicted == (7 - 3) + (4 - 3)
    for a, b in zip(*[m.speakers for m in mems]):
        assert a.items() == b.items()
        np.testing.assert_array_equal(a.bank.tokens, b.bank.tokens)


def test_evidence_coverage_counts_questions_whose_evidence_fact_is_held():
    from mr1.memory.store import evidence_coverage

    conv = _conv(long_ann=0)
    qas = [QA("q1", "a", ("D2:1",), 4, "c"), QA("q2", "a", ("D5:1", "D9:9"), 4, "c"),
           QA("q3", "a", ("D1:2",), 4, "c"), QA("q4", "a", (), 4, "c")]
    # refuse at 2 slots keeps Ann's facts 1-2 and Bob's 1-2: q1 (D2:1) and q3 (D1:2)
    mem = _view_build("add_all", num_slots=2, full_policy="refuse")
    assert evidence_coverage(mem, conv.observations, qas) == (2, 4)
    # LRU keeps Ann's 4-5: q2 (D5:1) instead of q1
    mem = _view_build("add_all", num_slots=2, full_policy="evict_lru")
    assert evidence_coverage(mem, conv.observations, qas) == (2, 4)
    assert [t for _, t, _ in mem.by_name("Ann").items()] == ["Ann fact 5", "Ann fact 4"]
    # merging loses nothing: every fact's turn is held
    mem = _view_build("merge_similar", num_slots=2, full_policy="refuse")
    assert evidence_coverage(mem, conv.observations, qas) == (3, 4)
