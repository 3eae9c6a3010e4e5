"""The Memory Manager RL task (mr1.rl.memory_task) on a hand-built conversation.

Checks: the temporal banks hold each speaker's facts in turn order and a prefix of them is the
bank of the first ``n`` ADDs exactly; the samples are the facts of evidence turns with the right
prefixes and linked QAs; the reward of a hand-built case is 1 for the op that puts the needed
fact in memory (ADD, UPDATE) and 0 otherwise (NOOP, DELETE, malformed: 0 minus the penalty),
and DELETEing a needed memory turns 1 into 0; the vmapped per-sample bank copies never see each
other's ops and leave the stored banks untouched; one trainer step of the task on 8 CPU
devices equals the 1-device step (subprocesses, ``tests/memory_rl_driver.py``; slow: ~60 s on
2 busy cores, the rest of the file ~20 s).

Embeddings come from :class:`tests.rl_driver.HashEmbedder` (bag of words, dim 16), the model is
the random ``tiny-smollm2`` with the embedded tokenizer, and the Answer Agent is a stand-in.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np
import pytest

from mr1.agents import prompts as PR
from mr1.agents.pipeline import BuildStats, PipelineConfig, apply_ops, make_tokenize, \
    new_speaker_memory
from mr1.data.records import QA, Conversation, Observation, Session, Turn
from mr1.memory import bank as B
from mr1.rl import memory_task as MT
from tests import memory_rl_driver as MD
from tests import rl_driver as D

EMB = D.HashEmbedder()
CFG = PipelineConfig(num_slots=16, max_len=32, retrieve_k=2)
BYTES = lambda s: list(s.encode("utf-8"))  # noqa: E731 -- a tokenizer without a model
DATES = {1: "1:00 pm on 8 May, 2023", 2: "2:00 pm on 9 June, 2023", 3: "3:00 pm on 10 July, 2023"}
CONV_ID = "conv-t"

TURNS = {1: [("D1:1", "Alice", "I love jazz."), ("D1:2", "Bob", "I work as a nurse."),
             ("D1:3", "Alice", "I live in Paris and speak French.")],
         2: [("D2:1", "Bob", "I bought a red bike."), ("D2:2", "Alice", "My cat Tom is cute."),
             ("D2:3", "Bob", "I visited Rome.")],
         3: [("D3:1", "Alice", "We adopted a dog, Rex."), ("D3:2", "Bob", "I ran a marathon.")]}
# Listed out of turn (and session) order on purpose; two facts share turn D1:3 (list order
# decides between them); the first parseable evidence id is the fact's turn.
OBSERVATIONS = (
    Observation(3, "Bob", "Bob ran a marathon.", ("D3:2",)),
    Observation(2, "Alice", "Alice has a cat named Tom.", ("D2:2",)),
    Observation(1, "Alice", "Alice lives in Paris.", ("D1:3",)),
    Observation(1, "Bob", "Bob works as a nurse.", ("D1:2",)),
    Observation(1, "Alice", "Alice likes jazz.", ("D1:1",)),
    Observation(2, "Bob", "Bob visited Rome.", ("D2:3",)),
    Observation(1, "Alice", "Alice speaks French.", ("D1:3", "D1:1")),
    Observation(2, "Bob", "Bob bought a red bike.", (" D2:1",)),
    Observation(3, "Alice", "Alice adopted a dog named Rex.", ("D3:1",)),
    Observation(3, "Carol", "Carol is not a speaker.", ("D3:1",)),   # dropped: not a speaker
    Observation(2, "Bob", "   ", ("D2:1",)),                         # dropped: blank
)
# Each speaker's facts in turn order, with their turns.
ALICE = [("Alice likes jazz.", "D1:1"), ("Alice lives in Paris.", "D1:3"),
         ("Alice speaks French.", "D1:3"), ("Alice has a cat named Tom.", "D2:2"),
         ("Alice adopted a dog named Rex.", "D3:1")]
BOB = [("Bob works as a nurse.", "D1:2"), ("Bob bought a red bike.", "D2:1"),
       ("Bob visited Rome.", "D2:3"), ("Bob ran a marathon.", "D3:2")]
FACTS = (ALICE, BOB)


def _qa(i, question, answer, evidence):
    return QA(question, answer, evidence, 4, CONV_ID, question_id=f"{CONV_ID}/q{i}")


QAS = (_qa(0, "What is the name of Alice's cat?", "Tom", ("D2:2",)),
       _qa(1, "Where does Alice live?", "Paris", ("D1:3",)),
       _qa(2, "What does Bob do for work?", "nurse", ("D1:2",)),
       _qa(3, "What did Bob buy?", "a red bike", ("D2:1", "D1:3")),
       _qa(4, "What is Alice's cat called?", "Tom", ("D3:1",)),
       _qa(5, "Who is Carol?", "", ("D9:9",)))        # dangling evidence: no sample
# (fact, speaker, turn, prefix (Alice, Bob), linked QAs) of every sample, in turn order. Turns
# D1:1, D2:3 and D3:2 are evidence for no QA: no sample. Both D1:3 facts see the bank of the
# turns BEFORE D1:3 (neither sees the other).
SAMPLES = [("Bob works as a nurse.", 1, "D1:2", (1, 0), (2,)),
           ("Alice lives in Paris.", 0, "D1:3", (1, 1), (1, 3)),
           ("Alice speaks French.", 0, "D1:3", (1, 1), (1, 3)),
           ("Bob bought a red bike.", 1, "D2:1", (3, 1), (3,)),
           ("Alice has a cat named Tom.", 0, "D2:2", (3, 2), (0,)),
           ("Alice adopted a dog named Rex.", 0, "D3:1", (4, 3), (4,))]
TOM, REX = 4, 5  # sample indices of the reward cases
TOM_FACT = "Alice has a cat named Tom."


def make_conv() -> Conversation:
    sessions = tuple(Session(s, DATES[s], tuple(Turn(spk, text, did, s, DATES[s])
                                                for did, spk, text in TURNS[s]))
                     for s in (1, 2, 3))
    return Conversation(CONV_ID, "Alice", "Bob", sessions, QAS, OBSERVATIONS)


def _leaves(bank: B.MemoryBank) -> dict[str, np.ndarray]:
    return {f: np.asarray(getattr(bank, f)) for f in
            ("tokens", "lengths", "valid", "embeddings", "speaker", "created", "updated", "step")}


def assert_banks_equal(got: B.MemoryBank, want: B.MemoryBank, what: str = "") -> None:
    """Every leaf equal (bit-exact; the embeddings pass through the same ops), and the static
    fields."""
    assert (got.pad_id, got.full_policy) == (want.pad_id, want.full_policy), what
    g, w = _leaves(got), _leaves(want)
    for f in g:
        assert g[f].dtype == w[f].dtype and g[f].shape == w[f].shape, (what, f)
        np.testing.assert_array_equal(g[f], w[f], err_msg=f"{what}: {f}")


def add_only_bank(spk: int, n: int, tokenize=BYTES, pad_id: int = 0) -> B.MemoryBank:
    """A speaker's bank built from scratch by ADDing only its first ``n`` facts."""
    mem = new_speaker_memory(("Alice", "Bob")[spk], spk, CFG, EMB.dim, pad_id)
    for text, turn in FACTS[spk][:n]:
        act = B.make_action(B.OpCode.ADD, -1, tokenize(text), EMB.encode([text])[0], spk,
                            max_len=CFG.max_len, dim=EMB.dim, pad_id=pad_id)
        apply_ops(mem, B.stack_actions([act]), [text], DATES[int(turn[1])], BuildStats())
    return mem.bank


