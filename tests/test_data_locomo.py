"""LoCoMo loader and Memory-R1 split: synthetic quirks always; real counts with MR1_DATA_DIR."""

from __future__ import annotations

import collections
import json
import os
import pathlib

import pytest

from mr1.data import paths
from mr1.data.locomo import (CATEGORIES, all_qas, load_locomo, normalize_evidence,
                             parse_sample, split_locomo, to_hf_dataset)


def _real_locomo_path() -> pathlib.Path:
    root = os.environ.get("MR1_DATA_DIR")
    if not root:
        pytest.skip("MR1_DATA_DIR is not set: the real LoCoMo file (locomo/locomo10.json) "
                    "is needed for this test")
    try:
        return paths.resolve("locomo")
    except paths.DataNotFoundError:
        pytest.skip(f"locomo10.json not found under MR1_DATA_DIR={root}")


@pytest.fixture(scope="module")
def convs():
    _real_locomo_path()
    return load_locomo()  # resolved through MR1_DATA_DIR, as users do


# -------------------------------------------------------------------------------------------
# Synthetic: the quirks, without the real file
# -------------------------------------------------------------------------------------------

SAMPLE = {
    "sample_id": "conv-x",
    "conversation": {
        "speaker_a": "Ann", "speaker_b": "Bob",
        "session_1_date_time": "1:56 pm on 8 May, 2023",
        "session_1": [
            {"speaker": "Ann", "dia_id": "D1:1", "text": "Hi Bob!"},
            {"speaker": "Bob", "dia_id": "D1:2", "text": "Look at this.",
             "img_url": ["https://x/y.jpg"], "blip_caption": "a photo of a dog", "query": "dog"},
        ],
        "session_2_date_time": "2:00 pm on 9 May, 2023",
        "session_2": [{"speaker": "Ann", "dia_id": "D2:1", "text": "Bye."}],
        "session_3_date_time": "dates without a session are ignored",
    },
    "qa": [
        {"question": "Year?", "answer": 2022, "evidence": ["D1:1"], "category": 2},
        {"question": "Multi?", "answer": "x, y", "evidence": ["D1:1; D2:1", "D:1:2"],
         "category": 1},
        {"question": "Adv?", "adversarial_answer": "yes", "evidence": ["D"], "category": 5},
    ],
    "observation": {
        "session_1_observation": {"Ann": [["Ann greets Bob.", "D1:1"]],
                                  "Bob": [["Bob has a dog.", "D1:2, D1:1"]]},
        "session_2_observation": {"Ann": [["Ann leaves.", ["D2:1"]]], "Bob": []},
    },
    "session_summary": {"session_1_summary": "They met.", "session_2_summary": "Ann left."},
    "event_summary": {},
}


@pytest.mark.parametrize("raw,want", [
    ("D1:3", ("D1:3",)),
    (["D8:6; D9:17"], ("D8:6", "D9:17")),
    (["D9:1 D4:4 D4:6"], ("D9:1", "D4:4", "D4:6")),
    ("D26:14, D26:34, D26:42", ("D26:14", "D26:34", "D26:42")),
    (["D:11:26"], ("D11:26",)),
    (["D30:05"], ("D30:5",)),
    (["D"], ()),
    (["D1:3", "D1:3"], ("D1:3",)),
    (None, ()),
])
def test_normalize_evidence(raw, want):
    assert normalize_evidence(raw) == want


def test_parse_sample_synthetic():
    conv = parse_sample(SAMPLE)
    assert (conv.sample_id, conv.speaker_a, conv.speaker_b) == ("conv-x", "Ann", "Bob")
    assert [s.idx for s in conv.sessions] == [1, 2]
    assert conv.sessions[0].date == "1:56 pm on 8 May, 2023"
    t = conv.turn("D1:2")
    assert t.image_caption == "a photo of a dog" and t.session_idx == 1
    assert t.date == "1:56 pm on 8 May, 2023" and conv.turn("D1:1").image_caption is None
    q0, q1, q5 = conv.qas
    assert q0.answer == "2022" and q0.question_type == "temporal" and q0.question_id == "conv-x/q0"
    assert q1.evidence == ("D1:1", "D2:1", "D1:2")
    assert q5.answer == "" and q5.adversarial_answer == "yes" and q5.evidence == ()
    assert [(o.session_idx, o.speaker, o.evidence) for o in conv.observations] == [
        (1, "Ann", ("D1:1",)), (1, "Bob", ("D1:2", "D1:1")), (2, "Ann", ("D2:1",))]
    assert conv.session_summaries == ("They met.", "Ann left.")


def test_load_locomo_bad_structure_is_a_clear_error(tmp_path):
    f = tmp_path / "locomo10.json"
    f.write_text(json.dumps([{"sample_id": "x"}]))
    with pytest.raises(paths.DataFileError, match="does not look like locomo10.json"):
        load_locomo(f)
    f.write_text(json.dumps([SAMPLE])[:-20])
    with pytest.raises(paths.DataFileError, match="locomo10.json"):
        load_locomo(f)


