"""mr1.memory.ops: parsing Memory Manager outputs; fuzzing shows nothing escapes and every
invalid case is counted."""

import json

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mr1.memory import bank as mb
from mr1.memory.ops import EVENTS, ParsedOp, ParseResult, Reason, ops_to_actions, parse_ops

OpCode = mb.OpCode
VALID_IDS = [0, 1, 2, 5]


def summary(r: ParseResult):
    return [(o.op, o.id, o.text, o.valid, o.reason) for o in r.ops]


@pytest.mark.parametrize("text, want", [
    ("UPDATE 2: Melanie now paints lakes", [(OpCode.UPDATE, 2, "Melanie now paints lakes")]),
    ("ADD: Caroline adopted a dog", [(OpCode.ADD, None, "Caroline adopted a dog")]),
    ("DELETE 5", [(OpCode.DELETE, 5, "")]),
    ("NOOP", [(OpCode.NOOP, None, "")]),
    ("Reasoning first.\n- DELETE [1]\n- ADD: new fact\nDone.",
     [(OpCode.DELETE, 1, ""), (OpCode.ADD, None, "new fact")]),
    ('{"memory": [{"id": "0", "text": "a", "event": "NONE"}, '
     '{"id": "2", "text": "b b", "event": "UPDATE", "old_memory": "b"}]}',
     [(OpCode.NOOP, None, ""), (OpCode.UPDATE, 2, "b b")]),
    ('Here you go:\n```json\n{"memory": [{"id": "7", "text": "new", "event": "add"}]}\n```\nok',
     [(OpCode.ADD, None, "new")]),
    ('{"memory": [{"id": 1, "event": "DELETE"}]} and more prose {',
     [(OpCode.DELETE, 1, "")]),
    ('[{"id": "5", "text": "x", "event": "Update"}]', [(OpCode.UPDATE, 5, "x")]),
    ('{"memory": []}', [(OpCode.NOOP, None, "")]),
])
def test_valid_outputs(text, want):
    r = parse_ops(text, VALID_IDS)
    assert r.num_invalid == 0
    assert [(o.op, o.id, o.text) for o in r.ops] == want


@pytest.mark.parametrize("text, reasons", [
    ("", [Reason.EMPTY_OUTPUT]),
    ("   \n", [Reason.EMPTY_OUTPUT]),
    ("I think nothing should change.", [Reason.NO_OPERATION]),
    ('{"memory": [{"id": "1", "event": "UPDATE", "text": "x"', [Reason.BROKEN_JSON]),
    ('{"memory": [{"id": "1", "event": "MERGE", "text": "x"}]}', [Reason.UNKNOWN_EVENT]),
    ('{"memory": [{"id": "9", "event": "DELETE"}]}', [Reason.UNKNOWN_ID]),
    ('{"memory": [{"event": "UPDATE", "text": "x"}]}', [Reason.MISSING_ID]),
    ('{"memory": [{"id": "three", "event": "UPDATE", "text": "x"}]}', [Reason.BAD_ID]),
    ('{"memory": [{"id": "1", "event": "UPDATE", "text": "  "}]}', [Reason.EMPTY_TEXT]),
    ('{"memory": [{"id": "1", "event": "ADD", "text": ""}]}', [Reason.EMPTY_TEXT]),
    ('{"memory": [3, {"id": "1", "event": "ADD", "text": {"a": 1}}]}',
     [Reason.BAD_STRUCTURE, Reason.BAD_STRUCTURE]),
    ("UPDATE 9: text", [Reason.UNKNOWN_ID]),
    ("UPDATE 1:", [Reason.EMPTY_TEXT]),
    ("ADD:", [Reason.EMPTY_TEXT]),
    ("DELETE", [Reason.MISSING_ID]),
    ("DELETE it", [Reason.BAD_ID]),
    ("DELETE \u0663", [Reason.BAD_ID]),  # Arabic-Indic three: ids are ASCII integers
    ('{"memory": [{"id": "\u0663", "event": "DELETE"}]}', [Reason.BAD_ID]),
    ('{"memory": [{"id": "12345678901", "event": "DELETE"}]}', [Reason.UNKNOWN_ID]),
    ('{"memory": [{"id": 1.5, "event": "DELETE"}]}', [Reason.BAD_ID]),
    ('{"memory": [{"id": true, "event": "DELETE"}]}', [Reason.BAD_ID]),
    ("[" * 5000, [Reason.BROKEN_JSON]),
    ("[" * 200000 + "]" * 200000, [Reason.BROKEN_JSON]),
])
def test_invalid_outputs_become_counted_noops(text, reasons):
    r = parse_ops(text, VALID_IDS)
    assert r.reasons == reasons and r.num_invalid == len(reasons)
    assert all(o.op == OpCode.NOOP for o in r.ops if not o.valid)