@pytest.fixture(scope="module")
def conv():
    return make_conv()


@pytest.fixture(scope="module")
def data(conv):
    return MT.build_manager_data([(conv, conv.qas)], CFG, EMB, BYTES)


# ----------------------------------------------------------------------------- 1. data

def test_temporal_banks_hold_each_speakers_facts_in_turn_order(conv):
    memory, rows = MT.temporal_memory(conv, CFG, EMB, BYTES)
    assert memory.sample_id == CONV_ID and memory.stats.facts == len(ALICE) + len(BOB)
    assert [(s.name, s.index) for s in memory.speakers] == [("Alice", 0), ("Bob", 1)]
    # rows: every kept fact, in (session, turn) order, ties in listing order
    assert [(f"D{k[0]}:{k[1]}", spk, text, date) for k, spk, text, date in rows] == sorted(
        [(t, spk, text, DATES[int(t[1])]) for spk in (0, 1) for text, t in FACTS[spk]],
        key=lambda r: (r[0], 0 if r[2] != "Alice speaks French." else 1))
    for spk, facts in enumerate(FACTS):
        mem = memory.speakers[spk]
        n = len(facts)
        leaves = _leaves(mem.bank)
        assert mem.texts[:n] == [t for t, _ in facts] and set(mem.texts[n:]) == {None}
        assert mem.timestamps[:n] == [DATES[int(turn[1])] for _, turn in facts]
        for i, (text, _) in enumerate(facts):  # slot i holds the speaker's i-th fact
            ids = BYTES(text)
            assert leaves["lengths"][i] == len(ids)
            np.testing.assert_array_equal(leaves["tokens"][i, : len(ids)], ids)
            assert not leaves["tokens"][i, len(ids):].any()
            np.testing.assert_allclose(leaves["embeddings"][i], EMB.encode([text])[0], atol=1e-6)
        np.testing.assert_array_equal(leaves["valid"], np.arange(CFG.num_slots) < n)
        np.testing.assert_array_equal(leaves["speaker"], np.where(np.arange(16) < n, spk, -1))
        # one ADD per action on this speaker's own bank: created = updated = slot
        np.testing.assert_array_equal(leaves["created"], np.where(np.arange(16) < n,
                                                                  np.arange(16), -1))
        np.testing.assert_array_equal(leaves["updated"], leaves["created"])
        assert leaves["step"] == n
    with pytest.raises(ValueError, match="num_slots"):  # 5 Alice facts do not fit 4 slots
        MT.temporal_memory(conv, dataclasses.replace(CFG, num_slots=4), EMB, BYTES)


