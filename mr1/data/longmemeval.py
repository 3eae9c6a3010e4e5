"""LongMemEval (oracle and S): one :class:`Conversation` per question.

Record format (official release, both variants): ``question_id, question_type, question,
answer, question_date, haystack_dates, haystack_session_ids, haystack_sessions,
answer_session_ids``; each haystack session is a list of turns ``{role, content}`` with
``has_answer: true`` on evidence turns (oracle turns always carry the key; S filler turns
usually omit it).

Mapping onto the shared records (the question's haystack is the conversation):

* ``Conversation.sample_id`` = ``question_id``; speakers ``"user"`` and ``"assistant"``;
* haystack session ``i`` (0-based in the file) → ``Session(idx=i+1, date=haystack_dates[i],
  session_id=haystack_session_ids[i])``; turn ``j`` → ``Turn(speaker=role, text=content,
  dia_id="D{i+1}:{j+1}", has_answer=...)``, so ids follow the LoCoMo scheme;
* one :class:`QA`: ``answer`` stringified (32 answers are integers), ``category`` = 1-based
  index of ``question_type`` in :data:`QUESTION_TYPES`, ``evidence`` = ids of the
  ``has_answer`` turns, ``evidence_sessions`` = ``answer_session_ids``, ``question_date``.

Abstention questions (``question_id`` ending in ``_abs``) have no answer in the haystack;
:func:`is_abstention` tells them apart. The S file may be gzip-compressed (the local rebuild
``longmemeval_s_cleaned.499of500.json.gz`` lacks question ``gpt4_7a0daae1``).
"""

from __future__ import annotations

from typing import Iterable

from mr1.data import paths
from mr1.data.records import QA, Conversation, Session, Turn, answer_text, dia_id

#: LongMemEval question types; ``QA.category`` is the 1-based index in this tuple.
QUESTION_TYPES: tuple[str, ...] = (
    "single-session-user",
    "single-session-assistant",
    "single-session-preference",
    "multi-session",
    "temporal-reasoning",
    "knowledge-update",
)

#: Variant name → registry key of :data:`mr1.data.paths.DATASETS`.
VARIANTS: dict[str, str] = {
    "oracle": "longmemeval_oracle",
    "s": "longmemeval_s",
}


def is_abstention(qa: QA) -> bool:
    """True for LongMemEval abstention questions (``question_id`` ends in ``_abs``)."""
    return qa.question_id.endswith("_abs")


def parse_record(rec: dict) -> Conversation:
    """One LongMemEval record → :class:`Conversation` with one :class:`QA`."""
    qid = rec["question_id"]
    dates, ids, raw_sessions = (rec["haystack_dates"], rec["haystack_session_ids"],
                                rec["haystack_sessions"])
    if not len(dates) == len(ids) == len(raw_sessions):
        raise ValueError(f"{qid}: haystack_dates/session_ids/sessions lengths differ "
                         f"({len(dates)}, {len(ids)}, {len(raw_sessions)})")
    sessions = []
    for i, (date, sid, raw) in enumerate(zip(dates, ids, raw_sessions), 1):
        turns = tuple(
            Turn(speaker=t["role"], text=t["content"], dia_id=dia_id(i, j), session_idx=i,
                 date=date, has_answer=bool(t.get("has_answer", False)))
            for j, t in enumerate(raw, 1))
        sessions.append(Session(idx=i, date=date, turns=turns, session_id=sid))
    qtype = rec["question_type"]
    qa = QA(
        question=rec["question"],
        answer=answer_text(rec["answer"]),
        evidence=tuple(t.dia_id for s in sessions for t in s.turns if t.has_answer),
        category=QUESTION_TYPES.index(qtype) + 1 if qtype in QUESTION_TYPES else 0,
        conv_id=qid,
        question_id=qid,
        question_type=qtype,
        question_date=rec.get("question_date", ""),
        evidence_sessions=tuple(rec.get("answer_session_ids", ())),
    )
    return Conversation(sample_id=qid, speaker_a="user", speaker_b="assistant",
                        sessions=tuple(sessions), qas=(qa,))


def parse_records(records: Iterable[dict]) -> list[Conversation]:
    """Many records (see :func:`parse_record`)."""
    return [parse_record(r) for r in records]


def load_longmemeval(variant: str = "oracle", path: paths.PathLike | None = None, *,
                     download: bool = False) -> list[Conversation]:
    """Loads LongMemEval ``variant`` (``"oracle"`` or ``"s"``) as one conversation per question.

    Args:
      variant: key of :data:`VARIANTS`.
      path: explicit JSON file (plain or ``.gz``); default: resolved through
        :func:`mr1.data.paths.resolve`.
      download: fetch into the cache when missing (network).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown LongMemEval variant {variant!r}; known: {sorted(VARIANTS)}")
    file = paths.resolve(VARIANTS[variant], path, download=download)
    data = paths.read_json(file)
    try:
        return parse_records(data)
    except (KeyError, TypeError, ValueError) as err:
        raise paths.DataFileError(
            f"{file} does not look like a LongMemEval file: {type(err).__name__}: {err}") from err