def test_mixed_valid_and_invalid_entries():
    text = json.dumps({"memory": [
        {"id": "0", "text": "keep", "event": "NONE"},
        {"id": "1", "text": "merged", "event": "UPDATE"},
        {"id": "42", "text": "", "event": "DELETE"},
        {"id": "x", "text": "new", "event": "ADD"},  # ADD ignores its id
        {"id": "2", "text": "z", "event": "REPLACE"},
    ]})
    r = parse_ops(text, VALID_IDS)
    assert [o.op for o in r.ops] == [OpCode.NOOP, OpCode.UPDATE, OpCode.NOOP, OpCode.ADD,
                                     OpCode.NOOP]
    assert r.num_invalid == 2 and r.reasons == [Reason.UNKNOWN_ID, Reason.UNKNOWN_EVENT]


def test_ids_unchecked_when_not_given():
    assert parse_ops("DELETE 99").num_invalid == 0
    assert parse_ops("DELETE 99", valid_ids=[]).reasons == [Reason.UNKNOWN_ID]


# ----------------------------------------------------------------------------- fuzzing

def check_invariants(r: ParseResult):
    assert isinstance(r, ParseResult) and len(r.ops) >= 1
    assert r.num_invalid == sum(not o.valid for o in r.ops) == len(r.reasons)
    for o in r.ops:
        assert isinstance(o, ParsedOp) and isinstance(o.reason, Reason)
        if not o.valid:
            assert o.op == OpCode.NOOP and o.reason != Reason.OK
        else:
            assert o.reason == Reason.OK
            if o.op in (OpCode.UPDATE, OpCode.DELETE):
                assert o.id in VALID_IDS
            if o.op in (OpCode.ADD, OpCode.UPDATE):
                assert o.text.strip() == o.text and o.text


FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OP_ALPHABET = st.sampled_from(list("{}[]\":,` \n0123456789") + ["ADD", "UPDATE", "DELETE", "NOOP",
                                                              "NONE", "memory", "event", "id",
                                                              "text", "```json"])


@FUZZ
@given(st.text())
def test_fuzz_arbitrary_text(text):
    check_invariants(parse_ops(text, VALID_IDS))


@FUZZ
@given(st.lists(OP_ALPHABET, max_size=60).map("".join))
def test_fuzz_op_token_soup(text):
    check_invariants(parse_ops(text, VALID_IDS))


EVENT_ST = st.one_of(st.sampled_from(list(EVENTS) + ["add", "Update", "delete ", "MERGE", ""]),
                     st.text(max_size=6), st.integers(), st.none())
ID_ST = st.one_of(st.integers(-2, 8), st.integers(-2, 8).map(str),
                  st.sampled_from(["[#3", " ( 1 ) ", "\u0663", "-0", "--1", "1e0", "１"]),
                  st.integers(-2, 8).map(lambda i: f"[{i}]"), st.text(max_size=4), st.none(),
                  st.floats(allow_nan=False), st.booleans(), st.lists(st.integers(), max_size=2))
TEXT_ST = st.one_of(st.text(max_size=20), st.just(""), st.just("  "), st.integers(), st.none(),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
ENTRY_ST = st.one_of(
    st.fixed_dictionaries({"id": ID_ST, "text": TEXT_ST, "event": EVENT_ST},
                          optional={"old_memory": st.one_of(st.text(max_size=10), st.none())}),
    st.integers(), st.text(max_size=5), st.none())


def oracle(entry) -> Reason:
    """Independent statement of which entries are valid."""
    if not isinstance(entry, dict):
        return Reason.BAD_STRUCTURE
    ev = entry.get("event")
    op = EVENTS.get(ev.strip().upper()) if isinstance(ev, str) else None
    if op is None:
        return Reason.UNKNOWN_EVENT
    text = entry.get("text")
    text = "" if text is None else text
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str) or not isinstance(entry.get("old_memory", "") or "", str):
        return Reason.BAD_STRUCTURE
    if op in (OpCode.UPDATE, OpCode.DELETE):
        raw = entry.get("id")
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return Reason.MISSING_ID
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            return Reason.BAD_ID
        if isinstance(raw, float):
            if not raw.is_integer():
                return Reason.BAD_ID
            raw = int(raw)
        if isinstance(raw, str):
            digits = raw.strip().strip("[]#()").strip()
            unsigned = digits[1:] if digits.startswith("-") else digits
            if not (unsigned.isascii() and unsigned.isdigit()):
                return Reason.BAD_ID
            raw = int(digits)
        if raw not in VALID_IDS:
            return Reason.UNKNOWN_ID
    if op in (OpCode.ADD, OpCode.UPDATE) and not text.strip():
        return Reason.EMPTY_TEXT
    return Reason.OK


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(ENTRY_ST, min_size=1, max_size=5),
       wrap=st.sampled_from(["bare", "fence", "prose", "list"]))