def test_prefix_bank_is_the_bank_of_the_first_n_adds(conv):
    """``prefix_bank(bank, n)`` equals a bank built by ADDing only the first ``n`` facts, in
    EVERY leaf, ``step``/``created``/``updated`` included: each speaker's bank receives only its
    own ADDs, one action each, so after ``n`` ADDs ``step == n`` and slot ``i`` has
    ``created == updated == i`` (prefix_bank sets ``step = n`` and keeps the first ``n`` slots'
    ``created``/``updated``), and freed slots get the free-slot values ``empty_bank`` uses."""
    memory, _ = MT.temporal_memory(conv, CFG, EMB, BYTES)
    prefix = jax.jit(MT.prefix_bank)
    for spk, facts in enumerate(FACTS):
        full = memory.speakers[spk].bank
        for n in range(len(facts) + 1):
            want = add_only_bank(spk, n)
            assert_banks_equal(MT.prefix_bank(full, n), want, f"speaker {spk}, n {n}")
            assert_banks_equal(prefix(full, np.int32(n)), want, f"jit, speaker {spk}, n {n}")
        assert_banks_equal(MT.prefix_bank(full, len(facts)), full)


def _expected_shown(memory, spk, n, fact):
    """Top-``retrieve_k`` of the first ``n`` slots by cosine with the fact (ties: lower slot)."""
    e = EMB.encode([fact])[0]
    scores = np.asarray(memory.speakers[spk].bank.embeddings)[:n] @ e
    return tuple(sorted(range(n), key=lambda s: (-scores[s], s))[: CFG.retrieve_k])


