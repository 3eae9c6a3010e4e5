"""MSC (Multi-Session Chat): MemGPT's MSC-Self-Instruct and ParlAI's MSC session files.

No MSC dialogue file exists in the project's local data (see ``shared/data/SOURCES.md``), so
these loaders are written against the documented formats and tested on small files in those
formats. Assumptions, from ParlAI's ``parlai/tasks/msc/agents.py`` reader and third-party
readers of ``msc_self_instruct.jsonl``:

**ParlAI MSC** (``msc_v0.1``: ``msc_dialogue/session_<k>/{train,valid,test}.txt``): JSON
lines, one episode each, with

* ``metadata``: ``{initial_data_id, session_id}``;
* ``personas``: two lists of persona sentences (speaker 1, speaker 2) as of this session;
* ``dialog``: the current session, ``[{id: "Speaker 1" | "Speaker 2", text, ...}]``;
* ``previous_dialogs``: earlier sessions, each ``{dialog: [{text}], personas,
  time_num, time_unit, time_back}``; their turns have no speaker and alternate
  starting with Speaker 1.

**MSC-Self-Instruct** (MemGPT's DMR benchmark, ``msc_self_instruct.jsonl``, 500 rows): rows of
the session-5 format above plus ``self_instruct: {"B": question, "A": answer}`` (a question
about the earlier sessions and its gold answer), ``init_personas``, ``personas_update1/2`` and
``summary_speaker_1/2``.

Mapping: the previous dialogs become sessions ``1..n`` (``date`` = ``time_back``, or
"<time_num> <time_unit> ago", or ""), the current ``dialog`` session ``n+1``; speakers are
``"Speaker 1"`` and ``"Speaker 2"``; each previous session's persona lines become
:class:`Observation` records of that session (no evidence ids); MSC-Self-Instruct's question is
one :class:`QA` with category 0 and no evidence.
"""

from __future__ import annotations

from typing import Iterable

from mr1.data import paths
from mr1.data.records import QA, Conversation, Observation, Session, Turn, answer_text, dia_id

SPEAKERS: tuple[str, str] = ("Speaker 1", "Speaker 2")


def _date(prev: dict) -> str:
    if prev.get("time_back"):
        return str(prev["time_back"])
    if prev.get("time_num") is not None and prev.get("time_unit"):
        return f"{prev['time_num']} {prev['time_unit']} ago"
    return ""


def _session(raw_turns: list[dict], idx: int, date: str) -> Session:
    turns = []
    for j, t in enumerate(raw_turns, 1):
        text = t.get("text")
        if text is None:
            text = t.get("utterance", "")
        speaker = t.get("id") if t.get("id") in SPEAKERS else SPEAKERS[(j - 1) % 2]
        turns.append(Turn(speaker=speaker, text=text, dia_id=dia_id(idx, j), session_idx=idx,
                          date=date))
    return Session(idx=idx, date=date, turns=tuple(turns))


def _persona_observations(personas, session_idx: int) -> list[Observation]:
    out = []
    for speaker, lines in zip(SPEAKERS, personas or ()):
        for line in lines or ():
            if isinstance(line, str) and line.strip():
                out.append(Observation(session_idx, speaker, line.strip()))
    return out


def _sample_id(row: dict, row_idx: int, prefix: str) -> str:
    meta = row.get("metadata") or {}
    if meta.get("initial_data_id"):
        sid = f"-s{meta['session_id']}" if meta.get("session_id") is not None else ""
        return f"{prefix}-{meta['initial_data_id']}{sid}-{row_idx}"
    return f"{prefix}-{row_idx}"


def parse_episode(row: dict, row_idx: int = 0, prefix: str = "msc") -> Conversation:
    """One ParlAI MSC episode → :class:`Conversation` (no QAs)."""
    sessions: list[Session] = []
    observations: list[Observation] = []
    for i, prev in enumerate(row.get("previous_dialogs") or (), 1):
        sessions.append(_session(prev.get("dialog") or [], i, _date(prev)))
        observations += _persona_observations(prev.get("personas"), i)
    current_idx = len(sessions) + 1
    sessions.append(_session(row.get("dialog") or [], current_idx, ""))
    observations += _persona_observations(row.get("personas"), current_idx)
    return Conversation(sample_id=_sample_id(row, row_idx, prefix), speaker_a=SPEAKERS[0],
                        speaker_b=SPEAKERS[1], sessions=tuple(sessions),
                        observations=tuple(observations))


def parse_self_instruct(row: dict, row_idx: int = 0) -> Conversation:
    """One MSC-Self-Instruct row → :class:`Conversation` with its single :class:`QA`."""
    conv = parse_episode(row, row_idx, prefix="msc-si")
    si = row["self_instruct"]
    qa = QA(question=answer_text(si["B"]).strip(), answer=answer_text(si["A"]).strip(),
            evidence=(), category=0, conv_id=conv.sample_id,
            question_id=f"{conv.sample_id}/q0", question_type="dmr")
    return Conversation(sample_id=conv.sample_id, speaker_a=conv.speaker_a,
                        speaker_b=conv.speaker_b, sessions=conv.sessions, qas=(qa,),
                        observations=conv.observations)


def _parse_rows(file, rows: Iterable[dict], parse) -> list[Conversation]:
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(parse(row, i))
        except (KeyError, TypeError, AttributeError) as err:
            raise paths.DataFileError(
                f"{file}: row {i} does not have the expected MSC format: "
                f"{type(err).__name__}: {err}") from err
    return out


def load_msc_self_instruct(path: paths.PathLike | None = None, *, download: bool = False
                           ) -> list[Conversation]:
    """Loads MemGPT's MSC-Self-Instruct (``msc_self_instruct.jsonl``, plain or gzip)."""
    file = paths.resolve("msc_self_instruct", path, download=download)
    return _parse_rows(file, paths.iter_jsonl(file), parse_self_instruct)


def load_msc_parlai(path: paths.PathLike) -> list[Conversation]:
    """Loads one ParlAI MSC session file (e.g. ``msc_dialogue/session_5/test.txt``).

    ParlAI ships MSC as a tarball (``msc_v0.1.tar.gz``), so there is no registry entry: pass
    the path of an extracted session file.
    """
    file = paths.resolve_explicit(path)
    return _parse_rows(file, paths.iter_jsonl(file), parse_episode)
