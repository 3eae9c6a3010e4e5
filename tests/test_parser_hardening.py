"""Issue 21: the Memory Manager / Answer Agent parsers against what a sampled reply can hold
(huge ids, quoted examples, thousands of ops, one bad field, long runs of spaces), and the
judge's URL redaction."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mr1.agents.answer import _markers, _strip_markers, parse_answer
from mr1.memory import bank as mb
from mr1.memory.ops import (MAX_OPS_PER_REPLY, Reason, ops_to_actions, parse_ops)

OpCode = mb.OpCode
TOKENIZE = lambda s: [ord(c) % 50 + 1 for c in s]  # noqa: E731


# ------------------------------------------------------------------ ids out of range


@pytest.mark.parametrize("text", ["DELETE 99999999999", "UPDATE 99999999999: x",
                                  '{"id": 99999999999, "event": "DELETE"}',
                                  '{"id": -99999999999, "event": "DELETE"}',
                                  '{"id": 1e300, "event": "DELETE"}', "DELETE -3"])
def test_ids_out_of_range_become_refused_targets(text):
    a = ops_to_actions(parse_ops(text, valid_ids=None), TOKENIZE, max_len=4, dim=2)
    assert a.target.dtype == np.int32 and a.target.tolist() == [-1]
    bank = mb.empty_bank(4, 4, 2)
    _, res = mb.apply_actions(bank, a)      # the bank refuses it; nothing raises
    assert not bool(res.applied[0])


def test_id_mapping_to_a_huge_slot_never_overflows():
    a = ops_to_actions(parse_ops("DELETE 1"), TOKENIZE, max_len=4, dim=2,
                       id_to_slot={1: 2**40})
    assert a.target.tolist() == [-1]


ID_ST = st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                  st.text(max_size=30), st.booleans(), st.none(),
                  st.integers().map(str), st.integers(min_value=10**15).map(lambda i: f"[{i}]"))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(st.fixed_dictionaries({
    "id": ID_ST, "event": st.sampled_from(["ADD", "UPDATE", "DELETE", "NONE", "MERGE"]),
    "text": st.one_of(st.text(max_size=8), st.integers())}), min_size=1, max_size=6),
    valid=st.one_of(st.none(), st.lists(st.integers(), max_size=4)),
    mapping=st.one_of(st.none(), st.dictionaries(st.integers(), st.integers(), max_size=4)),
    num_ops=st.one_of(st.none(), st.integers(1, 8)), plain=st.booleans())
def test_fuzz_ops_to_actions_unconstrained_ids(entries, valid, mapping, num_ops, plain):
    """Any id (huge, negative, float, text) in either form: ops_to_actions never raises, its
    targets are int32 in [-1, 2**31 - 1], a valid UPDATE/DELETE points where the mapping
    (or the identity) says when that fits in int32, and the bank applies the batch."""
    if plain:
        text = "\n".join(f"{e['event']} {e['id']}: {e['text']}" for e in entries)
    else:
        text = json.dumps({"memory": entries})
    r = parse_ops(text, valid_ids=valid)
    a = ops_to_actions(r, TOKENIZE, max_len=4, dim=2, num_ops=num_ops, id_to_slot=mapping)
    n = num_ops or max(1, len(r.ops))
    assert a.target.shape == (n,) and a.target.dtype == np.int32
    assert ((a.target >= -1)).all()
    for i, o in enumerate(r.ops[:n]):
        if o.valid and o.id is not None:
            want = o.id if mapping is None else mapping.get(o.id, -1)
            assert int(a.target[i]) == (want if 0 <= want < 2**31 else -1)
    bank = mb.empty_bank(4, 4, 2)
    mb.apply_actions(bank, a)


# ------------------------------------------------------------------ containers and caps


def test_last_complete_container_wins_over_quoted_prose():
    text = ('The instructions show an example like {"memory": [{"id": "0", "event": "DELETE"}]}'
            ' but here the fact is new, so:\n```json\n{"memory": [{"id": "1", "text": '
            '"Ann moved to Rome", "event": "ADD"}]}\n```')
    r = parse_ops(text, valid_ids=[0, 1])
    assert [(o.op, o.text) for o in r.ops] == [(OpCode.ADD, "Ann moved to Rome")]
    # entries nested inside the real container are not containers of their own
    nested = '{"memory": [{"id": "0", "event": "DELETE"}, {"id": "1", "event": "NONE"}]}'
    assert [o.op for o in parse_ops(nested, [0, 1]).ops] == [OpCode.DELETE, OpCode.NOOP]
    # an incomplete container at the end (cut by the token budget) is not complete
    cut = '{"event": "DELETE", "id": 1} then {"memory": [{"id": "0", "event": "DEL'
    assert [(o.op, o.id) for o in parse_ops(cut, [0, 1]).ops] == [(OpCode.DELETE, 1)]


@pytest.mark.parametrize("form", ["json", "plain"])
def test_ops_per_reply_are_capped_and_counted(form):
    n = 2001
    if form == "json":
        text = json.dumps({"memory": [{"event": "ADD", "text": f"f{i}"} for i in range(n)]})
    else:
        text = "\n".join(f"ADD: f{i}" for i in range(n))
    r = parse_ops(text)
    assert len(r.ops) == MAX_OPS_PER_REPLY and r.dropped == n - MAX_OPS_PER_REPLY
    assert r.reasons.count(Reason.TOO_MANY_OPS) == n - MAX_OPS_PER_REPLY
    assert r.num_invalid == n - MAX_OPS_PER_REPLY and len(r.valid_ops) == MAX_OPS_PER_REPLY


def test_a_bad_field_invalidates_only_its_op():
    """A 5,000-digit id made int() raise, and the whole reply became one BROKEN_JSON NOOP."""
    entries = [{"id": "1", "event": "DELETE"}, {"id": "7" * 5000, "event": "DELETE"},
               {"event": "ADD", "text": "kept"}]
    r = parse_ops(json.dumps({"memory": entries}), valid_ids=[0, 1])
    assert [(o.op, o.valid) for o in r.ops] == [(OpCode.DELETE, True), (OpCode.NOOP, False),
                                                (OpCode.ADD, True)]
    assert r.reasons == [Reason.BAD_ID]
    plain = parse_ops("DELETE 1\nDELETE " + "7" * 5000 + "\nADD: kept", valid_ids=[0, 1])
    assert [o.op for o in plain.ops] == [OpCode.DELETE, OpCode.NOOP, OpCode.ADD]


# ------------------------------------------------------------------ linear time

SLOW = ["UPDATE a" + " " * 8000 + "b", "ADD 1" + " " * 8000 + "x", "*" * 8000 + "x",
        "- " * 8000 + "UPDATE", "```" * 5000, "answer" + " " * 8000 + "x",
        "**" + " " * 8000 + "x", ("answer" + " " * 40) * 400, "1. " * 5000 + "ADD"]


@pytest.mark.parametrize("text", SLOW, ids=range(len(SLOW)))
def test_parsers_run_in_linear_time(text):
    t0 = time.perf_counter()
    parse_ops(text, valid_ids=[0, 1])
    parse_answer(text)
    # twice the text must cost about twice the time: a quadratic parser costs four times
    t1 = time.perf_counter()
    parse_ops(text * 2, valid_ids=[0, 1])
    parse_answer(text * 2)
    t2 = time.perf_counter()
    assert t1 - t0 < 0.05 and t2 - t1 < 0.1, (t1 - t0, t2 - t1)


OLD_MARKER = re.compile(r"\**\s*answer\s*\**\s*:\s*\**", re.IGNORECASE)
MARKER_SOUP = st.lists(st.sampled_from(["*", " ", "\n", "\t", ":", "answer", "Answer", "ANSWER",
                                        "x", "s", "-"]), max_size=40).map("".join)


@settings(max_examples=1500, deadline=None)
@given(MARKER_SOUP)
def test_linear_marker_search_matches_the_regex(text):
    """The linear marker search finds exactly the spans the original regex finds."""
    assert _markers(text) == [m.span() for m in OLD_MARKER.finditer(text)]
    assert _strip_markers(text) == OLD_MARKER.sub("", text)


def test_parse_answer_unchanged_on_ordinary_replies():
    p = parse_answer("- Ann adopted a cat\n- Bob lives in Oslo\n**Answer:** a cat")
    assert p.answer == "a cat" and p.distilled == ("Ann adopted a cat", "Bob lives in Oslo")
    assert not p.answer_line_missing
    assert parse_answer("Answer: yes\nanswer:\n  no").answer == "no"


# ------------------------------------------------------------------ judge URL


def test_judge_key_in_base_url_query_is_redacted():
    from mr1.eval.judge import JudgeConfig, JudgeError, LLMJudge, redact_url

    secret = "sk-query-SECRET-123"
    url = f"http://user:pw-SECRET@127.0.0.1:9/v1?api-key={secret}&x=1"
    c = JudgeConfig(base_url=url, model="m", max_retries=0, timeout=0.5)
    assert c.endpoint == ("http://user:pw-SECRET@127.0.0.1:9/v1/chat/completions"
                          f"?api-key={secret}&x=1")
    assert secret not in c.display_endpoint and "pw-SECRET" not in c.display_endpoint
    assert "api-key=***" in c.display_endpoint
    judge = LLMJudge(c, sleep=lambda s: None)
    for shown in (repr(c), repr(judge)):
        assert secret not in shown and "pw-SECRET" not in shown
    with pytest.raises(JudgeError) as info:
        judge.complete([{"role": "user", "content": "hi"}])
    assert secret not in str(info.value) and "pw-SECRET" not in str(info.value)
    assert "127.0.0.1:9/v1/chat/completions" in str(info.value)
    assert redact_url("http://h/v1") == "http://h/v1"