def test_samples_are_the_facts_of_evidence_turns(conv, data):
    assert [(s.fact, s.speaker, s.turn, s.prefix, s.qa_indices) for s in data.samples] == SAMPLES
    assert len(data) == len(SAMPLES) and set(data.convs) == set(data.memories) == {CONV_ID}
    memory = data.memories[CONV_ID]
    for i, s in enumerate(data.samples):
        assert s.conv_id == CONV_ID and s.date == DATES[int(s.turn[1])]
        # prefix[s] counts the speaker's facts of earlier turns
        assert s.prefix == tuple(sum(t < s.turn for _, t in FACTS[sp]) for sp in (0, 1))
        assert s.shown == _expected_shown(memory, s.speaker, s.prefix[s.speaker], s.fact)
        assert all(slot < s.prefix[s.speaker] for slot in s.shown)  # no later memory shown
        mem = memory.speakers[s.speaker]
        assert data.prompts[i] == PR.memory_manager_prompt(
            mem.name, s.fact, [(d, mem.texts[slot]) for d, slot in enumerate(s.shown)])
        assert all(s.turn in conv.qas[q].evidence for q in s.qa_indices)
        np.testing.assert_allclose(data.fact_embeddings[i], EMB.encode([s.fact])[0], atol=1e-7)
    np.testing.assert_allclose(data.question_embeddings[CONV_ID],
                               EMB.encode([qa.question for qa in QAS]), atol=1e-7)
    # the first sample's bank is empty of Bob's memories: nothing shown
    assert data.samples[0].shown == () and "(none)" in data.prompts[0]

    # only the QAs in `selected` link; qa_indices index conv.qas
    only_cat = MT.build_manager_data([(conv, [QAS[0], QAS[5]])], CFG, EMB, BYTES)
    assert [(s.fact, s.qa_indices) for s in only_cat.samples] == [(TOM_FACT, (0,))]
    assert MT.build_manager_data([(conv, [QAS[5]])], CFG, EMB, BYTES).samples == []
    # max_samples: a seeded subset in order, prompts and embeddings aligned
    sub = MT.build_manager_data([(conv, conv.qas)], CFG, EMB, BYTES, max_samples=3, seed=1)
    pos = [data.samples.index(s) for s in sub.samples]
    assert len(pos) == 3 and pos == sorted(pos)
    assert sub.prompts == [data.prompts[p] for p in pos]
    np.testing.assert_array_equal(sub.fact_embeddings, data.fact_embeddings[pos])


def test_qas_without_question_ids_link_to_themselves(conv):
    bare = dataclasses.replace(conv, qas=tuple(dataclasses.replace(q, question_id="")
                                               for q in conv.qas))
    got = MT.build_manager_data([(bare, bare.qas)], CFG, EMB, BYTES)
    assert [s.qa_indices for s in got.samples] == [s[4] for s in SAMPLES]


# ----------------------------------------------------------------------------- 2. reward

