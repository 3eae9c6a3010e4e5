"""Reward functions for the Answer Agent / Memory Manager, chosen by name.

Every reward has the signature ``fn(prediction: str, gold: str, completion: str | None = None)
-> float``: ``prediction`` is the parsed short answer, ``gold`` the reference answer, and
``completion`` the full generated text (used by the format term; when None the prediction
itself is checked).

* ``"em"`` — :func:`mr1.eval.metrics.exact_match` (SQuAD normalisation; Memory-R1's reward).
* ``"f1"`` — :func:`mr1.eval.metrics.f1` (Mem0 set-token F1).
* ``"format"`` — 1.0 when the completion has a line ``**Answer:** <answer>`` whose answer is
  non-empty and at most :data:`MAX_ANSWER_WORDS` words (the prompt asks for under 6), else 0.0.
* ``"brevity"`` — 1.0 when the parsed answer (answer line, or the last line without one) is
  non-empty and at most :data:`MAX_ANSWER_WORDS` words: a softer shaping term for small models
  that rarely write the answer line at first.

:func:`combined_reward` sums weighted terms, e.g. ``{"em": 1.0, "format": 0.1}``.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

from mr1.eval import metrics
from mr1.registry import Registry

__all__ = ["REWARDS", "register_reward", "get_reward", "em_reward", "f1_reward",
           "format_reward", "brevity_reward", "combined_reward", "MAX_ANSWER_WORDS"]

MAX_ANSWER_WORDS = 6

RewardFn = Callable[..., float]
REWARDS = Registry("reward")
register_reward = REWARDS.register  # decorator: @register_reward("name")
get_reward = REWARDS.get            # the reward registered as a name (KeyError naming the rest)

# `**Answer:**` at the start of a line (leading spaces allowed), answer = rest of that line.
_ANSWER_LINE = re.compile(r"^[ \t]*\*\*Answer:\*\*[ \t]*(.*)$", re.MULTILINE)


@register_reward("em")
def em_reward(prediction: str, gold: str, completion: str | None = None) -> float:
    """Exact match (SQuAD normalisation) of prediction and gold, 0.0 or 1.0."""
    return float(metrics.exact_match(prediction, gold))


@register_reward("f1")
def f1_reward(prediction: str, gold: str, completion: str | None = None) -> float:
    """Mem0 / A-Mem token-set F1 in [0, 1]."""
    return float(metrics.f1(prediction, gold))


@register_reward("format")
def format_reward(prediction: str, gold: str, completion: str | None = None, *,
                  max_words: int = MAX_ANSWER_WORDS) -> float:
    """1.0 if ``completion`` (else ``prediction``) has a ``**Answer:**`` line with a non-empty
    answer of at most ``max_words`` whitespace-separated words; else 0.0. The last such line
    counts (as in :func:`mr1.agents.answer.parse_answer`)."""
    text = completion if completion is not None else prediction
    if not isinstance(text, str):
        return 0.0
    found = _ANSWER_LINE.findall(text)
    if not found:
        return 0.0
    words = found[-1].strip().strip("*").split()
    return 1.0 if 0 < len(words) <= max_words else 0.0


@register_reward("brevity")
def brevity_reward(prediction: str, gold: str, completion: str | None = None, *,
                   max_words: int = MAX_ANSWER_WORDS) -> float:
    """1.0 if ``prediction`` is non-empty and has at most ``max_words`` words, else 0.0."""
    words = prediction.split() if isinstance(prediction, str) else []
    return 1.0 if 0 < len(words) <= max_words else 0.0


def combined_reward(name_weights: Mapping[str, float], prediction: str, gold: str,
                    completion: str | None = None) -> float:
    """``sum_k w_k * REWARDS[k](prediction, gold, completion)``; unknown names → KeyError."""
    total = 0.0
    for name, w in name_weights.items():
        total += float(w) * get_reward(name)(prediction, gold, completion)
    return total
