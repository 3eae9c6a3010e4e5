"""Parsing the Memory Manager's text output into bank actions.

Two forms are understood:

* the paper's JSON (Mem0's update-memory format), possibly inside a json code fence or
  surrounded by prose::

    {"memory": [{"id": "3", "text": "...", "event": "UPDATE", "old_memory": "..."}]}

  ``event`` is one of ADD / UPDATE / DELETE / NONE (NOOP, NO-OP accepted), any case; a bare
  entry ``{"id": ..., "event": ...}`` or a list of entries is accepted too;
* a plain line form, op words in capitals at the start of a line (bullets allowed)::

    UPDATE 3: new text      ADD: text      DELETE 2      NOOP

Parsing never raises. Whatever is malformed -- no output, broken JSON, an entry that is not an
object, an unknown event, a missing or non-integer id, an id not among ``valid_ids`` (for UPDATE
and DELETE), empty text for ADD/UPDATE -- becomes a NOOP marked invalid with a :class:`Reason`.
:func:`ops_to_actions` turns parsed ops into the batched :class:`~mr1.memory.bank.MemoryAction`
the bank applies.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from mr1.memory.bank import MemoryAction, OpCode

MAX_JSON_CANDIDATES = 32  # '{' / '[' positions tried before giving up on JSON


class Reason(str, enum.Enum):
    """Why a parsed op is invalid (``OK``: it is valid)."""

    OK = "ok"
    EMPTY_OUTPUT = "empty_output"      # blank text
    NO_OPERATION = "no_operation"      # neither JSON nor an op line found
    BROKEN_JSON = "broken_json"        # looks like JSON, does not parse into the expected form
    BAD_STRUCTURE = "bad_structure"    # JSON parsed, but an entry / field has the wrong type
    UNKNOWN_EVENT = "unknown_event"    # event missing or not ADD/UPDATE/DELETE/NONE
    MISSING_ID = "missing_id"          # UPDATE/DELETE without an id
    BAD_ID = "bad_id"                  # id is not an integer
    UNKNOWN_ID = "unknown_id"          # id not among the valid ids
    EMPTY_TEXT = "empty_text"          # ADD/UPDATE with empty text


EVENTS: dict[str, OpCode] = {
    "ADD": OpCode.ADD,
    "UPDATE": OpCode.UPDATE,
    "DELETE": OpCode.DELETE,
    "NONE": OpCode.NOOP,
    "NOOP": OpCode.NOOP,
    "NO-OP": OpCode.NOOP,
    "NO_OP": OpCode.NOOP,
}
NEEDS_ID = frozenset({OpCode.UPDATE, OpCode.DELETE})
NEEDS_TEXT = frozenset({OpCode.ADD, OpCode.UPDATE})


@dataclasses.dataclass(frozen=True)
class ParsedOp:
    """One op. Invalid ops have ``op == NOOP``; ``event`` keeps what the model wrote."""

    op: OpCode
    id: int | None = None
    text: str = ""
    old_memory: str = ""
    valid: bool = True
    reason: Reason = Reason.OK
    event: str = ""


@dataclasses.dataclass(frozen=True)
class ParseResult:
    """All ops found in one output (at least one), in order, and which form was used."""

    ops: tuple[ParsedOp, ...]
    form: str  # "json" | "plain" | "none"

    @property
    def num_invalid(self) -> int:
        return sum(not op.valid for op in self.ops)

    @property
    def reasons(self) -> list[Reason]:
        return [op.reason for op in self.ops if not op.valid]

    @property
    def valid_ops(self) -> list[ParsedOp]:
        return [op for op in self.ops if op.valid]


def _invalid(reason: Reason, event: str = "", **kw) -> ParsedOp:
    return ParsedOp(op=OpCode.NOOP, valid=False, reason=reason, event=event, **kw)


_INT = re.compile(r"-?[0-9]+")


def _as_int(value) -> int | None:
    """An id as written: an int, an integral float, or a string that is an ASCII integer once
    whitespace and ``[]#()`` around it are stripped (``"3"``, ``"[3]"``, ``"#3"``); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        digits = value.strip().strip("[]#()").strip()
        return int(digits) if _INT.fullmatch(digits) else None
    return None


def _make_op(event: str, raw_id, text, old_memory, valid_ids: frozenset[int] | None
             ) -> ParsedOp:
    """Validates one (event, id, text) triple; every failure becomes an invalid NOOP."""
    op = EVENTS.get(event.strip().upper()) if isinstance(event, str) else None
    event_str = event if isinstance(event, str) else repr(event)
    if op is None:
        return _invalid(Reason.UNKNOWN_EVENT, event_str)
    if text is None:
        text = ""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str) or not isinstance(old_memory, str):
        return _invalid(Reason.BAD_STRUCTURE, event_str)
    text = text.strip()
    mem_id = None
    if op in NEEDS_ID:
        if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
            return _invalid(Reason.MISSING_ID, event_str)
        mem_id = _as_int(raw_id)
        if mem_id is None:
            return _invalid(Reason.BAD_ID, event_str)
        if valid_ids is not None and mem_id not in valid_ids:
            return _invalid(Reason.UNKNOWN_ID, event_str, id=mem_id)
    if op in NEEDS_TEXT and not text:
        return _invalid(Reason.EMPTY_TEXT, event_str, id=mem_id)
    return ParsedOp(op=op, id=mem_id, text=text if op in NEEDS_TEXT else "",
                    old_memory=old_memory, event=event_str)


