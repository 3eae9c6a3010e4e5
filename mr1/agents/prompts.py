"""Prompts of the two Memory-R1 agents, written for this project in the spirit of the paper.

* :data:`FACT_EXTRACTION` -- turns one dialogue turn (or a session chunk) into short,
  self-contained facts, one per line, each carrying the session date;
* :data:`MEMORY_MANAGER` -- shows one new fact and the related memories (with ids) and asks for
  the paper's (Mem0's) JSON ``{"memory": [{"id", "text", "event", "old_memory"}]}``;
  :data:`MEMORY_MANAGER_LINE` asks for the same op as one line (``ADD: text``,
  ``UPDATE <id>: text``, ``DELETE <id>``, ``NONE``); :data:`MEMORY_MANAGER_OP` asks for the op
  word only (sampled constrained to the four words; :func:`mr1.memory.ops.choice_to_op` derives
  the target and text), the form a 135M model can learn on a CPU; :data:`MANAGER_FORMS` names
  each form with how its reply is read, ``"json_op"`` being the JSON prompt with the reply
  forced up to the ``event`` value and the op word constrained;
* :data:`ANSWER_AGENT` -- shows the retrieved memories of each speaker with timestamps and asks
  the model to first list the relevant ones (memory distillation), then a final line
  ``**Answer:** <short answer>`` of under 6 words; :data:`ANSWER_AGENT_DIRECT` shows the same
  memories and asks for the answer line only (the paper's "without memory distillation"
  ablation). :data:`ANSWER_PROMPTS` names the two forms (``"distill"``, ``"direct"``).

The judge prompt lives in :mod:`mr1.eval.judge`. Prompts are kept short on purpose: on CPU the
prefill dominates the cost (see DESIGN.md §5).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

ANSWER_MARKER = "**Answer:**"

FACT_EXTRACTION = """Extract the facts worth remembering about the speaker from this message \
of a conversation on {date}.
Write each fact as one short sentence naming the speaker and, where it matters, the date. \
Write one fact per line. If there is nothing worth remembering, write NONE.

{speaker}: {text}

Facts:"""

MEMORY_MANAGER = """You manage the memory of {speaker}. Compare the new fact with the existing \
memories and choose one operation:
ADD: the fact is new information; UPDATE: it adds to or changes memory <id> (give the merged \
text); DELETE: it contradicts memory <id>; NONE: it is already known.

Existing memories:
{memories}

New fact: {fact}

Reply with JSON only, for example:
{{"memory": [{{"id": "0", "text": "...", "event": "UPDATE", "old_memory": "..."}}]}}"""

_ANSWER_MEMORIES = """You answer a question about a conversation between {speaker_a} and \
{speaker_b}, using their memories.

Memories of {speaker_a}:
{memories_a}

Memories of {speaker_b}:
{memories_b}

Question: {question}
"""  # the memories layout both Answer Agent prompts share

ANSWER_AGENT = _ANSWER_MEMORIES + """First list the memories that are relevant to the question. \
Then write one final line:
{marker} <answer in under 6 words>"""


def format_memories(items: Sequence[tuple[int | str, str]], empty: str = "(none)") -> str:
    """``[id] text`` lines for the Memory Manager, or ``empty``."""
    return "\n".join(f"[{i}] {t}" for i, t in items) if items else empty


def format_timed_memories(items: Sequence[tuple[str, str]], empty: str = "(none)") -> str:
    """``- [timestamp] text`` lines for the Answer Agent (timestamp may be ""), or ``empty``."""
    if not items:
        return empty
    return "\n".join(f"- [{ts}] {t}" if ts else f"- {t}" for ts, t in items)


def fact_extraction_prompt(speaker: str, text: str, date: str) -> str:
    return FACT_EXTRACTION.format(speaker=speaker, text=text, date=date or "an unknown date")


MEMORY_MANAGER_LINE = """You manage the memory of {speaker}. Compare the new fact with the \
existing memories and choose one operation.

Existing memories:
{memories}

New fact: {fact}

Reply with exactly one line, one of:
ADD: <the new fact>
UPDATE <id>: <memory <id> merged with the new fact>
DELETE <id>
NONE"""

MEMORY_MANAGER_OP = """You manage the memory of {speaker}. Compare the new fact with the \
existing memories, most similar first.

Existing memories:
{memories}

New fact: {fact}

Reply with one word: ADD if the fact is new information, UPDATE if it adds to memory [0] \
(they are merged), DELETE if it contradicts memory [0], NONE if it is already known."""

MEMORY_MANAGER_OP_BUDGET = """You manage the memory of {speaker}. It holds {used} of at most \
{capacity} memories; when it is full, ADD is refused. Compare the new fact with the existing \
memories, most similar first.

Existing memories:
{memories}

New fact: {fact}

