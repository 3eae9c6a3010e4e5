"""Typed records: immutability, id helpers, QA rows and the datasets.Dataset view."""

from __future__ import annotations

import dataclasses

import pytest

from mr1.data.records import (QA, Conversation, Session, Turn, answer_text, dia_id, qa_rows,
                              session_of, to_hf_dataset)


def _conv() -> Conversation:
    s1 = Session(1, "8 May, 2023", (Turn("A", "hi", "D1:1", 1, "8 May, 2023"),
                                    Turn("B", "look", "D1:2", 1, "8 May, 2023", "a dog")))
    s2 = Session(2, "9 May, 2023", (Turn("A", "bye", "D2:1", 2, "9 May, 2023"),))
    qa = QA("q?", "a", ("D1:2",), 4, "c", question_id="c/q0", question_type="single-hop")
    adv = QA("q5?", "", ("D2:1",), 5, "c", adversarial_answer="yes", question_id="c/q1")
    return Conversation("c", "A", "B", (s1, s2), (qa, adv), session_summaries=("s1", "s2"))


def test_records_are_frozen_and_hashable():
    conv = _conv()
    with pytest.raises(dataclasses.FrozenInstanceError):
        conv.sample_id = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        conv.sessions[0].turns[0].text = "x"  # type: ignore[misc]
    assert hash(conv) == hash(_conv()) and conv == _conv()


def test_turn_lookup_and_flat_turns():
    conv = _conv()
    assert [t.dia_id for t in conv.turns] == ["D1:1", "D1:2", "D2:1"]
    assert conv.turn("D1:2").image_caption == "a dog"
    assert conv.turn("D9:9") is None


def test_id_helpers():
    assert dia_id(3, 12) == "D3:12"
    assert session_of("D3:12") == 3
    with pytest.raises(ValueError):
        session_of("D:11:26")


@pytest.mark.parametrize("value,text", [(2022, "2022"), (None, ""), ("x", "x"), (2.5, "2.5")])
def test_answer_text(value, text):
    assert answer_text(value) == text


def test_qa_rows_and_hf_dataset():
    conv = _conv()
    rows = qa_rows(conv.qas)
    assert rows[0]["evidence"] == ["D1:2"] and rows[1]["adversarial_answer"] == "yes"
    assert rows[0]["adversarial_answer"] == ""
    ds = to_hf_dataset(conv.qas)
    assert ds.num_rows == 2
    assert ds[0]["question"] == "q?" and ds[1]["category"] == 5
    assert ds[0]["evidence"] == ["D1:2"]
    assert to_hf_dataset([]).num_rows == 0