# ----------------------------------------------------------------------------- JSON form

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\r?\n?(.*?)```", re.DOTALL)


def _entries(obj) -> list | None:
    """The op entries of a decoded JSON value, or None if it is not an op container."""
    if isinstance(obj, dict):
        if "memory" in obj:
            mem = obj["memory"]
            return mem if isinstance(mem, list) else [mem]
        if "event" in obj:
            return [obj]
        return None
    if isinstance(obj, list) and obj and all(isinstance(e, dict) and "event" in e for e in obj):
        return obj
    return None


def _find_json(text: str) -> tuple[list | None, bool]:
    """(entries of the first op container found, whether any JSON-looking text was seen)."""
    decoder = json.JSONDecoder()
    chunks = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    looked = False
    tries = 0
    for chunk in chunks:
        for m in re.finditer(r"[\[{]", chunk):
            looked = True
            tries += 1
            if tries > MAX_JSON_CANDIDATES:
                return None, looked
            try:
                obj, _ = decoder.raw_decode(chunk, m.start())
            except (ValueError, RecursionError):
                continue
            entries = _entries(obj)
            if entries is not None:
                return entries, looked
    return None, looked


def _parse_json_entries(entries: list, valid_ids) -> list[ParsedOp]:
    ops = []
    for e in entries:
        if not isinstance(e, dict):
            ops.append(_invalid(Reason.BAD_STRUCTURE))
            continue
        ops.append(_make_op(e.get("event"), e.get("id"), e.get("text", ""),
                            e.get("old_memory", "") or "", valid_ids))
    return ops or [ParsedOp(op=OpCode.NOOP, event="")]  # {"memory": []}: nothing to do


# ----------------------------------------------------------------------------- plain form

_OP_WORDS = "|".join(sorted((re.escape(k) for k in EVENTS), key=len, reverse=True))
_PLAIN = re.compile(rf"^[ \t>*\-•]*(?:\d+[.)][ \t]*)?\**({_OP_WORDS})\**(?![\w-])(.*)$",
                    re.MULTILINE)
_ID_TOKEN = re.compile(r"\s*([\[#(]*\s*-?\w+\s*[\])]*)\s*(?::\s*(.*))?$", re.DOTALL)


def _parse_plain_line(word: str, rest: str, valid_ids) -> ParsedOp:
    op = EVENTS[word]
    rest = rest.strip()
    if op == OpCode.NOOP:
        return _make_op(word, None, "", "", valid_ids)
    if rest.startswith(":"):
        return _make_op(word, None, rest[1:], "", valid_ids)
    if op == OpCode.ADD:  # "ADD text" or "ADD 4: text" (an id given to ADD is ignored)
        m = re.match(r"\[?#?\d+\]?\s*:\s*(.*)$", rest, re.DOTALL)
        return _make_op(word, None, m.group(1) if m else rest, "", valid_ids)
    m = _ID_TOKEN.match(rest)
    if m is None:  # UPDATE / DELETE whose first token is not an id
        first, _, tail = rest.partition(" ")
        return _make_op(word, first or None, tail, "", valid_ids)
    return _make_op(word, m.group(1), m.group(2) or "", "", valid_ids)


def _parse_plain(text: str, valid_ids) -> list[ParsedOp]:
    ops = []
    for m in _PLAIN.finditer(text):
        word, rest = m.group(1), m.group(2)
        if rest and not rest[0].isspace() and rest[0] not in ":[#(":
            continue  # e.g. "ADDITIONAL": not an op word
        ops.append(_parse_plain_line(word, rest, valid_ids))
    return ops


# ----------------------------------------------------------------------------- entry point

def parse_ops(text: str, valid_ids: Iterable[int | str] | None = None) -> ParseResult:
    """Parses a Memory Manager output. Never raises.

    Args:
      text: the model's output.
      valid_ids: ids of the memories shown to the model (ints or digit strings); UPDATE/DELETE
        of any other id is invalid. None: do not check ids.
    """
    try:
        if not isinstance(text, str):
            return ParseResult((_invalid(Reason.NO_OPERATION),), "none")
        ids = None
        if valid_ids is not None:
            ids = frozenset(i for i in (_as_int(v) for v in valid_ids) if i is not None)
        if not text.strip():
            return ParseResult((_invalid(Reason.EMPTY_OUTPUT),), "none")
        entries, looked_like_json = _find_json(text)
        if entries is not None:
            return ParseResult(tuple(_parse_json_entries(entries, ids)), "json")
        plain = _parse_plain(text, ids)
        if plain:
            return ParseResult(tuple(plain), "plain")
        reason = Reason.BROKEN_JSON if looked_like_json else Reason.NO_OPERATION
        return ParseResult((_invalid(reason),), "none")
    except Exception:  # noqa: BLE001 -- the contract is: never raise; count it instead
        return ParseResult((_invalid(Reason.BROKEN_JSON),), "none")


# ----------------------------------------------------------------------------- to actions

def ops_to_actions(ops: Sequence[ParsedOp] | ParseResult, tokenize: Callable[[str], Sequence[int]],
                   *, max_len: int, dim: int, num_ops: int | None = None,
                   embed: Callable[[list[str]], np.ndarray] | None = None, speaker: int = 0,
                   pad_id: int = 0, id_to_slot: Mapping[int, int] | None = None
                   ) -> MemoryAction:
    """Turns parsed ops into a batched :class:`MemoryAction` with leaves ``[N, ...]``.

    Invalid ops become NOOP actions. Text is tokenised with ``tokenize`` (str -> ids) and
    its tokens truncated to ``max_len`` (``length`` keeps the full count, so the bank reports
    the truncation in ``OpResult.truncated``); ``embed`` (list of str -> ``[n, dim]``, e.g.
    ``Embedder.encode``) embeds the ADD/UPDATE texts in one call (zeros if None).
    ``id_to_slot`` maps the ids the model saw to bank slots (identity if None; an id it lacks
    becomes target -1, which the bank refuses). ``num_ops`` pads with NOOPs or truncates
    (default: ``len(ops)``, at least 1).
    """
    ops = list(ops.ops if isinstance(ops, ParseResult) else ops)
    n = max(1, len(ops)) if num_ops is None else num_ops
    ops = ops[:n]
    op = np.zeros((n,), np.int32)
    target = np.full((n,), -1, np.int32)
    tokens = np.full((n, max_len), pad_id, np.int32)
    length = np.zeros((n,), np.int32)
    emb = np.zeros((n, dim), np.float32)
    texts, rows = [], []
    for i, p in enumerate(ops):
        if not p.valid:
            continue
        op[i] = int(p.op)
        if p.id is not None:
            target[i] = p.id if id_to_slot is None else id_to_slot.get(p.id, -1)
        if p.op in NEEDS_TEXT:
            ids = np.asarray(list(tokenize(p.text)), np.int32)
            tokens[i, : min(ids.size, max_len)] = ids[:max_len]
            length[i] = ids.size   # untruncated: the bank reports a text over max_len
            texts.append(p.text)
            rows.append(i)
    if embed is not None and texts:
        emb[rows] = np.asarray(embed(texts), np.float32)
    return MemoryAction(op=op, target=target, tokens=tokens, length=length, embedding=emb,
                        speaker=np.full((n,), speaker, np.int32))


# ----------------------------------------------------------------------------- one-word choices

# The "op" manager form: the model picks the op as one constrained word (its first token); the
# op's target and text follow from the fact (see :func:`choice_to_op`).
OP_CHOICE_WORDS: dict[str, OpCode] = {"ADD": OpCode.ADD, "UPDATE": OpCode.UPDATE,
                                      "DELETE": OpCode.DELETE, "NONE": OpCode.NOOP}


def op_choice_tokens(tokenize: Callable[[str], Sequence[int]]) -> tuple[int, ...]:
    """The first token of each :data:`OP_CHOICE_WORDS` word (what a constrained sampler may
    emit); they must differ."""
    firsts = tuple(int(list(tokenize(w))[0]) for w in OP_CHOICE_WORDS)
    if len(set(firsts)) != len(firsts):
        raise ValueError(f"the op words {list(OP_CHOICE_WORDS)} share a first token {firsts}; "
                         "this tokenizer cannot use the 'op' manager form")
    return firsts


def choice_to_op(op: OpCode, fact: str, shown: Sequence[str]) -> ParsedOp:
    """The full op of a one-word choice: ADD writes the fact; UPDATE merges it into the most
    similar shown memory (id 0: ``"<memory>; <fact>"``); DELETE removes that memory; NONE is
    NOOP. UPDATE/DELETE with nothing shown is invalid (``UNKNOWN_ID``)."""
    if op == OpCode.ADD:
        return _make_op("ADD", None, fact, "", None)
    if op == OpCode.NOOP:
        return ParsedOp(op=OpCode.NOOP, event="NONE")
    if not shown:
        return _invalid(Reason.UNKNOWN_ID, event=op.name)
    if op == OpCode.UPDATE:
        return _make_op("UPDATE", 0, f"{shown[0]}; {fact}", shown[0], None)
    return _make_op("DELETE", 0, "", shown[0], None)


def parse_op_choice(text: str, fact: str, shown: Sequence[str]) -> ParsedOp:
    """Parses a one-word op choice (case-insensitive; a prefix such as the first token "N" of
    "NONE" counts) into the op :func:`choice_to_op` gives. Never raises."""
    word = (text or "").strip().split()[0].upper() if (text or "").strip() else ""
    if not word:
        return _invalid(Reason.EMPTY_OUTPUT)
    matches = [op for w, op in OP_CHOICE_WORDS.items() if w.startswith(word) or word.startswith(w)]
    if len(matches) != 1:
        return _invalid(Reason.UNKNOWN_EVENT, event=word)
    return choice_to_op(matches[0], fact, shown)