class CatAgent:
    """Stand-in Answer Agent: "Tom" iff a memory line of the prompt mentions Tom."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        return ["**Answer:** Tom" if any(x.startswith("- ") and "Tom" in x
                                         for x in p.splitlines()) else "**Answer:** unknown"
                for p in prompts]


@pytest.fixture(scope="module")
def policy(embedded_gguf):
    from mr1.models import load_policy
    from mr1.models.policy import load_tokenizer_from_gguf

    return load_policy("tiny-smollm2", tokenizer=load_tokenizer_from_gguf(embedded_gguf), seed=0)


@pytest.fixture(scope="module")
def task_data(conv, policy):
    return MT.build_manager_data([(conv, conv.qas)], CFG, EMB, make_tokenize(policy),
                                 pad_id=policy.pad_token_id)


def make_task(task_data, policy, invalid_penalty=0.0, agent=None):
    # answer_top_k covers every memory, so the answer prompt shows the whole bank and the
    # reward depends on the op only (HashEmbedder's ranking of the question plays no part)
    return MT.ManagerTask(task_data, task_data, policy, EMB, CFG, {"em": 1.0}, invalid_penalty,
                          reply_max_new_tokens=8, answer_top_k=8, answer_fn=agent or CatAgent())


def op_json(event, id_="0", text=""):
    return json.dumps({"memory": [{"id": id_, "text": text, "event": event}]})


def test_reward_of_hand_built_ops(task_data, policy):
    s = task_data.samples[TOM]
    assert s.fact == TOM_FACT and s.prefix == (3, 2) and s.qa_indices == (0,)
    assert len(s.shown) == 2 and TOM_FACT not in task_data.memories[CONV_ID].speakers[0].texts[:3]
    agent = CatAgent()
    task = make_task(task_data, policy, agent=agent)
    outputs = {"add": op_json("ADD", "0", TOM_FACT),
               "noop": op_json("NONE"),
               "malformed": '{"memory": [{"id": "0", "text": "Alice has',
               "update": op_json("UPDATE", "1", TOM_FACT),
               "delete": op_json("DELETE", "0"),
               "bad_id": op_json("DELETE", "5")}        # only ids 0 and 1 were shown
    want = {"add": (1.0, B.OpCode.ADD, 0), "noop": (0.0, B.OpCode.NOOP, 0),
            "malformed": (0.0, B.OpCode.NOOP, 1), "update": (1.0, B.OpCode.UPDATE, 0),
            "delete": (0.0, B.OpCode.DELETE, 0), "bad_id": (0.0, B.OpCode.NOOP, 1)}
    out = task.score_outputs(task_data, [TOM], list(outputs.values()), group=len(outputs))
    for j, name in enumerate(outputs):
        r, op, inv = want[name]
        assert (out["reward"][j], out["op"][j], out["invalid"][j]) == (r, int(op), inv), name
        assert out["em"][j] == r and out["f1"][j] == r, name
    # one answer call; identical prompts (NOOP, malformed, bad id: the bank as it was) once
    assert len(agent.calls) == 1 and int(out["num_answer_prompts"]) == 4 == len(agent.calls[0])
    # the written memory carries the fact's session date; ADD keeps the 3 earlier memories,
    # UPDATE replaces shown memory 1; Bob's bank is his prefix (2 memories, not D2:3's Rome)
    texts = task_data.memories[CONV_ID].speakers[0].texts
    added = [p for p in agent.calls[0] if f"- [{DATES[2]}] {TOM_FACT}" in p]
    assert len(added) == 2 and all("Bob bought a red bike." in p and "Rome" not in p
                                   for p in added)
    keeps = [all(t in p for t in texts[:3]) for p in added]
    assert sorted(keeps) == [False, True]
    assert texts[s.shown[1]] not in added[keeps.index(False)]

    # the malformed op costs the penalty; valid ones do not
    penalised = make_task(task_data, policy, invalid_penalty=0.5)
    out = penalised.score_outputs(task_data, [TOM], [outputs["malformed"], outputs["add"],
                                                     outputs["noop"]], group=3)
    np.testing.assert_array_equal(out["reward"], [-0.5, 1.0, 0.0])
    np.testing.assert_array_equal(out["invalid"], [1, 0, 0])


def test_deleting_a_needed_memory_loses_the_reward(task_data, policy):
    """The fact of turn D3:1 (Rex) is linked to "What is Alice's cat called?": its prefix bank
    already holds the Tom memory (slot 3), so NOOP earns 1 and DELETE / overwriting it 0."""
    s = task_data.samples[REX]
    assert s.prefix == (4, 3) and s.qa_indices == (4,)
    assert 3 in s.shown, s.shown   # "alice ... a ... named" overlap: Tom is the closest memory
    tom, other = str(s.shown.index(3)), str(1 - s.shown.index(3))
    texts = [op_json("NONE"), op_json("DELETE", tom), op_json("DELETE", other),
             op_json("ADD", "0", s.fact), op_json("UPDATE", tom, s.fact)]
    out = make_task(task_data, policy).score_outputs(task_data, [REX], texts, group=len(texts))
    np.testing.assert_array_equal(out["reward"], [1.0, 0.0, 1.0, 1.0, 0.0])
    np.testing.assert_array_equal(out["op"], [0, 3, 3, 1, 2])
    assert not out["invalid"].any()


# ----------------------------------------------------------------------------- 3. no leakage

def _action(op, target=-1, text="", spk=0):
    return B.make_action(op, target, BYTES(text), EMB.encode([text])[0] if text else None, spk,
                         max_len=CFG.max_len, dim=EMB.dim)


# (speaker, prefix, action) per sample: both speakers, different prefixes, every op, and a
# DELETE of a slot the prefix hides (refused: the later memory is not in that sample's bank)
CASES = [(0, 3, _action(B.OpCode.ADD, text="Alice has a cat named Tom.")),
         (0, 3, _action(B.OpCode.NOOP)),
         (0, 3, _action(B.OpCode.UPDATE, 1, "Alice lives in Lyon.")),
         (0, 3, _action(B.OpCode.DELETE, 0)),
         (1, 1, _action(B.OpCode.ADD, text="Bob bought a blue car.", spk=1)),
         (1, 2, _action(B.OpCode.DELETE, 1, spk=1)),
         (0, 0, _action(B.OpCode.ADD, text="Alice owns a boat.")),
         (1, 4, _action(B.OpCode.UPDATE, 3, "Bob ran two marathons.", spk=1)),
         (0, 2, _action(B.OpCode.DELETE, 3))]


def test_per_sample_banks_never_leak(data):
    memory = data.memories[CONV_ID]
    banks = MT.stack_banks(memory)
    before = _leaves(banks)
    spk = np.asarray([c[0] for c in CASES], np.int32)
    pre = np.asarray([c[1] for c in CASES], np.int32)
    acts = B.stack_actions([c[2] for c in CASES])
    out, res = MT.apply_sample_ops(banks, spk, pre, acts)
    applied = []
    for b, (sp, n, act) in enumerate(CASES):
        want, want_res = B.apply_action(MT.prefix_bank(memory.speakers[sp].bank, n), act)
        assert_banks_equal(jax.tree.map(lambda x, b=b: x[b], out), want, f"sample {b}")
        for f in ("applied", "refused", "reason", "slot", "evicted"):
            assert int(getattr(res, f)[b]) == int(getattr(want_res, f)), (b, f)
        applied.append(bool(res.applied[b]))
    assert applied == [True, False, True, True, True, True, True, True, False]  # not vacuous
    assert int(res.slot[0]) == 3 and int(res.slot[6]) == 0 and int(res.reason[8]) == \
        B.Refusal.BAD_TARGET
    # the order of the batch does not matter: sample b's bank depends on action b only
    rev = slice(None, None, -1)
    out_r, _ = MT.apply_sample_ops(banks, spk[rev], pre[rev],
                                   jax.tree.map(lambda x: x[rev], acts))
    assert_banks_equal(jax.tree.map(lambda x: x[rev], out_r), out, "reversed batch")
    assert_banks_equal(banks, MT.stack_banks(memory), "input banks")
    for f, v in _leaves(banks).items():
        np.testing.assert_array_equal(v, before[f], err_msg=f)


def test_scoring_leaves_the_stored_memories_unchanged(task_data, policy):
    memory = task_data.memories[CONV_ID]
    snap = [(list(m.texts), list(m.timestamps), _leaves(m.bank)) for m in memory.speakers]
    task = make_task(task_data, policy)
    rex = task_data.samples[REX]
    tom_id = str(rex.shown.index(3))
    # per sample: ADD, UPDATE, DELETE, NOOP outputs -- all scored in one call
    texts = {TOM: [op_json("ADD", "0", TOM_FACT), op_json("UPDATE", "0", "Alice likes rock."),
                   op_json("DELETE", "1"), op_json("NONE")],
             REX: [op_json("DELETE", tom_id), op_json("UPDATE", tom_id, "Alice has no cat."),
                   op_json("ADD", "0", "Alice adopted a dog named Rex."), op_json("NONE")],
             1: [op_json("ADD", "0", "Alice lives in Paris."), op_json("DELETE", "0"),
                 op_json("UPDATE", "0", "Alice likes jazz a lot."), op_json("NONE")]}
    idx = [TOM, REX, 1]
    together = task.score_outputs(task_data, idx, [t for i in idx for t in texts[i]], group=4)
    stacked = _leaves(task._banks(CONV_ID))
    # each sample scored alone gives the same: no sample sees another's op
    for k, i in enumerate(idx):
        alone = task.score_outputs(task_data, [i], texts[i], group=4)
        for key in ("reward", "op", "invalid", "em"):
            np.testing.assert_array_equal(together[key][4 * k: 4 * k + 4], alone[key],
                                          err_msg=f"sample {i}: {key}")
    np.testing.assert_array_equal(together["reward"][:8], [1, 0, 0, 0, 0, 0, 1, 1])
    for m, (texts_, stamps, leaves) in zip(memory.speakers, snap, strict=True):
        assert m.texts == texts_ and m.timestamps == stamps
        for f, v in _leaves(m.bank).items():
            np.testing.assert_array_equal(v, leaves[f], err_msg=f)
    for f, v in _leaves(task._banks(CONV_ID)).items():
        np.testing.assert_array_equal(v, stacked[f], err_msg=f)
    for sp in (0, 1):
        for f, v in _leaves(jax.tree.map(lambda x, sp=sp: x[sp], task._banks(CONV_ID))).items():
            np.testing.assert_array_equal(v, snap[sp][2][f], err_msg=f"stacked {sp}: {f}")


# ----------------------------------------------------------------------------- 4. 8 devices

# Metrics: float rounding only (the 8-device update all-reduces the gradient in another order).
RTOL, ATOL = 1e-5, 1e-6
# Params: Adam's first step is lr * g / (|g| + eps) per element, so an element whose gradient is
# float noise away from zero can move by a visible fraction of the learning rate (1e-3) when the
# gradient's rounding changes (observed: 4 of 3.2M elements, up to 4.2e-5). Allowed: 0.01% of
# the elements within 20% of the learning rate, the rest within RTOL / ATOL. (Adam's first step
# does not see the gradient's scale; loss and grad_norm in the metrics do, within RTOL.)
ADAM_OUTLIER_ATOL = 2e-4
OVERRIDES = {"num_steps": 1, "rollout.prompts_per_step": 8, "rollout.microbatch_prompts": 8,
             "data.max_train_samples": 8, "eval.every": 0}


@pytest.mark.slow
def test_manager_step_on_8_devices_equals_one_device(embedded_gguf, tmp_path):
    """One GRPO step of the Memory Manager task (8 facts x 4 outputs, one micro-batch) on 8
    forced CPU devices and on 1: same rollouts and rewards, metrics.csv equal within RTOL /
    ATOL, params within the Adam tolerance above. Rewards vary within groups (the driver adds a
    length-based toy term to the real reward), so the gradient is not zero."""
    from mr1.data import locomo
    from mr1.models import load_policy
    from mr1.rl.trainer import load_trained_params

    try:
        locomo.load_locomo()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"LoCoMo data unavailable: {e}")
    t0 = time.time()
    wds = {n: tmp_path / f"dev{n}" for n in (1, 8)}
    MD.finish({wds[n]: MD.run(wds[n], OVERRIDES, devices=n, cache_dir=tmp_path / "cache")
               for n in (1, 8)}, timeout=480)
    print(f"two driver runs: {time.time() - t0:.1f}s")
    assert "CpuDevice(id=7)" in MD.log_path_of(wds[8]).read_text()
    assert "CpuDevice(id=1)" not in MD.log_path_of(wds[1]).read_text()

    rewards = {n: np.asarray(json.loads((wds[n] / "rewards.json").read_text())) for n in wds}
    assert rewards[1].shape == (1, 32)
    np.testing.assert_array_equal(rewards[8], rewards[1])  # host-side: identical rollouts
    groups = rewards[1].reshape(8, 4)
    assert (groups.std(axis=1) > 0).sum() >= 4, groups  # rewards vary within groups

    rows = {n: D.csv_rows(wds[n]) for n in wds}
    assert sorted(rows[1]) == sorted(rows[8]) == [1]
    want = rows[1][1]
    assert want["grad_norm"] > 1e-3 and want["skipped"] == 0.0, want
    D.assert_rows_equal(rows[8][1], want, rtol=RTOL, atol=ATOL, what="metrics 8 vs 1 device")

    base = load_policy("tiny-smollm2", seed=0).params
    p1, p8 = (jax.tree.map(np.asarray, load_trained_params(wds[n] / "checkpoints", base))
              for n in (1, 8))
    assert D.max_param_diff(p1, jax.tree.map(np.asarray, base)) > 1e-4  # the step moved them
    D.assert_params_close(p8, p1, rtol=RTOL, atol=ATOL, what="params 8 vs 1 device",
                          outlier_atol=ADAM_OUTLIER_ATOL, max_outlier_frac=1e-4)
