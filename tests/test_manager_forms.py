"""The Memory Manager prompt forms (commit 3a5747a): constrained sampling, the one-word "op" form.

1. ``SamplingConfig.allowed_tokens`` / ``generate(..., allowed_tokens=)`` on the random ``tiny``
   model: every greedy and sampled token lies in the allowed set, greedy is the allowed id with
   the highest logit (checked against a full forward), the returned logprobs stay the model's
   full-vocabulary log-softmax, and ``()`` (or the whole vocabulary) changes nothing;
2. ``parse_op_choice`` / ``choice_to_op`` / ``op_choice_tokens`` (hand cases + a hypothesis fuzz);
3. ``MemoryBuilder`` with ``manager_format="op"``: a stand-in ``generate_fn`` answers one word
   per fact and the banks, texts and :class:`BuildStats` follow the ops; plus one end-to-end run
   with the real constrained sampler on ``tiny-smollm2``;
4. ``ManagerTask`` in the "op" form on the hand-built conversation of
   ``tests/test_memory_task.py``: one allowed token per op word, ``max_new_tokens == 1``, the
   one-word outputs earn exactly what the equivalent JSON outputs earn, and a rollout samples
   only op words with full-vocabulary old logprobs;
5. the ``"json_op"`` form (the paper's JSON prompt, the reply forced to
   ``{"memory": [{"event": "`` and the op word constrained): ``reply_prefix`` in
   ``encode_prompts`` / ``generate``, and a ``ManagerTask`` whose prompts end with the forced
   ids and whose words score as the "op" form's.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mr1 import sampling
from mr1.agents import prompts as PR
from mr1.agents.pipeline import BuildStats, MemoryBuilder, PipelineConfig, make_tokenize
from mr1.data.records import Conversation, Observation, Session, Turn
from mr1.memory import bank as B
from mr1.memory.ops import (OP_CHOICE_WORDS, ParsedOp, Reason, choice_to_op, op_choice_tokens,
                            parse_op_choice)
from mr1.models import load_policy
from mr1.rl import memory_task as MT
from mr1.sampling import SamplingConfig, generate
from tests import rl_driver as D
from tests import test_memory_task as TM
from tests.test_sampling import _prompts

BYTES = TM.BYTES  # UTF-8 bytes: a tokenizer without a model
EMB = D.HashEmbedder()
OpCode = B.OpCode


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny", seed=1)


@pytest.fixture(scope="module")
def smol(embedded_gguf):
    """The random ``tiny-smollm2`` with the embedded SmolLM2 tokenizer (as test_memory_task)."""
    from mr1.models.policy import load_tokenizer_from_gguf

    return load_policy("tiny-smollm2", tokenizer=load_tokenizer_from_gguf(embedded_gguf), seed=0)


# ----------------------------------------------------------------------------- 1. sampling

ALLOWED = (7, 42, 99, 200, 131)


def _last_logits(policy, seq) -> np.ndarray:
    return np.asarray(policy.logits(np.asarray([seq]))[0, -1], np.float64)


def _full_logp(logits) -> np.ndarray:
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)), np.float64)


def test_greedy_allowed_is_the_best_allowed_logit(tiny):
    """Greedy with ``allowed_tokens``: at every step the allowed id of highest logit (a full
    forward of prompt + tokens so far), with the model's full-vocabulary logprob."""
    prompts = _prompts(3, seed=11)
    steps = 4
    out = generate(tiny, prompts, max_new_tokens=steps, chat=False, ignore_eos=True,
                   allowed_tokens=ALLOWED)
    assert out.tokens.shape == (3, steps) and (out.lengths == steps).all()
    assert set(out.tokens.ravel().tolist()) <= set(ALLOWED)
    differs = 0
    for i, p in enumerate(prompts):
        seq = list(p)
        for j in range(steps):
            logits = _last_logits(tiny, seq)
            want = ALLOWED[int(np.argmax(logits[list(ALLOWED)]))]
            assert out.tokens[i, j] == want, (i, j)
            differs += int(np.argmax(logits)) != want
            np.testing.assert_allclose(out.logprobs[i, j], _full_logp(logits)[want], atol=1e-5)
            seq.append(int(out.tokens[i, j]))
    assert differs > 0, "the constraint never mattered: pick other ALLOWED ids"


