"""MSC loaders on small files written here in the MSC-Self-Instruct and ParlAI MSC formats."""

from __future__ import annotations

import gzip
import json

import pytest

from mr1.data import paths
from mr1.data.msc import load_msc_parlai, load_msc_self_instruct, parse_episode

PREVIOUS = [
    {"personas": [["I have a dog."], ["I like tea."]],
     "dialog": [{"text": "Hi, my dog is sick."}, {"text": "Oh no!"}, {"text": "Vet today."}],
     "time_num": 7, "time_unit": "days", "time_back": "7 days ago"},
    {"personas": [["My dog is fine now."], []],
     "dialog": [{"text": "Dog is better."}, {"text": "Great."}],
     "time_num": 3, "time_unit": "hours"},
]
CURRENT = [{"id": "Speaker 1", "text": "Back again."}, {"id": "Speaker 2", "text": "Hello!"}]
PARLAI_ROW = {
    "metadata": {"initial_data_id": "train_123", "session_id": 2},
    "personas": [["I have a dog.", "My dog is fine now."], ["I like tea."]],
    "init_personas": [["I have a dog."], ["I like tea."]],
    "dialog": CURRENT,
    "previous_dialogs": PREVIOUS,
}
SELF_INSTRUCT_ROW = dict(
    PARLAI_ROW,
    self_instruct={"B": "What was wrong with my dog last time? ", "A": "It was sick."},
    summary_speaker_1=["I have a dog."], summary_speaker_2=["I like tea."],
    personas_update1=[], personas_update2=[],
)


def _write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows) + "\n"
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


def test_parse_episode_sessions_speakers_and_personas():
    conv = parse_episode(PARLAI_ROW, 0)
    assert conv.sample_id == "msc-train_123-s2-0"
    assert (conv.speaker_a, conv.speaker_b) == ("Speaker 1", "Speaker 2")
    assert [s.idx for s in conv.sessions] == [1, 2, 3]
    assert [s.date for s in conv.sessions] == ["7 days ago", "3 hours ago", ""]
    assert [(t.speaker, t.text) for t in conv.sessions[0].turns] == [
        ("Speaker 1", "Hi, my dog is sick."), ("Speaker 2", "Oh no!"),
        ("Speaker 1", "Vet today.")]
    assert conv.turn("D3:2").speaker == "Speaker 2" and conv.turn("D3:2").text == "Hello!"
    assert [(o.session_idx, o.speaker, o.text) for o in conv.observations] == [
        (1, "Speaker 1", "I have a dog."), (1, "Speaker 2", "I like tea."),
        (2, "Speaker 1", "My dog is fine now."),
        (3, "Speaker 1", "I have a dog."), (3, "Speaker 1", "My dog is fine now."),
        (3, "Speaker 2", "I like tea.")]
    assert conv.qas == ()


def test_load_msc_parlai_file(tmp_path):
    f = _write_jsonl(tmp_path / "test.txt", [PARLAI_ROW, dict(PARLAI_ROW, metadata={})])
    convs = load_msc_parlai(f)
    assert [c.sample_id for c in convs] == ["msc-train_123-s2-0", "msc-1"]
    with pytest.raises(paths.DataNotFoundError):
        load_msc_parlai(tmp_path / "missing.txt")


@pytest.mark.parametrize("gz", [False, True])
def test_load_msc_self_instruct_explicit_path(tmp_path, gz):
    f = _write_jsonl(tmp_path / "msc_self_instruct.jsonl", [SELF_INSTRUCT_ROW] * 2, gz=gz)
    convs = load_msc_self_instruct(f)
    assert len(convs) == 2
    (qa,) = convs[0].qas
    assert qa.question == "What was wrong with my dog last time?"
    assert qa.answer == "It was sick." and qa.category == 0 and qa.evidence == ()
    assert qa.conv_id == convs[0].sample_id == "msc-si-train_123-s2-0"
    assert convs[1].sample_id != convs[0].sample_id
    assert len(convs[0].sessions) == 3


def test_load_msc_self_instruct_through_data_dir(tmp_path, monkeypatch):
    (tmp_path / "msc").mkdir()
    _write_jsonl(tmp_path / "msc" / "msc_self_instruct.jsonl", [SELF_INSTRUCT_ROW])
    monkeypatch.setenv("MR1_DATA_DIR", str(tmp_path))
    assert len(load_msc_self_instruct()) == 1


def test_msc_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MR1_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MR1_CACHE", str(tmp_path / "cache"))
    with pytest.raises(paths.DataNotFoundError, match="download msc_self_instruct"):
        load_msc_self_instruct()
    f = _write_jsonl(tmp_path / "rows.jsonl", [PARLAI_ROW])  # no self_instruct key
    with pytest.raises(paths.DataFileError, match="row 0"):
        load_msc_self_instruct(f)
