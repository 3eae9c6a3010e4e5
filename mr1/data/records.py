"""Typed, immutable records shared by every benchmark loader.

LoCoMo, LongMemEval and MSC all become lists of :class:`Conversation`: sessions of turns, the
questions asked about them (:class:`QA`), and, where the benchmark ships them, per-session
facts (:class:`Observation`) and summaries. Strings only; ids are kept as the benchmark spells
them except where a loader documents a repair (LoCoMo evidence ids).

Dialogue ids follow LoCoMo's ``D<session>:<turn>`` scheme (both 1-based) in every loader, so
``session_of(dia_id)`` works for all benchmarks.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Iterable


@dataclasses.dataclass(frozen=True)
class Turn:
    """One utterance.

    Attributes:
      speaker: speaker name (LoCoMo), ``"user"``/``"assistant"`` (LongMemEval) or
        ``"Speaker 1"``/``"Speaker 2"`` (MSC).
      text: the utterance.
      dia_id: ``D<session>:<turn>`` id, unique within the conversation.
      session_idx: 1-based index of the session holding the turn.
      date: the session's date/time string as the benchmark writes it.
      image_caption: BLIP caption of a shared image (LoCoMo), else ``None``.
      has_answer: LongMemEval marks the turns that hold the answer; ``False`` elsewhere.
    """

    speaker: str
    text: str
    dia_id: str
    session_idx: int
    date: str = ""
    image_caption: str | None = None
    has_answer: bool = False


@dataclasses.dataclass(frozen=True)
class Session:
    """One sitting of a conversation.

    Attributes:
      idx: 1-based session number (LoCoMo ``session_<idx>``).
      date: date/time string as written by the benchmark ("" if it has none).
      turns: the session's turns, in order.
      session_id: the benchmark's own session id where it has one (LongMemEval), else "".
    """

    idx: int
    date: str
    turns: tuple[Turn, ...]
    session_id: str = ""


@dataclasses.dataclass(frozen=True)
class QA:
    """A question about a conversation, with its gold answer.

    Attributes:
      question: the question.
      answer: gold answer, always a string (integers in the source are stringified); ""
        for LoCoMo adversarial items that only have ``adversarial_answer``.
      evidence: ``D<s>:<t>`` ids of the turns that support the answer.
      category: LoCoMo category (1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop,
        5 adversarial); LongMemEval question-type index (see ``longmemeval.QUESTION_TYPES``);
        0 for MSC.
      conv_id: ``Conversation.sample_id`` of the conversation asked about.
      adversarial_answer: LoCoMo category-5 distractor answer, else ``None``.
      question_id: unique id (LoCoMo: ``<conv_id>/q<index>``; LongMemEval: its question_id).
      question_type: category name (``"multi-hop"``, ``"temporal-reasoning"`` ...).
      question_date: when the question is asked (LongMemEval), else "".
      evidence_sessions: ids of the sessions holding the answer (LongMemEval), else ().
    """

    question: str
    answer: str
    evidence: tuple[str, ...]
    category: int
    conv_id: str
    adversarial_answer: str | None = None
    question_id: str = ""
    question_type: str = ""
    question_date: str = ""
    evidence_sessions: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Observation:
    """A fact about one speaker extracted from one session, with its supporting turns.

    LoCoMo ships these (``observation`` → ``session_<n>_observation``); they are a cheap,
    ready-made source of facts for memory construction. MSC persona lines become
    observations with no evidence.
    """

    session_idx: int
    speaker: str
    text: str
    evidence: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A long multi-session dialogue and the questions about it.

    Attributes:
      sample_id: conversation id (``conv-26``, a LongMemEval question_id, ``msc-...``).
      speaker_a: first speaker's name.
      speaker_b: second speaker's name.
      sessions: sessions in order.
      qas: questions about this conversation.
      observations: per-session speaker facts (LoCoMo observations, MSC personas).
      session_summaries: one summary per entry of ``sessions`` (same order; "" where none).
    """

    sample_id: str
    speaker_a: str
    speaker_b: str
    sessions: tuple[Session, ...]
    qas: tuple[QA, ...] = ()
    observations: tuple[Observation, ...] = ()
    session_summaries: tuple[str, ...] = ()

    @property
    def turns(self) -> tuple[Turn, ...]:
        """Every turn of every session, in order."""
        return tuple(t for s in self.sessions for t in s.turns)

    @functools.cached_property
    def _by_dia_id(self) -> dict[str, Turn]:
        return {t.dia_id: t for t in self.turns}

    def turn(self, dia_id: str) -> Turn | None:
        """The turn with id ``dia_id``, or ``None`` (some benchmark evidence ids dangle)."""
        return self._by_dia_id.get(dia_id)


_DIA_ID = re.compile(r"D(\d+):(\d+)")


def session_of(dia_id: str) -> int:
    """Session number of a ``D<session>:<turn>`` id (``"D3:12"`` → 3)."""
    m = _DIA_ID.fullmatch(dia_id)
    if m is None:
        raise ValueError(f"not a D<session>:<turn> dialogue id: {dia_id!r}")
    return int(m.group(1))


def dia_id(session_idx: int, turn_idx: int) -> str:
    """The ``D<session>:<turn>`` id of a 1-based session and 1-based turn index."""
    return f"D{session_idx}:{turn_idx}"


def answer_text(value: object) -> str:
    """Gold answers as strings: ``None`` → "", ints/floats → their decimal text."""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


_QA_COLUMNS = ("question_id", "conv_id", "question", "answer", "category", "question_type",
               "evidence", "adversarial_answer", "question_date", "evidence_sessions")


def qa_rows(qas: Iterable[QA]) -> list[dict[str, Any]]:
    """QAs as plain dicts (lists for tuples; ``adversarial_answer`` "" when absent)."""
    rows = []
    for q in qas:
        row = {k: getattr(q, k) for k in _QA_COLUMNS}
        row["evidence"] = list(q.evidence)
        row["evidence_sessions"] = list(q.evidence_sessions)
        row["adversarial_answer"] = q.adversarial_answer or ""
        rows.append(row)
    return rows


def to_hf_dataset(qas: Iterable[QA]):
    """QAs as a ``datasets.Dataset`` with the columns of :func:`qa_rows`."""
    import datasets  # heavy import, only when asked

    rows = qa_rows(qas)
    features = datasets.Features({
        "question_id": datasets.Value("string"),
        "conv_id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "category": datasets.Value("int32"),
        "question_type": datasets.Value("string"),
        "evidence": datasets.Sequence(datasets.Value("string")),
        "adversarial_answer": datasets.Value("string"),
        "question_date": datasets.Value("string"),
        "evidence_sessions": datasets.Sequence(datasets.Value("string")),
    })
    columns = {name: [row[name] for row in rows] for name in features}  # works for 0 rows
    return datasets.Dataset.from_dict(columns, features=features)