def test_sampled_allowed_tokens_stay_in_the_set_with_model_logprobs(tiny):
    prompts = _prompts(2, lo=5, hi=20, seed=4)
    g, steps = 64, 3
    out = generate(tiny, prompts, max_new_tokens=steps, temperature=1.0, seed=5, chat=False,
                   num_samples=g, ignore_eos=True, allowed_tokens=ALLOWED)
    assert out.tokens.shape == (2 * g, steps)
    assert set(out.tokens.ravel().tolist()) <= set(ALLOWED)
    assert len(set(out.tokens[:, 0].tolist())) > 1, "sampling must vary within the set"
    # the unconstrained sampler would leave the set almost always (5 of 256 ids)
    free = generate(tiny, prompts, max_new_tokens=steps, temperature=1.0, seed=5, chat=False,
                    num_samples=g, ignore_eos=True)
    assert not set(free.tokens.ravel().tolist()) <= set(ALLOWED)
    # logprobs: the model's own, over the whole vocabulary (what the RL update scores)
    for row in range(0, 2 * g, 7):
        p = prompts[row // g]
        seq = np.asarray([p + out.tokens[row].tolist()])
        logp = np.asarray(jax.nn.log_softmax(tiny.logits(seq)[0], axis=-1))
        want = [logp[len(p) - 1 + j, out.tokens[row, j]] for j in range(steps)]
        np.testing.assert_allclose(out.logprobs[row], want, atol=1e-5, err_msg=f"row {row}")
        assert (out.logprobs[row] < np.log(0.5)).all()  # not renormalised over the 5 ids


def test_top_k_one_with_allowed_tokens_is_constrained_greedy(tiny):
    prompts = _prompts(3, seed=2)
    greedy = generate(tiny, prompts, max_new_tokens=3, chat=False, ignore_eos=True,
                      allowed_tokens=ALLOWED)
    k1 = generate(tiny, prompts, max_new_tokens=3, temperature=1.0, top_k=1, seed=9,
                  chat=False, ignore_eos=True, allowed_tokens=ALLOWED)
    np.testing.assert_array_equal(k1.tokens, greedy.tokens)
    np.testing.assert_allclose(k1.logprobs, greedy.logprobs, atol=1e-6)


def test_sampled_frequencies_are_the_distribution_renormalised_over_the_allowed_ids():
    probs = np.asarray([0.4, 0.05, 0.25, 0.1, 0.2])
    logits = jnp.log(jnp.asarray([probs], jnp.float32))
    allowed = (1, 3, 4)
    cfg = SamplingConfig(temperature=1.0, allowed_tokens=allowed)
    draw = jax.jit(jax.vmap(lambda k: sampling.sample_token(k, logits, cfg)))
    toks, logp = draw(jax.random.split(jax.random.PRNGKey(0), 20000))
    toks, logp = np.asarray(toks)[:, 0], np.asarray(logp)[:, 0]
    freq = np.bincount(toks, minlength=5) / toks.size
    want = np.where(np.isin(np.arange(5), allowed), probs, 0.0)
    np.testing.assert_allclose(freq, want / want.sum(), atol=0.012)
    np.testing.assert_allclose(logp, np.log(probs)[toks], atol=1e-6)
    tok, lp = sampling.sample_token(None, logits, SamplingConfig(allowed_tokens=allowed))
    assert int(tok[0]) == 4 and float(lp[0]) == pytest.approx(np.log(0.2), abs=1e-6)


def test_empty_or_full_allowed_set_changes_nothing(tiny):
    """``allowed_tokens=()`` is the unconstrained sampler (same config, same compiled program,
    same tokens and logprobs); allowing the whole vocabulary masks nothing either."""
    assert SamplingConfig() == SamplingConfig(allowed_tokens=())
    assert hash(SamplingConfig()) == hash(SamplingConfig(allowed_tokens=()))
    prompts = _prompts(3, seed=7)
    everything = tuple(range(tiny.config.vocab_size))
    for kw in ({}, {"temperature": 0.8, "seed": 3, "num_samples": 4, "top_p": 0.9}):
        base = generate(tiny, prompts, max_new_tokens=5, chat=False, **kw)
        for allowed in ((), everything):
            got = generate(tiny, prompts, max_new_tokens=5, chat=False, allowed_tokens=allowed,
                           **kw)
            np.testing.assert_array_equal(got.tokens, base.tokens, err_msg=str(kw))
            np.testing.assert_array_equal(got.lengths, base.lengths, err_msg=str(kw))
            np.testing.assert_allclose(got.logprobs, base.logprobs, atol=1e-6, err_msg=str(kw))


# ----------------------------------------------------------------------------- 2. parsing

FACT = "Alice has a cat named Tom."
SHOWN = ["Alice likes cats.", "Alice lives in Paris."]


def test_parse_op_choice_words():
    add = parse_op_choice("ADD", FACT, SHOWN)
    assert (add.op, add.valid, add.text, add.id) == (OpCode.ADD, True, FACT, None)
    upd = parse_op_choice("UPDATE", FACT, SHOWN)
    assert (upd.op, upd.valid, upd.id, upd.text, upd.old_memory) == (
        OpCode.UPDATE, True, 0, f"{SHOWN[0]}; {FACT}", SHOWN[0])
    dele = parse_op_choice("DELETE", FACT, SHOWN)
    assert (dele.op, dele.valid, dele.id, dele.text, dele.old_memory) == (
        OpCode.DELETE, True, 0, "", SHOWN[0])
    for text in ("N", "NONE", "none", " None\n", "NONE of these"):
        op = parse_op_choice(text, FACT, SHOWN)
        assert (op.op, op.valid, op.reason) == (OpCode.NOOP, True, Reason.OK), text
    # first tokens / case / surrounding text
    for text, want in (("A", OpCode.ADD), ("add", OpCode.ADD), ("  Add it", OpCode.ADD),
                       ("U", OpCode.UPDATE), ("updated", OpCode.UPDATE),
                       ("D", OpCode.DELETE), ("delete\n[0]", OpCode.DELETE)):
        op = parse_op_choice(text, FACT, SHOWN)
        assert (op.op, op.valid) == (want, True), text
    for text, reason in (("", Reason.EMPTY_OUTPUT), ("  ", Reason.EMPTY_OUTPUT),
                         ("\n\t", Reason.EMPTY_OUTPUT), ("XYZ", Reason.UNKNOWN_EVENT),
                         ("{\"memory\": []}", Reason.UNKNOWN_EVENT)):
        op = parse_op_choice(text, FACT, SHOWN)
        assert (op.op, op.valid, op.reason) == (OpCode.NOOP, False, reason), repr(text)
    assert parse_op_choice(None, FACT, SHOWN).reason == Reason.EMPTY_OUTPUT
    # UPDATE / DELETE need a shown memory (id 0); ADD and NONE do not
    for text in ("UPDATE", "DELETE", "U", "D"):
        op = parse_op_choice(text, FACT, [])
        assert (op.op, op.valid, op.reason) == (OpCode.NOOP, False, Reason.UNKNOWN_ID), text
    assert parse_op_choice("ADD", FACT, []).op == OpCode.ADD
    assert parse_op_choice("N", FACT, []).valid


def test_choice_to_op_matches_the_word_table():
    assert list(OP_CHOICE_WORDS) == ["ADD", "UPDATE", "DELETE", "NONE"]
    for word, op in OP_CHOICE_WORDS.items():
        assert choice_to_op(op, FACT, SHOWN) == parse_op_choice(word, FACT, SHOWN)
    assert choice_to_op(OpCode.ADD, FACT, SHOWN).text == FACT
    assert choice_to_op(OpCode.UPDATE, FACT, ["", "x"]).text.endswith(FACT)
    assert choice_to_op(OpCode.DELETE, FACT, []).reason == Reason.UNKNOWN_ID


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.text(), st.sampled_from(["ADD", "N", "UPDATE", "D", "none"])
                      .flatmap(lambda w: st.text().map(lambda s: w + s))),
       fact=st.text(max_size=20), shown=st.lists(st.text(max_size=20), max_size=3))
