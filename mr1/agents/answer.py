"""The Answer Agent: retrieve each speaker's top-k memories, distil, answer (Memory-R1 §3.2).

For a batch of questions about one conversation, the question embeddings are matched against
each speaker's bank in one :func:`~mr1.memory.bank.retrieve_many` call per bank, the prompts
(:data:`~mr1.agents.prompts.ANSWER_AGENT`) are built with the memories' session timestamps, and
ONE batched ``generate`` call answers the batch. :func:`parse_answer` reads the distilled
memories and the ``**Answer:**`` line; when the line is missing the last non-empty line is used
and the result is flagged ``answer_line_missing`` (never an exception). ``distill=False``
(config ``answer.distill``) drops the distillation step -- the paper's "without memory
distillation" ablation: the prompt (:data:`~mr1.agents.prompts.ANSWER_AGENT_DIRECT`) shows the
same memories but asks for the answer line only, so a compliant output distils nothing
(``distilled == ()``).

The RAG and full-context baselines (:func:`rag_prompts`, :func:`full_context_prompts`) build
prompts over raw dialogue turns and share the same generation and parsing.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mr1.agents import prompts as P
from mr1.agents.pipeline import ConversationMemory, _retrieve_many
from mr1.data.records import Conversation, QA

# The marker is ``\**\s*answer\s*\**\s*:\s*\**`` (any case), found in linear time: the word
# "answer" is searched, the tail matched with possessive quantifiers, and the leading stars and
# spaces taken by walking back (a backtracking search of the whole pattern restarts at every
# space of a long run: 8,000 spaces took 0.3 s).
_ANSWER_WORD = re.compile(r"answer", re.IGNORECASE)
_MARKER_TAIL = re.compile(r"\s*+\**+\s*+:\s*+\**+")
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*")


@dataclasses.dataclass(frozen=True)
class ParsedAnswer:
    answer: str
    distilled: tuple[str, ...]
    answer_line_missing: bool


def _markers(text: str) -> list[tuple[int, int]]:
    """Non-overlapping ``(start, end)`` spans of answer markers, left to right (what
    ``re.finditer`` of the marker pattern gives)."""
    spans: list[tuple[int, int]] = []
    lo = 0
    for m in _ANSWER_WORD.finditer(text):
        if m.start() < lo:
            continue
        tail = _MARKER_TAIL.match(text, m.end())
        if tail is None:
            continue
        start = m.start()
        while start > lo and text[start - 1].isspace():
            start -= 1
        while start > lo and text[start - 1] == "*":
            start -= 1
        spans.append((start, tail.end()))
        lo = tail.end()
    return spans


def _strip_markers(line: str) -> str:
    out, pos = [], 0
    for a, b in _markers(line):
        out.append(line[pos:a])
        pos = b
    return "".join(out) + line[pos:]


def _clean(s: str) -> str:
    s = s.strip().strip("*").strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        s = s[1:-1].strip()
    return s


def parse_answer(text: str | None) -> ParsedAnswer:
    """Splits an Answer Agent output into distilled memories and the short answer. Never raises.

    The last ``Answer:`` marker (``**Answer:**``, ``Answer:``, ``**Answer**:``, any case) wins;
    its answer is the rest of that line, or the next non-empty line when the rest is empty.
    Without a marker the answer is the last non-empty line and ``answer_line_missing`` is True.
    """
    text = text if isinstance(text, str) else ""
    matches = _markers(text)
    if matches:
        start, end = matches[-1]
        before, after = text[:start], text[end:]
        lines = after.splitlines()
        first = _clean(lines[0]) if lines else ""
        if not first:
            first = next((_clean(line) for line in lines[1:] if _clean(line)), "")
        distilled = tuple(x for x in (_clean(_BULLET.sub("", _strip_markers(line)))
                                      for line in before.splitlines()) if x)
        return ParsedAnswer(first, distilled, False)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return ParsedAnswer("", (), True)
    distilled = tuple(x for x in (_clean(_BULLET.sub("", line)) for line in lines[:-1]) if x)
    return ParsedAnswer(_clean(_BULLET.sub("", lines[-1])), distilled, True)


@dataclasses.dataclass(frozen=True)
class AnswerResult:
    question: str
    prompt: str
    output: str
    answer: str
    distilled: tuple[str, ...]
    answer_line_missing: bool


class AnswerAgent:
    """Answers questions from memories or raw context with one ``generate`` call per batch.

    Args:
      policy: the answering LLM.
      embedder: ``encode(list[str]) -> [N, D]`` (questions; RAG turns).
      top_k: memories retrieved per speaker (paper: 30; CPU configs fewer).
      max_new_tokens: answer budget (distillation + answer line).
      batch_size: prompts per generate call.
      generate_fn: ``mr1.sampling.generate`` or a stand-in with its signature (tests).
      distill: True (paper): the prompt asks to list the relevant memories before the answer
        line; False: the answer line only (the "without memory distillation" ablation).
      share_prefix: the prompts of a batch share a long prefix (one conversation's full
        context): ``generate`` prefills it once (``mr1.sampling``, ``share_prefix=True``).
    """

    def __init__(self, policy, embedder, *, top_k: int = 30, max_new_tokens: int = 96,
                 batch_size: int = 16, temperature: float = 0.0, seed: int = 0,
                 generate_fn: Callable | None = None, distill: bool = True,
                 share_prefix: bool = False):
        self.policy, self.embedder = policy, embedder
        self.top_k, self.max_new_tokens, self.batch_size = top_k, max_new_tokens, batch_size
        self.temperature, self.seed = temperature, seed
        self.distill = bool(distill)
        self.share_prefix = bool(share_prefix)
        self.prompt_form = P.answer_form(self.distill)   # a key of P.ANSWER_PROMPTS
        if generate_fn is None:
            from mr1.sampling import generate as generate_fn
        self.generate = generate_fn

    # -- prompts
    def memory_prompts(self, conv: Conversation, memory: ConversationMemory,
                       questions: Sequence[str]) -> list[str]:
        """Answer prompts with each speaker's top-k memories (best first), in the agent's
        :attr:`prompt_form` (with or without the distillation step)."""
        q = jnp.asarray(np.asarray(self.embedder.encode(list(questions)), np.float32))
        per_speaker = []
        for name in (conv.speaker_a, conv.speaker_b):
            mem = memory.by_name(name)
            if mem is None or not bool(np.asarray(mem.bank.valid).any()):
                per_speaker.append([[] for _ in questions])
                continue
            r = jax.device_get(_retrieve_many(mem.bank, q, self.top_k))
            per_speaker.append([[(mem.timestamps[s], mem.texts[s] or "")
                                 for s, ok in zip(r.indices[j], r.mask[j]) if ok]
                                for j in range(len(questions))])
        return [P.answer_prompt(qs, conv.speaker_a, conv.speaker_b, a, b, form=self.prompt_form)
                for qs, a, b in zip(questions, *per_speaker)]

    # -- generation
    def answer_prompts(self, prompts: Sequence[str], questions: Sequence[str] | None = None
                       ) -> list[AnswerResult]:
        questions = list(questions) if questions is not None else [""] * len(prompts)
        outs: list[str] = []
        for s in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[s:s + self.batch_size])
            kw = {"share_prefix": True} if self.share_prefix else {}
            res = self.generate(self.policy, chunk, max_new_tokens=self.max_new_tokens,
                                temperature=self.temperature, seed=self.seed, **kw)
            outs += list(res.texts)
        results = []
        for q, p, o in zip(questions, prompts, outs):
            parsed = parse_answer(o)
            results.append(AnswerResult(q, p, o, parsed.answer, parsed.distilled,
                                        parsed.answer_line_missing))
        return results

    def answer(self, conv: Conversation, memory: ConversationMemory,
               qas: Sequence[QA]) -> list[AnswerResult]:
        questions = [qa.question for qa in qas]
        return self.answer_prompts(self.memory_prompts(conv, memory, questions), questions)


# ----------------------------------------------------------------------------- baselines

def turn_line(turn) -> str:
    return f"[{turn.date}] {turn.speaker}: {turn.text}" if turn.date else \
        f"{turn.speaker}: {turn.text}"


def rag_prompts(conv: Conversation, questions: Sequence[str], embedder, top_k: int,
                turn_embeddings: np.ndarray | None = None) -> list[str]:
    """LoCoMo-style RAG: the top-k raw turns by embedding similarity, in dialogue order."""
    turns = [t for t in conv.turns if t.text.strip()]
    if turn_embeddings is None:
        turn_embeddings = np.asarray(embedder.encode([f"{t.speaker}: {t.text}" for t in turns]))
    q = np.asarray(embedder.encode(list(questions)), np.float32)
    scores = q @ turn_embeddings.T
    out = []
    for qs, row in zip(questions, scores):
        best = sorted(np.argsort(-row, kind="stable")[:top_k])
        ctx = "\n".join(turn_line(turns[i]) for i in best)
        out.append(P.context_answer_prompt(qs, conv.speaker_a, conv.speaker_b, ctx))
    return out


def full_context_prompts(conv: Conversation, questions: Sequence[str],
                         count_tokens: Callable[[str], int], budget: int) -> list[str]:
    """Every turn that fits ``budget`` context tokens, dropping the oldest turns first."""
    lines = [turn_line(t) for t in conv.turns if t.text.strip()]
    kept, used = [], 0
    for line in reversed(lines):
        n = count_tokens(line) + 1
        if used + n > budget:
            break
        kept.append(line)
        used += n
    ctx = "\n".join(reversed(kept))
    return [P.context_answer_prompt(q, conv.speaker_a, conv.speaker_b, ctx) for q in questions]
