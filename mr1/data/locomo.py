"""LoCoMo (``locomo10.json``): loading into records, the Memory-R1 split, and HF datasets.

File structure (a JSON list of 10 samples), as read here:

* ``sample_id``; ``conversation`` with ``speaker_a``, ``speaker_b``, ``session_<n>`` (list of
  turns ``{speaker, dia_id, text}`` plus ``img_url``/``blip_caption``/``query`` on image
  turns) and ``session_<n>_date_time`` ("1:56 pm on 8 May, 2023");
* ``qa``: ``{question, answer, evidence, category}``; category-5 (adversarial) items carry
  ``adversarial_answer`` and usually no ``answer``;
* ``observation``: ``session_<n>_observation`` → ``{speaker: [[fact, evidence], ...]}``;
* ``session_summary``: ``session_<n>_summary`` → text; ``event_summary`` (not loaded).

Quirks of the canonical file (sha256 ``79fa87e9…``) and how they are handled:

* ``conv-26`` has ``session_20..35_date_time`` keys without sessions: dates without turns
  are ignored (sessions are the ``session_<n>`` lists).
* Answers are sometimes integers (6 QAs, e.g. ``2022``): stringified.
* Evidence ids are mostly ``D<s>:<t>`` but a few are malformed: several ids in one string
  (``"D8:6; D9:17"``, ``"D9:1 D4:4 D4:6"``, observation evidence ``"D26:14, D26:34"``), an
  extra colon (``"D:11:26"`` → ``D11:26``), a zero-padded turn (``"D30:05"`` → ``D30:5``) and a
  bare ``"D"`` (dropped). :func:`normalize_evidence` repairs these. Two well-formed ids point to
  no turn (``D10:19`` in conv-42, ``D4:36`` in conv-47); they are kept as given
  (``Conversation.turn`` returns ``None`` for them).
* Category 5 answers: 444 items have only ``adversarial_answer``; 2 have both.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, NamedTuple, Sequence

from mr1.data import paths
from mr1.data.records import (QA, Conversation, Observation, Session, Turn, answer_text,
                              qa_rows, to_hf_dataset)

__all__ = ["load_locomo", "split_locomo", "parse_sample", "normalize_evidence", "filter_qas",
           "all_qas", "qa_rows", "to_hf_dataset", "LocomoSplit", "CATEGORIES", "TRAIN_IDS",
           "VALIDATION_IDS"]

#: LoCoMo QA categories, as used by Mem0, A-Mem and Memory-R1 for this file.
CATEGORIES: dict[int, str] = {
    1: "multi-hop",
    2: "temporal",
    3: "open-domain",
    4: "single-hop",
    5: "adversarial",
}
ADVERSARIAL = 5

#: Memory-R1's 1:1:8 split by conversation (train 152 QAs, validation 81, test 1,307).
TRAIN_IDS: tuple[str, ...] = ("conv-26",)
VALIDATION_IDS: tuple[str, ...] = ("conv-30",)

_SESSION_KEY = re.compile(r"session_(\d+)")
_EVIDENCE_ID = re.compile(r"D:?(\d+):0*(\d+)")


def normalize_evidence(raw: str | Sequence[str] | None) -> tuple[str, ...]:
    """Repairs LoCoMo evidence into a tuple of ``D<s>:<t>`` ids (see the module docstring).

    Accepts one string or a list of strings; splits on ``;``, ``,`` and whitespace, fixes an
    extra colon or a zero-padded turn number, drops tokens that are not ids, and removes
    duplicates keeping the first occurrence.
    """
    if raw is None:
        return ()
    items = [raw] if isinstance(raw, str) else list(raw)
    out: list[str] = []
    for item in items:
        for token in re.split(r"[;,\s]+", str(item).strip()):
            m = _EVIDENCE_ID.fullmatch(token)
            if m is None:
                continue
            norm = f"D{int(m.group(1))}:{int(m.group(2))}"
            if norm not in out:
                out.append(norm)
    return tuple(out)


def _session_numbers(conversation: dict) -> list[int]:
    return sorted(int(m.group(1)) for k in conversation
                  if (m := _SESSION_KEY.fullmatch(k)) is not None)


def _turn(raw: dict, session_idx: int, date: str) -> Turn:
    return Turn(
        speaker=raw["speaker"],
        text=raw.get("text", ""),
        dia_id=normalize_evidence(raw["dia_id"])[0] if raw.get("dia_id") else "",
        session_idx=session_idx,
        date=date,
        image_caption=raw.get("blip_caption"),
    )


def _observations(sample: dict) -> list[Observation]:
    out = []
    for key, by_speaker in sample.get("observation", {}).items():
        m = re.fullmatch(r"session_(\d+)_observation", key)
        if m is None:
            continue
        for speaker, facts in by_speaker.items():
            for fact in facts:
                text, evidence = (fact[0], fact[1]) if isinstance(fact, list) else (fact, None)
                out.append(Observation(int(m.group(1)), speaker, text,
                                       normalize_evidence(evidence)))
    out.sort(key=lambda o: o.session_idx)  # stable: keeps speaker and fact order per session
    return out


def _qa(raw: dict, conv_id: str, index: int) -> QA:
    category = int(raw["category"])
    adversarial = raw.get("adversarial_answer")
    return QA(
        question=raw["question"],
        answer=answer_text(raw.get("answer")),
        evidence=normalize_evidence(raw.get("evidence")),
        category=category,
        conv_id=conv_id,
        adversarial_answer=None if adversarial is None else answer_text(adversarial),
        question_id=f"{conv_id}/q{index}",
        question_type=CATEGORIES.get(category, str(category)),
    )


def parse_sample(sample: dict) -> Conversation:
    """One ``locomo10.json`` sample → :class:`Conversation`."""
    conv = sample["conversation"]
    sample_id = sample["sample_id"]
    summaries = sample.get("session_summary", {})
    sessions = []
    for n in _session_numbers(conv):
        date = conv.get(f"session_{n}_date_time", "")
        sessions.append(Session(idx=n, date=date,
                                turns=tuple(_turn(t, n, date) for t in conv[f"session_{n}"])))
    return Conversation(
        sample_id=sample_id,
        speaker_a=conv["speaker_a"],
        speaker_b=conv["speaker_b"],
        sessions=tuple(sessions),
        qas=tuple(_qa(q, sample_id, i) for i, q in enumerate(sample.get("qa", []))),
        observations=tuple(_observations(sample)),
        session_summaries=tuple(summaries.get(f"session_{s.idx}_summary", "") for s in sessions),
    )


def load_locomo(path: paths.PathLike | None = None, *, download: bool = False
                ) -> list[Conversation]:
    """Loads LoCoMo as a list of 10 :class:`Conversation` (all QAs, category 5 included).

    Args:
      path: explicit ``locomo10.json``; default: resolved by :func:`mr1.data.paths.resolve`
        (``$MR1_DATA_DIR``, then the cache).
      download: fetch into the cache when missing (network).
    """
    file = paths.resolve("locomo", path, download=download)
    data = paths.read_json(file)
    try:
        return [parse_sample(sample) for sample in data]
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise paths.DataFileError(
            f"{file} does not look like locomo10.json: {type(err).__name__}: {err}") from err


# --------------------------------------------------------------------------------------------
# Split and QA views
# --------------------------------------------------------------------------------------------

class LocomoSplit(NamedTuple):
    """Conversations of each split, their QAs already filtered."""

    train: tuple[Conversation, ...]
    validation: tuple[Conversation, ...]
    test: tuple[Conversation, ...]


def filter_qas(conv: Conversation, include_adversarial: bool = False) -> Conversation:
    """``conv`` with category-5 QAs removed (unless ``include_adversarial``)."""
    if include_adversarial:
        return conv
    return dataclasses.replace(conv, qas=tuple(q for q in conv.qas if q.category != ADVERSARIAL))


def split_locomo(convs: Iterable[Conversation], *, include_adversarial: bool = False,
                 train_ids: Sequence[str] = TRAIN_IDS,
                 validation_ids: Sequence[str] = VALIDATION_IDS) -> LocomoSplit:
    """Memory-R1's 1:1:8 split by conversation.

    Train ``conv-26`` (152 QAs), validation ``conv-30`` (81), test the other 8 (1,307:
    category 1: 239, 2: 258, 3: 83, 4: 727), with category 5 excluded unless
    ``include_adversarial``.
    """
    convs = [filter_qas(c, include_adversarial) for c in convs]
    known = {c.sample_id for c in convs}
    missing = (set(train_ids) | set(validation_ids)) - known
    if missing:
        raise ValueError(f"split ids {sorted(missing)} are not among the conversations "
                         f"{sorted(known)}")
    held = set(train_ids) | set(validation_ids)
    return LocomoSplit(
        train=tuple(c for c in convs if c.sample_id in train_ids),
        validation=tuple(c for c in convs if c.sample_id in validation_ids),
        test=tuple(c for c in convs if c.sample_id not in held),
    )


def all_qas(convs: Iterable[Conversation]) -> list[QA]:
    """Every QA of ``convs``, in conversation order."""
    return [q for c in convs for q in c.qas]