def test_parse_op_choice_never_raises(text, fact, shown):
    op = parse_op_choice(text, fact, shown)
    assert isinstance(op, ParsedOp)
    assert op.valid == (op.reason == Reason.OK)
    if not op.valid:
        assert op.op == OpCode.NOOP
        return
    assert op.op in OP_CHOICE_WORDS.values()
    if op.op == OpCode.ADD:
        assert op.text == fact.strip() and op.id is None
    elif op.op in (OpCode.UPDATE, OpCode.DELETE):
        assert shown and op.id == 0 and op.old_memory == shown[0]
        if op.op == OpCode.UPDATE:
            assert op.text == f"{shown[0]}; {fact}".strip()


def test_op_choice_tokens():
    ids = op_choice_tokens(BYTES)
    assert ids == tuple(BYTES(w)[0] for w in OP_CHOICE_WORDS) == (65, 85, 68, 78)
    assert len(set(ids)) == 4
    with pytest.raises(ValueError, match="share a first token"):
        op_choice_tokens(lambda s: [len(s), 1])  # UPDATE / DELETE -> 6
    with pytest.raises(ValueError, match="share a first token"):
        op_choice_tokens(lambda s: [0] + BYTES(s))


def test_op_choice_groups_split_full_banks_from_the_rest():
    from mr1.memory.ops import op_choice_groups
    groups = op_choice_groups(BYTES, [False, True, False, True, True])
    assert [(g.tolist(), t) for g, t in groups] == [([0, 2], (65, 85, 68, 78)),
                                                    ([1, 3, 4], (85, 68, 78))]   # no "A"
    assert [(g.tolist(), t) for g, t in op_choice_groups(BYTES, [False] * 2)] == \
        [([0, 1], (65, 85, 68, 78))]
    assert op_choice_groups(BYTES, []) == []