Reply with one word: ADD to store the fact as a new memory, UPDATE to merge it into memory \
[0], DELETE to remove memory [0] (it is wrong or outdated), NONE to keep the fact out (already \
known or not worth a slot)."""  # the "op" form plus the budget (issue 20: memory under a budget)

JSON_EVENT_PREFIX = '{"memory": [{"event": "'  # the "json_op" reply, up to the op word


@dataclasses.dataclass(frozen=True)
class ManagerForm:
    """How the Memory Manager is asked and how its reply is read.

    ``prompt``: the user message; ``choice``: the reply is one op word sampled from the four
    op words only (:func:`mr1.memory.ops.op_choice_tokens`; UPDATE / DELETE act on memory
    ``[0]``, the most similar, :func:`mr1.memory.ops.choice_to_op`), else free text parsed by
    :func:`mr1.memory.ops.parse_ops`; ``reply_prefix``: text the reply is forced to start
    with (appended after the chat template's assistant header), so the op word is the model's
    next token there; ``mask_full_add``: a choice form whose fact, when its bank is full at the
    session's start under the ``refuse`` policy, chooses among UPDATE / DELETE / NONE only (the
    env would refuse the ADD: invalid-action masking, :func:`mr1.memory.ops.op_choice_groups`).
    """

    prompt: str
    choice: bool = False
    reply_prefix: str = ""
    mask_full_add: bool = False


MANAGER_FORMS: dict[str, ManagerForm] = {
    "json": ManagerForm(MEMORY_MANAGER),              # the paper's (Mem0's) JSON reply
    "line": ManagerForm(MEMORY_MANAGER_LINE),         # one op line
    "op": ManagerForm(MEMORY_MANAGER_OP, choice=True),  # one op word, its own short prompt
    # the "op" form that also sees how full the bank is (``used`` / ``capacity``)
    "op_budget": ManagerForm(MEMORY_MANAGER_OP_BUDGET, choice=True),
    # "op_budget" where a full bank's fact cannot choose ADD (UPDATE / DELETE / NONE only)
    "op_budget_mask": ManagerForm(MEMORY_MANAGER_OP_BUDGET, choice=True, mask_full_add=True),
    # the paper's JSON prompt, its reply forced to '{"memory": [{"event": "' and the event
    # constrained to an op word: the prompted JSON manager with every reply a valid op
    "json_op": ManagerForm(MEMORY_MANAGER, choice=True, reply_prefix=JSON_EVENT_PREFIX),
}
MANAGER_PROMPTS = {name: form.prompt for name, form in MANAGER_FORMS.items()}


def manager_form(name: str) -> ManagerForm:
    """The :data:`MANAGER_FORMS` entry ``name`` (ValueError names the choices)."""
    if name not in MANAGER_FORMS:
        raise ValueError(f"manager prompt form must be one of {sorted(MANAGER_FORMS)}, "
                         f"got {name!r}")
    return MANAGER_FORMS[name]


def memory_manager_prompt(speaker: str, fact: str, memories: Sequence[tuple[int | str, str]],
                          form: str = "json", *, used: int | None = None,
                          capacity: int | None = None) -> str:
    """The Memory Manager prompt (the user message); ``form`` is a key of
    :data:`MANAGER_FORMS`. ``used`` / ``capacity`` (memories in the speaker's bank, its
    slots) fill a form that shows the budget ("op_budget"); the other forms ignore them."""
    template = manager_form(form).prompt
    if "{capacity}" in template and (used is None or capacity is None):
        raise ValueError(f"manager form {form!r} shows the budget: pass used= and capacity=")
    return template.format(speaker=speaker, fact=fact, memories=format_memories(memories),
                           used=used, capacity=capacity)


ANSWER_AGENT_DIRECT = _ANSWER_MEMORIES + """Reply with one line only:
{marker} <answer in under 6 words>"""

ANSWER_PROMPTS = {"distill": ANSWER_AGENT, "direct": ANSWER_AGENT_DIRECT}


def answer_form(distill: bool) -> str:
    """The :data:`ANSWER_PROMPTS` key of a ``distill`` switch (``answer.distill`` in configs)."""
    return "distill" if distill else "direct"


def answer_prompt(question: str, speaker_a: str, speaker_b: str,
                  memories_a: Sequence[tuple[str, str]],
                  memories_b: Sequence[tuple[str, str]], form: str = "distill") -> str:
    """The Answer Agent prompt; ``form`` is a key of :data:`ANSWER_PROMPTS` (``"distill"``:
    list the relevant memories, then the answer line; ``"direct"``: the answer line only)."""
    if form not in ANSWER_PROMPTS:
        raise ValueError(f"answer prompt form must be one of {sorted(ANSWER_PROMPTS)}, "
                         f"got {form!r}")
    return ANSWER_PROMPTS[form].format(speaker_a=speaker_a, speaker_b=speaker_b,
                                       question=question,
                                       memories_a=format_timed_memories(memories_a),
                                       memories_b=format_timed_memories(memories_b),
                                       marker=ANSWER_MARKER)


CONTEXT_ANSWER = """You answer a question about a conversation between {speaker_a} and \
{speaker_b}.

Conversation excerpts:
{context}

Question: {question}
First list the lines that are relevant to the question. Then write one final line:
{marker} <answer in under 6 words>"""


def context_answer_prompt(question: str, speaker_a: str, speaker_b: str, context: str) -> str:
    """Answer prompt over raw dialogue lines (the RAG and full-context baselines)."""
    return CONTEXT_ANSWER.format(speaker_a=speaker_a, speaker_b=speaker_b, question=question,
                                 context=context or "(none)", marker=ANSWER_MARKER)