def test_fuzz_structured_json_matches_oracle(entries, wrap):
    body = json.dumps(entries if wrap == "list" else {"memory": entries})
    text = {"bare": body, "list": body, "fence": f"Sure:\n```json\n{body}\n```",
            "prose": f"Let me think. The fact is new.\n{body}\nThat is all."}[wrap]
    r = parse_ops(text, VALID_IDS)
    check_invariants(r)
    if wrap == "list" and not all(isinstance(e, dict) and "event" in e for e in entries):
        return  # not an op list: the parser falls back, checked by the invariants only
    want = [oracle(e) for e in entries]
    assert r.form == "json"
    assert [o.reason for o in r.ops] == want
    assert r.num_invalid == sum(w != Reason.OK for w in want)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(ENTRY_ST, min_size=1, max_size=4), cut=st.floats(0, 1),
       junk=st.text(max_size=5))
def test_fuzz_near_valid_json_mutations(entries, cut, junk):
    body = json.dumps({"memory": entries})
    i = int(cut * len(body))
    for text in (body[:i], body[:i] + junk + body[i:], body.replace('"', "'"),
                 body.replace(":", "", 1), "```json\n" + body[:i]):
        check_invariants(parse_ops(text, VALID_IDS))


# ----------------------------------------------------------------------------- to actions

def test_ops_to_actions_builds_bank_actions_and_applies():
    tokenize = lambda s: [ord(c) % 97 + 1 for c in s]  # noqa: E731
    embed = lambda texts: np.eye(4, dtype=np.float32)[[len(t) % 4 for t in texts]]  # noqa: E731
    r = parse_ops('{"memory": [{"id": "0", "text": "abcdefgh", "event": "ADD"},'
                  '{"id": "0", "text": "zz", "event": "UPDATE"},'
                  '{"id": "3", "event": "DELETE"}]}', valid_ids=[0, 1])
    a = ops_to_actions(r, tokenize, max_len=4, dim=4, num_ops=4, embed=embed, speaker=1, pad_id=0,
                       id_to_slot={0: 2, 1: 3})
    assert a.op.tolist() == [OpCode.ADD, OpCode.UPDATE, OpCode.NOOP, OpCode.NOOP]
    # length keeps the untruncated count (8 > max_len 4): the bank reports the truncation
    assert a.target.tolist() == [-1, 2, -1, -1] and a.length.tolist() == [8, 2, 0, 0]
    assert a.tokens[0].tolist() == tokenize("abcd") and a.tokens[1].tolist()[2:] == [0, 0]
    np.testing.assert_array_equal(a.embedding[1], [0, 0, 1, 0])
    bank = mb.empty_bank(4, 4, 4)
    bank, _ = mb.apply_action(bank, mb.make_action(OpCode.ADD, tokens=[1], embedding=[1, 0, 0, 0],
                                                   max_len=4, dim=4))
    bank, _ = mb.apply_action(bank, mb.make_action(OpCode.ADD, tokens=[2], embedding=[1, 0, 0, 0],
                                                   max_len=4, dim=4))
    bank, _ = mb.apply_action(bank, mb.make_action(OpCode.ADD, tokens=[3], embedding=[1, 0, 0, 0],
                                                   max_len=4, dim=4))
    bank, res = jax.jit(mb.apply_actions)(bank, a)
    assert res.applied.tolist() == [True, True, False, False]
    assert res.truncated.tolist() == [True, False, False, False]
    assert res.slot.tolist() == [3, 2, -1, -1] and int(bank.lengths[3]) == 4
    assert bank.tokens[2].tolist() == tokenize("zz") + [0, 0] and int(bank.speaker[3]) == 1


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_ops_to_actions_shapes(text):
    r = parse_ops(text, VALID_IDS)
    a = ops_to_actions(r, lambda s: [len(s)] * len(s), max_len=3, dim=2, num_ops=2)
    assert a.op.shape == (2,) and a.tokens.shape == (2, 3) and a.embedding.shape == (2, 2)
    assert (a.length >= 0).all()   # untruncated counts; only the tokens are cut to max_len
    texts = [o.text if o.valid and o.op in (OpCode.ADD, OpCode.UPDATE) else "" for o in r.ops[:2]]
    assert a.length.tolist()[: len(texts)] == [len(t) for t in texts]
    kept = r.ops[:2]
    assert [int(x) for x in a.op[: len(kept)]] == [int(o.op) for o in kept]