def test_manager_prompt_forms():
    assert set(PR.MANAGER_PROMPTS) == set(PR.MANAGER_FORMS) == {"json", "line", "op", "json_op",
                                                                 "op_budget", "op_budget_mask"}
    # "json_op" is the paper's JSON prompt; only its reply is forced and constrained
    assert PR.MANAGER_PROMPTS["json_op"] == PR.MANAGER_PROMPTS["json"]
    assert PR.manager_form("json_op").choice and PR.manager_form("op").choice
    assert PR.manager_form("json_op").reply_prefix == '{"memory": [{"event": "'
    assert not PR.manager_form("json").choice and not PR.manager_form("json").reply_prefix
    with pytest.raises(ValueError, match="json_op"):
        PR.manager_form("bogus")
    mems = [(0, "Alice likes cats.")]
    assert PR.memory_manager_prompt("Alice", FACT, mems) == \
        PR.memory_manager_prompt("Alice", FACT, mems, form="json")
    for form in PR.MANAGER_PROMPTS:
        p = PR.memory_manager_prompt("Alice", FACT, mems, form=form, used=1, capacity=32)
        assert FACT in p and "[0] Alice likes cats." in p
        assert ("holds 1 of at most 32 memories" in p) == form.startswith("op_budget")
    assert "one word" in PR.memory_manager_prompt("Alice", FACT, mems, form="op")
    # "op_budget" is "op" plus how full the bank is: it needs both numbers
    assert PR.manager_form("op_budget").choice and not PR.manager_form("op_budget").reply_prefix
    with pytest.raises(ValueError, match="used= and capacity="):
        PR.memory_manager_prompt("Alice", FACT, mems, form="op_budget")
    # "op_budget_mask" is the same prompt; only a full bank's choice differs (no ADD)
    assert PR.MANAGER_PROMPTS["op_budget_mask"] == PR.MANAGER_PROMPTS["op_budget"]
    assert [PR.manager_form(f).mask_full_add for f in ("op_budget", "op_budget_mask")] == \
        [False, True]
    with pytest.raises(ValueError, match="form"):
        PR.memory_manager_prompt("Alice", FACT, mems, form="bogus")


# ----------------------------------------------------------------------------- 3. pipeline

DATES = {1: "1 May 2023", 2: "2 June 2023", 3: "3 July 2023"}
# (session, speaker, fact, the word the stand-in manager answers)
SCRIPT = [(1, "Alice", "Alice likes jazz music.", "ADD"),
          (1, "Alice", "Alice lives in Paris.", "ADD"),
          (1, "Bob", "Bob works as a nurse.", "ADD"),
          (2, "Alice", "Alice likes jazz music.", "N"),            # known: NONE's first token
          (2, "Alice", "Alice likes jazz music a lot.", "UPDATE"),  # merged into [0] (jazz)
          (2, "Bob", "Bob quit his job as a nurse.", "DELETE"),     # clears [0] (nurse)
          (2, "Alice", "Alice has a cat.", "XYZ"),                  # invalid: unknown_event
          (2, "Alice", "Alice reads books.", " "),                  # invalid: empty_output
          (3, "Bob", "Bob likes tea.", "UPDATE"),                   # nothing shown: unknown_id
          (3, "Alice", "Alice lives in Paris.", "none"),
          (3, "Bob", "Bob drinks coffee.", "ADD")]
MERGED = "Alice likes jazz music.; Alice likes jazz music a lot."


def script_conv() -> Conversation:
    sessions = tuple(Session(s, DATES[s], (Turn("Alice", "hi", f"D{s}:1", s, DATES[s]),))
                     for s in (1, 2, 3))
    obs = tuple(Observation(s, spk, fact, (f"D{s}:1",)) for s, spk, fact, _ in SCRIPT)
    return Conversation("conv-op", "Alice", "Bob", sessions, (), obs)


class ScriptedGenerate:
    """Stand-in ``generate``: one scripted word per manager prompt (by the prompt's fact, in
    order); records every call."""

    def __init__(self):
        self.words = collections.defaultdict(list)
        for _, _, fact, word in SCRIPT:
            self.words[fact].append(word)
        self.calls = []

    def __call__(self, policy, prompts, **kw):
        self.calls.append((list(prompts), kw))
        facts = [re.search(r"^New fact: (.*)$", p, re.M).group(1) for p in prompts]
        return types.SimpleNamespace(texts=[self.words[f].pop(0) for f in facts])


