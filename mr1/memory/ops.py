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
and DELETE), empty text for ADD/UPDATE -- becomes a NOOP marked invalid with a :class:`Reason`,
and only that op: a bad field of one entry never drops the other entries of the reply.
:func:`ops_to_actions` turns parsed ops into the batched :class:`~mr1.memory.bank.MemoryAction`
the bank applies; an id outside the int32 range becomes target -1 (the bank refuses it).

Hardening against what a sampled reply can hold:

* the reply's LAST complete op container wins (a model that quotes an example op in its prose
  before its real JSON is read by its real JSON); containers nested inside another are not
  candidates;
* at most :data:`MAX_OPS_PER_REPLY` ops are kept; the rest are dropped and counted
  (``ParseResult.dropped``, reason ``too_many_ops``);
* every regex runs in linear time (possessive quantifiers where a backtracking pattern was
  quadratic) and at most :data:`MAX_REPLY_CHARS` characters are read.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from mr1.memory.bank import MemoryAction, OpCode

MAX_JSON_CANDIDATES = 32  # '{' / '[' positions that failed to decode before giving up on JSON
MAX_OPS_PER_REPLY = 64    # ops kept from one reply; the rest are dropped and counted
MAX_REPLY_CHARS = 1 << 17  # characters of a reply parsed (a guard: the regexes are linear)
MAX_ID_DIGITS = 18        # longer digit strings are not ids (int() of 4300+ digits raises)
INT32_MAX = 2**31 - 1


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
    TOO_MANY_OPS = "too_many_ops"      # ops beyond MAX_OPS_PER_REPLY (dropped, not in ops)


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
    dropped: int = 0  # ops beyond MAX_OPS_PER_REPLY, left out of ``ops``

    @property
    def num_invalid(self) -> int:
        """Invalid ops plus dropped ones."""
        return sum(not op.valid for op in self.ops) + self.dropped

    @property
    def reasons(self) -> list[Reason]:
        """The reason of every invalid op, then ``TOO_MANY_OPS`` once per dropped op."""
        dropped = [Reason.TOO_MANY_OPS] * self.dropped
        return [op.reason for op in self.ops if not op.valid] + dropped

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
        if len(digits.lstrip("-").lstrip("0")) > MAX_ID_DIGITS:
            return None  # not an id anyone was shown (and int() of 4300+ digits raises)
        return int(digits) if _INT.fullmatch(digits) else None
    return None


def _make_op(event: str, raw_id, text, old_memory, valid_ids: frozenset[int] | None
             ) -> ParsedOp:
    """Validates one (event, id, text) triple; every failure becomes an invalid NOOP (of this
    op only: an unexpected error in one field is this op's ``BAD_STRUCTURE``)."""
    try:
        return _check_op(event, raw_id, text, old_memory, valid_ids)
    except Exception:  # noqa: BLE001 -- one bad field invalidates its op, never the reply
        return _invalid(Reason.BAD_STRUCTURE, event if isinstance(event, str) else "")


def _check_op(event, raw_id, text, old_memory, valid_ids) -> ParsedOp:
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

_OPENER = re.compile(r"[\[{]")


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
    """(entries of the LAST top-level op container in ``text``, whether any JSON-looking text
    was seen).

    Candidates are the ``{`` / ``[`` positions left to right; a value that decodes is skipped
    over whole (what is nested in it is not a candidate), so code fences, prose and quoted
    examples need no special case: the last complete container is the reply's answer.
    """
    decoder = json.JSONDecoder()
    looked, failures, found = False, 0, None
    pos = 0
    while (m := _OPENER.search(text, pos)) is not None:
        looked = True
        try:
            obj, end = decoder.raw_decode(text, m.start())
        except (ValueError, RecursionError):
            failures += 1
            if failures > MAX_JSON_CANDIDATES:
                break
            pos = m.start() + 1
            continue
        entries = _entries(obj)
        if entries is not None:
            found = entries
        pos = end  # nested values are not candidates
    return found, looked


def _parse_json_entries(entries: list, valid_ids) -> list[ParsedOp]:
    ops = []
    for e in entries[:MAX_OPS_PER_REPLY]:
        if not isinstance(e, dict):
            ops.append(_invalid(Reason.BAD_STRUCTURE))
            continue
        ops.append(_make_op(e.get("event"), e.get("id"), e.get("text", ""),
                            e.get("old_memory", "") or "", valid_ids))
    return ops or [ParsedOp(op=OpCode.NOOP, event="")]  # {"memory": []}: nothing to do


# ----------------------------------------------------------------------------- plain form

_OP_WORDS = "|".join(sorted((re.escape(k) for k in EVENTS), key=len, reverse=True))
# Possessive quantifiers (``*+``): the classes they separate are disjoint, so nothing a
# backtracking match could find is lost, and a run of spaces or stars is read once, not once
# per start position ("UPDATE a" + 8000 spaces + "b" took 1 s with the backtracking pattern).
_PLAIN = re.compile(
    rf"^[ \t>*\-•]*+(?:\d++[.)][ \t]*+)?\**+({_OP_WORDS})\**+(?![\w-])(.*)$", re.MULTILINE)
_ID_TOKEN = re.compile(r"\s*+([\[#(]*+\s*+-?\w++\s*+[\])]*+)\s*+(?::\s*+(.*))?$",
                       re.DOTALL)
