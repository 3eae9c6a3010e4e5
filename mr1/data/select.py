"""Benchmark selection: which conversations and questions a run reads.

``config.benchmark`` ("locomo" | "longmemeval" | "msc") picks a loader (:data:`BENCHMARKS`),
then the subset limits of :func:`subset` apply (conversations, questions per conversation,
questions in total; first or seeded random). :func:`select_locomo` is always LoCoMo (the RL
tasks train on its ``split``). Used by ``experiments/evaluate.py``, ``build_memory.py`` and the
RL tasks; the names are also importable from :mod:`mr1.agents.pipeline`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from mr1.data.records import Conversation

__all__ = ["BENCHMARKS", "benchmark_name", "benchmark_categories", "subset",
           "select_conversations", "select_locomo"]


def _load_locomo(config) -> list[Conversation]:
    """LoCoMo conversations of ``config.split`` (Memory-R1's 1:1:8 split)."""
    from mr1.data.locomo import load_locomo, split_locomo

    split = split_locomo(load_locomo(config.get("data_path") or None))
    if config.split not in split._fields:
        raise ValueError(f"split must be one of {split._fields}, got {config.split!r}")
    return list(getattr(split, config.split))


def _load_longmemeval(config) -> list[Conversation]:
    """LongMemEval ``config.longmemeval_variant`` ("oracle" default | "s"): one conversation
    (the question's haystack) per question; abstention questions are kept (``_abs`` ids)."""
    from mr1.data.longmemeval import load_longmemeval

    return load_longmemeval(config.get("longmemeval_variant") or "oracle",
                            config.get("data_path") or None)


def _load_msc(config) -> list[Conversation]:
    """MSC-Self-Instruct (MemGPT's DMR set): one conversation per question."""
    from mr1.data.msc import load_msc_self_instruct

    return load_msc_self_instruct(config.get("data_path") or None)


#: Benchmark name (``config.benchmark``) -> loader ``config -> list[Conversation]``. The
#: subset limits of :func:`select_conversations` apply after loading. ``split`` is LoCoMo's
#: only; LongMemEval and MSC are evaluated zero-shot on the whole file.
BENCHMARKS: dict[str, Callable[[Any], list[Conversation]]] = {
    "locomo": _load_locomo,
    "longmemeval": _load_longmemeval,
    "msc": _load_msc,
}


def benchmark_name(config) -> str:
    """``config.benchmark`` ("locomo" when absent or empty: configs older than the field).

    Raises:
      ValueError: not a key of :data:`BENCHMARKS`.
    """
    name = config.get("benchmark", "locomo") or "locomo"
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known benchmarks: {sorted(BENCHMARKS)}")
    return name


def benchmark_categories(name: str) -> dict[int, str]:
    """``QA.category`` -> name for the per-category table of benchmark ``name``."""
    if name == "longmemeval":
        from mr1.data.longmemeval import QUESTION_TYPES
        return {i: t for i, t in enumerate(QUESTION_TYPES, 1)}
    if name == "msc":
        return {0: "dmr"}   # MSC-Self-Instruct: one question kind (category 0)
    from mr1.data.locomo import CATEGORIES
    return dict(CATEGORIES)


def subset(convs: Sequence[Conversation], config) -> list[tuple[Conversation, list]]:
    """``(conversation, qas)`` pairs of ``convs`` after the subset limits of ``config``.

    ``conversation_sampling`` ("first" | "random", seeded) picks the ``max_conversations``
    conversations (random keeps file order); then per conversation
    ``max_questions_per_conversation`` with ``question_sampling``; then the ``max_questions``
    cap in total. 0 = no limit.
    """
    convs = list(convs)
    n_conv = config.get("max_conversations", 0)
    if n_conv and n_conv < len(convs):
        if config.get("conversation_sampling", "first") == "random":
            pick = np.random.default_rng([config.get("seed", 0), 1]).choice(
                len(convs), n_conv, replace=False)
            convs = [convs[i] for i in sorted(pick)]
        else:
            convs = convs[:n_conv]
    rng = np.random.default_rng(config.get("seed", 0))
    out, total = [], 0
    cap = config.get("max_questions", 0) or None
    for conv in convs:
        qas = list(conv.qas)
        per = config.get("max_questions_per_conversation", 0)
        if per and per < len(qas):
            if config.get("question_sampling", "first") == "random":
                qas = [qas[i] for i in sorted(rng.choice(len(qas), per, replace=False))]
            else:
                qas = qas[:per]
        if cap is not None:
            qas = qas[: max(0, cap - total)]
        if not qas:
            if cap is not None and total >= cap:
                break
            continue   # a conversation without questions (never in the benchmark files)
        total += len(qas)
        out.append((conv, qas))
    return out


def select_conversations(config) -> list[tuple[Conversation, list]]:
    """``(conversation, qas)`` pairs of ``config.benchmark`` after the subset limits.

    Reads ``benchmark`` ("locomo" | "longmemeval" | "msc", default "locomo"), ``data_path``
    ("" = ``$MR1_DATA_DIR`` or the cache; a missing file raises
    :class:`mr1.data.paths.DataNotFoundError` saying how to provide it), LoCoMo's ``split``,
    ``longmemeval_variant`` ("oracle" | "s") and the limits of :func:`subset`.
    """
    return subset(BENCHMARKS[benchmark_name(config)](config), config)


def select_locomo(config) -> list[tuple[Conversation, list]]:
    """``(conversation, qas)`` pairs of LoCoMo's ``config.split`` after the subset limits.

    Always LoCoMo, whatever ``config.benchmark`` says (the RL tasks train on it); reads
    ``data_path``, ``split``, ``max_conversations``, ``max_questions_per_conversation``,
    ``max_questions``, ``question_sampling`` ("first" | "random") and ``seed`` (0 = no limit).
    """
    return subset(_load_locomo(config), config)