@pytest.mark.parametrize("form", ["op", "json_op"])
def test_pipeline_op_form_applies_the_chosen_ops(form):
    """Both choice forms build the same banks from the same words; "json_op" asks with the
    JSON prompt and forces the reply's start."""
    cfg = PipelineConfig(manager="llm", manager_format=form, num_slots=8, max_len=64,
                         retrieve_k=2, batch_size=2)
    gen = ScriptedGenerate()
    policy = types.SimpleNamespace(tokenizer=None, pad_token_id=0)  # bytes tokenizer
    mem = MemoryBuilder(cfg, EMB, policy=policy, generate_fn=gen).build(script_conv())

    allowed = op_choice_tokens(BYTES)
    forced = {"reply_prefix": '{"memory": [{"event": "'} if form == "json_op" else {}
    assert all(kw == {"max_new_tokens": 1, "temperature": 0.0, "allowed_tokens": allowed,
                      **forced} for _, kw in gen.calls), gen.calls
    assert [len(p) for p, _ in gen.calls] == [2, 1, 2, 2, 1, 2, 1]  # batch_size chunks
    prompts = [p for ps, _ in gen.calls for p in ps]
    ask = "Reply with one word" if form == "op" else "Reply with JSON only"
    assert len(prompts) == len(SCRIPT) and all(ask in p for p in prompts)
    assert not any(gen.words.values()), "every scripted word was asked for"
    # the UPDATE prompt shows the jazz memory first: the merge target is the most similar one
    upd = next(p for p in prompts if "New fact: Alice likes jazz music a lot." in p)
    assert "[0] Alice likes jazz music.\n[1] Alice lives in Paris." in upd

    alice, bob = mem.speakers
    assert [(t, ts) for _, t, ts in alice.items()] == [(MERGED, DATES[2]),
                                                       ("Alice lives in Paris.", DATES[1])]
    assert [(t, ts) for _, t, ts in bob.items()] == [("Bob drinks coffee.", DATES[3])]
    slot = alice.items()[0][0]
    n = len(BYTES(MERGED))
    np.testing.assert_array_equal(np.asarray(alice.bank.tokens)[slot, :n], BYTES(MERGED))
    assert int(alice.bank.lengths[slot]) == n
    np.testing.assert_allclose(np.asarray(alice.bank.embeddings)[slot], EMB.encode([MERGED])[0],
                               atol=1e-6)
    assert int(np.asarray(alice.bank.valid).sum()) == 2 and int(np.asarray(bob.bank.valid).sum()) == 1

    s = mem.stats
    assert (s.facts, s.manager_calls, s.skipped_facts) == (11, 11, 0)
    # invalid choices are applied as NOOPs (and counted under ops too)
    assert s.ops == collections.Counter({"ADD": 4, "UPDATE": 1, "DELETE": 1, "NOOP": 5})
    assert s.invalid == collections.Counter({"unknown_event": 1, "empty_output": 1,
                                             "unknown_id": 1})
    assert not s.refused and s.num_invalid == 3


def test_pipeline_config_validates_manager_format():
    for form in ("json", "line", "op", "json_op"):
        assert PipelineConfig(manager_format=form).manager_format == form
    with pytest.raises(ValueError, match="manager_format"):
        PipelineConfig(manager_format="bogus")
    with pytest.raises(ValueError, match="manager_format"):
        PipelineConfig.from_mapping({"manager_format": "OP"})
    assert PipelineConfig.from_mapping({"manager_format": "op", "x": 1}).manager_format == "op"


@pytest.mark.parametrize("form", ["op", "json_op"])
def test_pipeline_op_form_end_to_end_with_the_constrained_sampler(smol, form):
    """The real ``generate`` on the random ``tiny-smollm2``: every manager output is one of the
    op words' first tokens, so nothing is malformed (only UPDATE/DELETE of an empty bank can be
    invalid)."""
    outputs = []

    def gen(policy, prompts, **kw):
        out = sampling.generate(policy, prompts, **kw)
        assert out.tokens.shape[1] == 1 and (out.lengths == 1).all()
        outputs.extend(out.texts)
        return out

    cfg = PipelineConfig(manager="llm", manager_format=form, num_slots=16, max_len=32,
                         retrieve_k=2, batch_size=16)
    mem = MemoryBuilder(cfg, EMB, policy=smol, generate_fn=gen).build(script_conv())
    words = {smol.tokenizer.decode([t]) for t in op_choice_tokens(make_tokenize(smol))}
    assert words == {"ADD", "UPDATE", "DELETE", "N"}
    assert len(outputs) == len(SCRIPT) and set(outputs) <= words
    assert set(mem.stats.invalid) <= {"unknown_id"} and not mem.stats.refused
    assert sum(mem.stats.ops.values()) == len(SCRIPT)


# ----------------------------------------------------------------------------- 4. ManagerTask

CFG_OP = dataclasses.replace(TM.CFG, manager_format="op")


@pytest.fixture(scope="module")
def conv():
    return TM.make_conv()