_ADD_ID = re.compile(r"\[?#?\d++\]?\s*+:\s*+(.*)$", re.DOTALL)


def _parse_plain_line(word: str, rest: str, valid_ids) -> ParsedOp:
    op = EVENTS[word]
    rest = rest.strip()
    if op == OpCode.NOOP:
        return _make_op(word, None, "", "", valid_ids)
    if rest.startswith(":"):
        return _make_op(word, None, rest[1:], "", valid_ids)
    if op == OpCode.ADD:  # "ADD text" or "ADD 4: text" (an id given to ADD is ignored)
        m = _ADD_ID.match(rest)
        return _make_op(word, None, m.group(1) if m else rest, "", valid_ids)
    m = _ID_TOKEN.match(rest)
    if m is None:  # UPDATE / DELETE whose first token is not an id
        first, _, tail = rest.partition(" ")
        return _make_op(word, first or None, tail, "", valid_ids)
    return _make_op(word, m.group(1), m.group(2) or "", "", valid_ids)


def _op_lines(text: str) -> Iterable[tuple[str, str]]:
    """``(op word, rest of the line)`` of every plain-form op line."""
    for m in _PLAIN.finditer(text):
        word, rest = m.group(1), m.group(2)
        if rest and not rest[0].isspace() and rest[0] not in ":[#(":
            continue  # e.g. "ADDITIONAL": not an op word
        yield word, rest


def _parse_plain(text: str, valid_ids) -> list[ParsedOp]:
    ops = []
    for word, rest in _op_lines(text):
        try:
            ops.append(_parse_plain_line(word, rest, valid_ids))
        except Exception:  # noqa: BLE001 -- this line's op is invalid, the others stand
            ops.append(_invalid(Reason.BAD_STRUCTURE, word))
        if len(ops) > MAX_OPS_PER_REPLY:
            break  # one past the cap: enough to know ops were dropped
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
        text = text[:MAX_REPLY_CHARS]
        entries, looked_like_json = _find_json(text)
        if entries is not None:
            return ParseResult(tuple(_parse_json_entries(entries, ids)), "json",
                               dropped=max(0, len(entries) - MAX_OPS_PER_REPLY))
        plain = _parse_plain(text, ids)
        if plain:
            return _capped(plain, text)
        reason = Reason.BROKEN_JSON if looked_like_json else Reason.NO_OPERATION
        return ParseResult((_invalid(reason),), "none")
    except Exception:  # noqa: BLE001 -- the contract is: never raise; count it instead
        return ParseResult((_invalid(Reason.BROKEN_JSON),), "none")


def _capped(plain: list[ParsedOp], text: str) -> ParseResult:
    """The plain-form result, at most :data:`MAX_OPS_PER_REPLY` ops; the op lines beyond the
    cap are counted (not parsed) as ``dropped``."""
    if len(plain) <= MAX_OPS_PER_REPLY:
        return ParseResult(tuple(plain), "plain")
    total = sum(1 for _ in _op_lines(text))
    return ParseResult(tuple(plain[:MAX_OPS_PER_REPLY]), "plain",
                       dropped=total - MAX_OPS_PER_REPLY)


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
    (default: ``len(ops)``, at least 1). Never raises on an op's id: one outside
    ``[0, 2**31 - 1]`` becomes target -1.
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
        if p.id is not None:  # an id outside int32 (or unmapped) is target -1: refused
            slot = p.id if id_to_slot is None else id_to_slot.get(p.id, -1)
            target[i] = slot if isinstance(slot, (int, np.integer)) and 0 <= slot <= INT32_MAX \
                else -1
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


#: What a masked choice form offers a fact whose bank is full under ``refuse``: an ADD there
#: would be refused, so it is not a choice (invalid-action masking).
FULL_BANK_CHOICE_WORDS: tuple[str, ...] = ("UPDATE", "DELETE", "NONE")


def op_choice_tokens(tokenize: Callable[[str], Sequence[int]],
                     words: Iterable[str] = tuple(OP_CHOICE_WORDS)) -> tuple[int, ...]:
    """The first token of each op word in ``words`` (default: all of
    :data:`OP_CHOICE_WORDS`; what a constrained sampler may emit); they must differ."""
    words = list(words)
    firsts = tuple(int(list(tokenize(w))[0]) for w in words)
    if len(set(firsts)) != len(firsts):
        raise ValueError(f"the op words {words} share a first token {firsts}; "
                         "this tokenizer cannot use the 'op' manager form")
    return firsts


def op_choice_groups(tokenize: Callable[[str], Sequence[int]], full: Sequence[bool]
                     ) -> list[tuple[np.ndarray, tuple[int, ...]]]:
    """Prompts grouped by the op words they may choose, as ``(prompt indices, tokens)``:
    those with ``full`` set among :data:`FULL_BANK_CHOICE_WORDS`, the others among all four
    words; empty groups are left out. Every prompt is in exactly one group."""
    full = np.asarray(full, bool).reshape(-1)
    groups = [(np.flatnonzero(~full), op_choice_tokens(tokenize)),
              (np.flatnonzero(full), op_choice_tokens(tokenize, FULL_BANK_CHOICE_WORDS))]
    return [(idx, toks) for idx, toks in groups if idx.size]


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