def test_split_synthetic_with_custom_ids():
    a = parse_sample(SAMPLE)
    b = parse_sample(dict(SAMPLE, sample_id="conv-y"))
    c = parse_sample(dict(SAMPLE, sample_id="conv-z"))
    split = split_locomo([a, b, c], train_ids=("conv-y",), validation_ids=("conv-x",))
    assert [x.sample_id for x in split.train] == ["conv-y"]
    assert [x.sample_id for x in split.test] == ["conv-z"]
    assert all(q.category != 5 for x in split for conv in x for q in conv.qas)
    full = split_locomo([a, b, c], train_ids=("conv-y",), validation_ids=("conv-x",),
                        include_adversarial=True)
    assert len(full.test[0].qas) == 3
    with pytest.raises(ValueError, match="conv-26"):
        split_locomo([a])


# -------------------------------------------------------------------------------------------
# The real file
# -------------------------------------------------------------------------------------------

def test_real_file_is_the_registered_one():
    assert paths.sha256_file(_real_locomo_path()) == paths.DATASETS["locomo"].sha256


def test_real_file_statistics(convs):
    assert [c.sample_id for c in convs] == [
        "conv-26", "conv-30", "conv-41", "conv-42", "conv-43", "conv-44", "conv-47", "conv-48",
        "conv-49", "conv-50"]
    assert sum(len(c.sessions) for c in convs) == 272
    assert sum(len(c.turns) for c in convs) == 5882
    qas = all_qas(convs)
    assert len(qas) == 1986
    assert collections.Counter(q.category for q in qas) == {1: 282, 2: 321, 3: 96, 4: 841, 5: 446}
    assert all(isinstance(q.answer, str) for q in qas)
    assert sum(q.answer == "" for q in qas) == 444  # adversarial items without `answer`
    assert sum(q.adversarial_answer is not None for q in qas) == 446
    # conv-26 has dates for sessions 20..35 but only 19 sessions
    assert len(convs[0].sessions) == 19 and [s.idx for s in convs[0].sessions] == list(range(1, 20))
    # every session has a date and a summary; turns carry their session's date
    assert all(s.date for c in convs for s in c.sessions)
    assert all(len(c.session_summaries) == len(c.sessions) and all(c.session_summaries)
               for c in convs)
    assert all(t.date == s.date and t.session_idx == s.idx
               for c in convs for s in c.sessions for t in s.turns)


def test_real_file_quirks_are_repaired(convs):
    by_id = {c.sample_id: c for c in convs}
    int_answers = [q for q in all_qas(convs) if q.question.startswith("How many children does")]
    assert int_answers[0].answer == "3"
    assert any(q.answer == "2022" for q in by_id["conv-26"].qas)
    # every evidence id is well formed; only two point to no turn (kept as given)
    dangling = [(c.sample_id, e) for c in convs for q in c.qas for e in q.evidence
                if c.turn(e) is None]
    assert dangling == [("conv-42", "D10:19"), ("conv-47", "D4:36")]
    assert any("D11:26" in q.evidence for q in by_id["conv-43"].qas)  # was "D:11:26"
    assert any("D30:5" in q.evidence for q in by_id["conv-50"].qas)  # was "D30:05"
    # observations: facts with evidence, all resolvable after splitting "D26:14, D26:34, ..."
    obs = [o for c in convs for o in c.observations]
    assert len(obs) == 2541 and all(o.evidence for o in obs)
    assert all(c.turn(e) is not None for c in convs for o in c.observations for e in o.evidence)
    assert {o.speaker for o in by_id["conv-26"].observations} == {"Caroline", "Melanie"}
    assert sum(t.image_caption is not None for c in convs for t in c.turns) == 1226


def test_real_split_counts(convs):
    split = split_locomo(convs)
    assert [c.sample_id for c in split.train] == ["conv-26"]
    assert [c.sample_id for c in split.validation] == ["conv-30"]
    assert len(split.test) == 8
    assert len(all_qas(split.train)) == 152
    assert len(all_qas(split.validation)) == 81
    test_qas = all_qas(split.test)
    assert len(test_qas) == 1307
    assert collections.Counter(q.category for q in test_qas) == {1: 239, 2: 258, 3: 83, 4: 727}
    assert collections.Counter(q.category for q in all_qas(split.train)) == {
        1: 32, 2: 37, 3: 13, 4: 70}
    with_adv = split_locomo(convs, include_adversarial=True)
    assert [len(all_qas(p)) for p in with_adv] == [199, 105, 1682]


def test_real_split_as_hf_dataset(convs):
    ds = to_hf_dataset(all_qas(split_locomo(convs).test))
    assert ds.num_rows == 1307
    assert set(ds.unique("category")) == {1, 2, 3, 4}
    assert ds.features["evidence"].feature.dtype == "string"
    assert CATEGORIES[ds[0]["category"]] == ds[0]["question_type"]