@pytest.fixture(scope="module")
def json_data(conv, smol):
    return MT.build_manager_data([(conv, conv.qas)], TM.CFG, EMB, make_tokenize(smol),
                                 pad_id=smol.pad_token_id)


@pytest.fixture(scope="module")
def op_data(conv, smol):
    return MT.build_manager_data([(conv, conv.qas)], CFG_OP, EMB, make_tokenize(smol),
                                 pad_id=smol.pad_token_id)


def op_task(data, policy, invalid_penalty=0.0, agent=None):
    return MT.ManagerTask(data, data, policy, EMB, CFG_OP, {"em": 1.0}, invalid_penalty,
                          reply_max_new_tokens=8, answer_top_k=8, answer_fn=agent or TM.CatAgent())


def test_op_task_samples_and_prompts(op_data, json_data, smol):
    assert op_data.samples == json_data.samples
    mem = op_data.memories[TM.CONV_ID]
    for s, p in zip(op_data.samples, op_data.prompts, strict=True):
        m = mem.speakers[s.speaker]
        assert p == PR.memory_manager_prompt(
            m.name, s.fact, [(d, m.texts[slot]) for d, slot in enumerate(s.shown)], form="op")
    task = op_task(op_data, smol)
    assert len(task.allowed_tokens) == 4 and len(set(task.allowed_tokens)) == 4
    assert task.allowed_tokens == op_choice_tokens(make_tokenize(smol))
    assert task.max_new_tokens == 1
    # each allowed token decodes to a prefix of its word that parses back to that op
    s = op_data.samples[TM.TOM]
    for tok, op in zip(task.allowed_tokens, OP_CHOICE_WORDS.values(), strict=True):
        text = smol.tokenizer.decode([tok])
        assert MT.output_op(text, s, mem, "op").op == op, text
    json_task = TM.make_task(json_data, smol)
    assert json_task.allowed_tokens == () and json_task.max_new_tokens == 8


def _score(task, data, idx, texts, agent):
    out = task.score_outputs(data, [idx], texts, group=len(texts))
    return out, sorted(p for call in agent.calls for p in call)


def test_op_outputs_earn_what_the_equivalent_json_outputs_earn(op_data, json_data, smol):
    """The cat case of test_memory_task: ADD and UPDATE (merged into memory [0]) put Tom in
    memory (1), NONE and DELETE do not (0), an unknown word is invalid (0, or -penalty)."""
    s = op_data.samples[TM.TOM]
    assert s.fact == TM.TOM_FACT and len(s.shown) == 2
    shown0 = op_data.memories[TM.CONV_ID].speakers[0].texts[s.shown[0]]
    pairs = [("ADD", TM.op_json("ADD", "0", TM.TOM_FACT)),
             ("N", TM.op_json("NONE")),
             ("DELETE", TM.op_json("DELETE", "0")),
             ("UPDATE", TM.op_json("UPDATE", "0", f"{shown0}; {TM.TOM_FACT}")),
             ("XYZ", '{"memory": [{"id": "0", "text": "Alice has'),
             ("NONE", TM.op_json("NONE")),
             ("", "")]
    agents = TM.CatAgent(), TM.CatAgent()
    got, got_prompts = _score(op_task(op_data, smol, agent=agents[0]), op_data, TM.TOM,
                              [o for o, _ in pairs], agents[0])
    want, want_prompts = _score(TM.make_task(json_data, smol, agent=agents[1]), json_data,
                                TM.TOM, [j for _, j in pairs], agents[1])
    np.testing.assert_array_equal(got["reward"], [1, 0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(got["op"], [int(OpCode.ADD), int(OpCode.NOOP),
                                              int(OpCode.DELETE), int(OpCode.UPDATE),
                                              int(OpCode.NOOP), int(OpCode.NOOP),
                                              int(OpCode.NOOP)])
    np.testing.assert_array_equal(got["invalid"], [0, 0, 0, 0, 1, 0, 1])
    for key in ("reward", "op", "invalid", "em", "f1", "bleu1", "num_answer_prompts"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert got_prompts == want_prompts  # the same banks reached the Answer Agent

    out = op_task(op_data, smol, invalid_penalty=0.5).score_outputs(
        op_data, [TM.TOM], ["XYZ", "ADD", "N", "  "], group=4)
    np.testing.assert_array_equal(out["reward"], [-0.5, 1.0, 0.0, -0.5])


def test_op_form_targets_only_memory_zero(op_data, json_data, smol):
    """The Rex fact (linked to "What is Alice's cat called?") is shown the jazz memory first and
    the Tom memory second: the one-word DELETE / UPDATE act on memory [0] (jazz), so Tom stays
    and every op earns 1 -- exactly as the JSON ops on id 0 do; the JSON DELETE of id 1 (Tom),
    which the op form cannot express, earns 0."""
    s = op_data.samples[TM.REX]
    texts_ = op_data.memories[TM.CONV_ID].speakers[0].texts
    assert s.shown == (0, 3) and "Tom" in texts_[3] and "Tom" not in texts_[0]
    pairs = [("NONE", TM.op_json("NONE")), ("DELETE", TM.op_json("DELETE", "0")),
             ("UPDATE", TM.op_json("UPDATE", "0", f"{texts_[0]}; {s.fact}")),
             ("ADD", TM.op_json("ADD", "0", s.fact)), ("D", TM.op_json("DELETE", "0"))]
    out = op_task(op_data, smol).score_outputs(op_data, [TM.REX], [o for o, _ in pairs],
                                                group=len(pairs))
    ref = TM.make_task(json_data, smol).score_outputs(
        json_data, [TM.REX], [j for _, j in pairs] + [TM.op_json("DELETE", "1")],
        group=len(pairs) + 1)
    np.testing.assert_array_equal(out["reward"], [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(out["op"], [0, 3, 2, 1, 3])
    assert not out["invalid"].any()
    for key in ("reward", "op", "invalid", "f1"):
        np.testing.assert_array_equal(out[key], ref[key][:-1], err_msg=key)
    assert ref["reward"][-1] == 0.0
    # nothing shown: UPDATE / DELETE are invalid NOOPs; ADD is fine
    first = op_data.samples[0]
    assert first.shown == ()
    out = op_task(op_data, smol).score_outputs(op_data, [0], ["UPDATE", "DELETE", "ADD"], group=3)
    np.testing.assert_array_equal(out["invalid"], [1, 1, 0])
    np.testing.assert_array_equal(out["op"], [0, 0, 1])


def test_op_form_rollout_samples_op_words_with_full_vocabulary_logprobs(op_data, smol):
    task = op_task(op_data, smol)
    idx = np.asarray([TM.TOM, TM.REX])
    g = 8
    cfg = SamplingConfig(max_new_tokens=task.max_new_tokens, temperature=1.0, num_samples=g,
                         allowed_tokens=task.allowed_tokens)
    arrays, metrics = task.rollout(smol, smol.params, idx, jax.random.PRNGKey(3), cfg)
    tokens = arrays["tokens"]
    assert tokens.shape == (2 * g, 1) and set(tokens.ravel().tolist()) <= set(task.allowed_tokens)
    assert len(set(tokens.ravel().tolist())) > 1
    np.testing.assert_array_equal(arrays["completion_mask"], np.ones((2 * g, 1)))
    logits = smol.logits(task.train_ids[idx], task.train_mask[idx])[:, -1]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    want = logp[np.repeat(np.arange(2), g), tokens[:, 0]]
    np.testing.assert_allclose(arrays["old_logp"][:, 0], want, atol=1e-5)
    texts = sampling.decode(smol, tokens, np.ones(2 * g, np.int32))
    again = task.score_outputs(op_data, idx, texts, g)
    np.testing.assert_array_equal(arrays["rewards"], again["reward"])
    assert metrics["invalid_frac"] == 0.0  # both samples show memories: every word is valid
    # greedy validation: the allowed id with the highest logit
    greedy = SamplingConfig(max_new_tokens=task.max_new_tokens,
                            allowed_tokens=task.allowed_tokens)
    val = task.validate(smol, smol.params, greedy)
    assert 0.0 <= val["val_f1"] <= 100.0 and val["val_invalid"] <= 1.0
    best = np.asarray(task.allowed_tokens)[np.argmax(logits[:, list(task.allowed_tokens)],
                                                     axis=-1)]
    tok, _, _ = sampling.sample_padded(smol, task.train_ids[idx], task.train_mask[idx],
                                       jax.random.PRNGKey(0), greedy)
    np.testing.assert_array_equal(tok[:, 0], best)


# ----------------------------------------------------------------------------- 5. "json_op"

CFG_JSON_OP = dataclasses.replace(TM.CFG, manager_format="json_op")


def test_reply_prefix_is_appended_after_the_chat_template(smol):
    prefix = PR.JSON_EVENT_PREFIX
    plain = sampling.encode_prompts(smol, ["Hi there", "Bye"], chat=True)
    forced = sampling.encode_prompts(smol, ["Hi there", "Bye"], chat=True, reply_prefix=prefix)
    tail = smol.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    assert len(tail) > 3
    assert forced == [p + list(tail) for p in plain]
    # generate(reply_prefix=) continues the forced text: the same as passing those ids
    allowed = op_choice_tokens(make_tokenize(smol))
    a = generate(smol, ["Hi there", "Bye"], max_new_tokens=1, allowed_tokens=allowed,
                 reply_prefix=prefix)
    b = generate(smol, forced, max_new_tokens=1, allowed_tokens=allowed)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.texts == b.texts and set(a.texts) <= {"ADD", "UPDATE", "DELETE", "N"}
    c = generate(smol, ["Hi there", "Bye"], max_new_tokens=1, allowed_tokens=allowed)
    np.testing.assert_array_equal(c.tokens, generate(smol, plain, max_new_tokens=1,
                                                     allowed_tokens=allowed).tokens)


@pytest.fixture(scope="module")
def json_op_data(conv, smol):
    return MT.build_manager_data([(conv, conv.qas)], CFG_JSON_OP, EMB, make_tokenize(smol),
                                 pad_id=smol.pad_token_id)


def test_json_op_task_forces_the_reply_and_scores_like_the_op_form(json_op_data, op_data,
                                                                     json_data, smol):
    """The JSON prompt (as the "json" form's) with the forced reply start as the last prompt
    tokens, one constrained word per output, and the op form's rewards for the same words."""
    assert json_op_data.samples == op_data.samples
    assert json_op_data.prompts == json_data.prompts
    task = MT.ManagerTask(json_op_data, json_op_data, smol, EMB, CFG_JSON_OP, {"em": 1.0}, 0.0,
                          reply_max_new_tokens=8, answer_top_k=8, answer_fn=TM.CatAgent())
    assert task.max_new_tokens == 1
    assert task.allowed_tokens == op_choice_tokens(make_tokenize(smol))
    tail = list(smol.tokenizer(PR.JSON_EVENT_PREFIX, add_special_tokens=False)["input_ids"])
    json_task = TM.make_task(json_data, smol)
    for row, ref, m, m_ref in zip(task.train_ids, json_task.train_ids, task.train_mask,
                                  json_task.train_mask):
        ids, ref_ids = row[m.astype(bool)].tolist(), ref[m_ref.astype(bool)].tolist()
        assert ids == ref_ids + tail
    words = ["ADD", "N", "DELETE", "UPDATE", "XYZ", ""]
    got = task.score_outputs(json_op_data, [TM.TOM], words, group=len(words))
    want = op_task(op_data, smol).score_outputs(op_data, [TM.TOM], words, group=len(words))
    np.testing.assert_array_equal(got["reward"], [1, 0, 0, 1, 0, 0])
    for key in ("reward", "op", "invalid", "em", "f1"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_memory_dirs_of_different_manager_forms_do_not_mix(tmp_path):
    """Banks of the same manager checkpoint in another reply form are another identity: a
    memory dir built in one form refuses to resume in another (JSON identities as before)."""
    from mr1.agents.pipeline import claim_memory_dir, manager_identity

    def config(manager, form):
        return ml_collections.ConfigDict({"model": "smollm2-135m-instruct", "memory": {
            "manager": manager, "manager_format": form, "manager_checkpoint": "runs/m/best",
            "facts": "observations"}})

    ids = {f: manager_identity(config("llm", f)) for f in ("json", "op", "json_op")}
    assert "manager_format" not in ids["json"]
    assert ids["op"]["manager_format"] == "op" and ids["json_op"]["manager_format"] == "json_op"
    assert "manager_format" not in manager_identity(config("add_all", "json_op"))
    assert not claim_memory_dir(tmp_path, ids["json_op"])
    assert claim_memory_dir(tmp_path, ids["json_op"])
    for other in ("op", "json"):
        with pytest.raises(ValueError, match="pick another"):
            claim_memory_dir(tmp_path, ids[other])


def test_build_stats_roundtrip_keeps_invalid_counts():
    s = BuildStats(facts=2, manager_calls=2)
    s.invalid[Reason.UNKNOWN_EVENT.value] += 1
    assert BuildStats.from_dict(s.to_dict()).invalid == s.invalid


def test_allowed_tokens_are_checked_and_normalised():
    """Ids outside the vocabulary raise (they would silently give token 0); a list becomes a
    sorted, duplicate-free, hashable tuple (the config is the sampler's cache key)."""
    import jax

    from mr1.models import load_policy
    from mr1.sampling import SamplingConfig, sample_padded

    cfg = SamplingConfig(allowed_tokens=[5, 3, 5])
    assert cfg.allowed_tokens == (3, 5)
    assert cfg == SamplingConfig(allowed_tokens=(3, 5)) and hash(cfg) == hash(SamplingConfig(allowed_tokens=(5, 3)))
    policy = load_policy("tiny")
    ids = np.ones((1, 4), np.int32)
    for bad in ((300,), (-1,), (5, 256)):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            sample_padded(policy, ids, ids, jax.random.PRNGKey(0), SamplingConfig(allowed_tokens=bad))
