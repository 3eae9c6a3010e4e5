"""Answer metrics: exact match (the RL reward), Mem0/A-Mem token F1 and BLEU-1, LoCoMo's F1.

All metric functions take ``(prediction: str, gold: str)`` and return a float in [0, 1].

**f1** — as in the Mem0 / A-Mem evaluation code Memory-R1 follows (mem0
``evaluation/metrics/utils.py`` @ b3ede5b): lower-case, replace ``.`` ``,`` ``!`` ``?`` with
spaces, split on whitespace, and compare the *sets* of tokens: precision = |common| / |pred
set|, recall = |common| / |gold set|, F1 their harmonic mean; 0.0 when either string is empty,
either set is empty, or nothing is shared.

**bleu1** — ``nltk.translate.bleu_score.sentence_bleu([gold_tokens], pred_tokens,
weights=(1, 0, 0, 0), smoothing_function=SmoothingFunction().method1)`` over the word tokens of
the stripped, lower-cased strings, 0.0 when either side has no token (Mem0 returns 0 for empty inputs). Mem0
tokenises with ``nltk.word_tokenize``, which first splits sentences with the Punkt model and
then applies ``NLTKWordTokenizer`` (improved Treebank) to each sentence. Punkt's model is a
download this project cannot rely on, so :func:`word_tokens` applies ``NLTKWordTokenizer`` to
the whole string, i.e. exactly ``nltk.word_tokenize(text, preserve_line=True)``. That equals
``nltk.word_tokenize(text)`` whenever Punkt would find a single sentence (short answers; the
tests check it with Punkt's splitting mocked as identity). It differs only for multi-sentence
text: there a sentence-internal final period stays attached to its word ("went." instead of
"went", ".") because the Treebank rules split off only the string-final period.

**exact_match** — SQuAD-style normalisation of both sides (lower-case, drop ASCII punctuation,
drop the articles a/an/the, collapse whitespace), then string equality; 0.0 when either side
normalises to the empty string, so an empty answer is never rewarded. This is the RL reward.

**f1_locomo** / :func:`locomo_score` — the LoCoMo repository's own metric (snap-research/LoCoMo
``task_eval/evaluation.py``), re-implemented: normalisation removes commas, lower-cases, drops
ASCII punctuation and the words a/an/the/*and*, then each token is Porter-stemmed (nltk) and
F1 is computed over token *multisets*. :func:`locomo_score` adds LoCoMo's per-category rules:
category 1 (multi-hop) splits prediction and gold on commas and averages, over the gold
parts, the best F1 of any prediction part; category 3 keeps only the gold text before the
first ``;``; categories 2 and 4 use plain ``f1_locomo``; category 5 scores 1 when the prediction
says "no information available" or "not mentioned". Reported beside the Mem0 metrics, never
instead of them.

:func:`aggregate_by_category` builds the per-category table (multi-hop, temporal, open-domain,
single-hop, overall) of mean F1 / BLEU-1 / J × 100, with :func:`format_markdown` and
:func:`to_json` renderings; J stays ``None`` ("not computed") when no judge scored the rows.
"""

from __future__ import annotations

import collections
import json
import re
import string
from typing import Any, Callable, Iterable, Mapping, Sequence

from nltk.stem import PorterStemmer
from nltk.tokenize import NLTKWordTokenizer
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

__all__ = ["exact_match", "f1", "bleu1", "f1_locomo", "locomo_score", "word_tokens",
           "simple_tokens", "normalize_answer", "METRICS", "score_all",
           "aggregate_by_category", "format_markdown", "to_json"]

# --------------------------------------------------------------------------------------------
# Tokenisation and normalisation
# --------------------------------------------------------------------------------------------

_SIMPLE_SPACE = str.maketrans({".": " ", ",": " ", "!": " ", "?": " "})
_word_tokenizer = NLTKWordTokenizer()
_smooth = SmoothingFunction().method1


def simple_tokens(text: str) -> list[str]:
    """Mem0 / A-Mem tokens: lower-case, ``.,!?`` → space, split on whitespace."""
    return str(text).lower().translate(_SIMPLE_SPACE).split()


def word_tokens(text: str) -> list[str]:
    """nltk word tokens without sentence splitting (``word_tokenize(text, preserve_line=True)``)."""
    return _word_tokenizer.tokenize(str(text))


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower, remove punctuation, remove a/an/the, collapse whitespace."""
    text = str(text).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


# --------------------------------------------------------------------------------------------
# The metrics
# --------------------------------------------------------------------------------------------

def exact_match(prediction: str, gold: str) -> float:
    """1.0 if the SQuAD-normalised strings are equal and non-empty, else 0.0."""
    p, g = normalize_answer(prediction), normalize_answer(gold)
    return float(bool(p) and p == g)


def f1(prediction: str, gold: str) -> float:
    """Mem0 / A-Mem token-set F1 (see the module docstring)."""
    if not prediction or not gold:
        return 0.0
    pred, ref = set(simple_tokens(prediction)), set(simple_tokens(gold))
    common = len(pred & ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def bleu1(prediction: str, gold: str) -> float:
    """BLEU-1 as in Mem0: nltk ``sentence_bleu`` on lower-cased word tokens, method1 smoothing."""
    if not prediction or not gold:
        return 0.0
    # Stripped first, as Mem0 does: Treebank rules treat a quote at the very start specially.
    pred = word_tokens(str(prediction).strip().lower())
    ref = word_tokens(str(gold).strip().lower())
    if not pred or not ref:
        return 0.0
    return float(sentence_bleu([ref], pred, weights=(1, 0, 0, 0), smoothing_function=_smooth))


# LoCoMo's own metric ------------------------------------------------------------------------

_stemmer = PorterStemmer()
_LOCOMO_ARTICLES = re.compile(r"\b(a|an|the|and)\b")
_ADVERSARIAL_PHRASES = ("no information available", "not mentioned")


def _locomo_tokens(text: str) -> list[str]:
    text = str(text).replace(",", "").lower().translate(_PUNCT)
    return [_stemmer.stem(w) for w in _LOCOMO_ARTICLES.sub(" ", text).split()]


def f1_locomo(prediction: str, gold: str, category: int | None = None) -> float:
    """LoCoMo's stemmed token-multiset F1 (``task_eval/evaluation.py`` ``f1_score``).

    With ``category`` given, LoCoMo's per-category rule applies instead (:func:`locomo_score`:
    multi-answer F1 for category 1, first ``;`` part of the gold for category 3).
    """
    if category is not None:
        return locomo_score(prediction, gold, category)
    pred, ref = _locomo_tokens(prediction), _locomo_tokens(gold)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _f1_locomo_plain(prediction: str, gold: str) -> float:
    return f1_locomo(prediction, gold)


def _f1_locomo_multi(prediction: str, gold: str) -> float:
    preds = [p.strip() for p in str(prediction).split(",")]
    golds = [g.strip() for g in str(gold).split(",")]
    return sum(max(f1_locomo(p, g) for p in preds) for g in golds) / len(golds)


def _locomo_adversarial(prediction: str, gold: str) -> float:
    del gold
    low = str(prediction).lower()
    return float(any(phrase in low for phrase in _ADVERSARIAL_PHRASES))


def _locomo_open_domain(prediction: str, gold: str) -> float:
    return f1_locomo(prediction, str(gold).split(";")[0].strip())


_LOCOMO_BY_CATEGORY: dict[int, Callable[[str, str], float]] = {
    1: _f1_locomo_multi,
    2: _f1_locomo_plain,
    3: _locomo_open_domain,
    4: _f1_locomo_plain,
    5: _locomo_adversarial,
}


def locomo_score(prediction: str, gold: str, category: int) -> float:
    """LoCoMo's per-category QA score (``eval_question_answering``); see the module docstring."""
    try:
        return float(_LOCOMO_BY_CATEGORY[int(category)](prediction, gold))
    except KeyError:
        raise ValueError(f"LoCoMo has no category {category!r}; known: "
                         f"{sorted(_LOCOMO_BY_CATEGORY)}") from None


#: Name → ``(prediction, gold) -> float`` metric.
METRICS: dict[str, Callable[[str, str], float]] = {
    "em": exact_match,
    "f1": f1,
    "bleu1": bleu1,
    "f1_locomo": f1_locomo,
}


def score_all(prediction: str, gold: str,
              metrics: Sequence[str] = ("em", "f1", "bleu1", "f1_locomo")) -> dict[str, float]:
    """Every metric in ``metrics`` (keys of :data:`METRICS`) for one pair."""
    return {name: METRICS[name](prediction, gold) for name in metrics}


# --------------------------------------------------------------------------------------------
# Per-category table
# --------------------------------------------------------------------------------------------

#: Table columns: row key → header.
TABLE_COLUMNS: dict[str, str] = {"f1": "F1", "bleu1": "BLEU-1", "j": "J"}


def _default_names() -> dict[int, str]:
    from mr1.data.locomo import CATEGORIES  # LoCoMo names are the default table rows

    return dict(CATEGORIES)


def _mean_x100(values: list[float | None]) -> float | None:
    got = [float(v) for v in values if v is not None]
    return 100.0 * sum(got) / len(got) if got else None


def aggregate_by_category(rows: Iterable[Mapping[str, Any]], *,
                          metrics: Sequence[str] = ("f1", "bleu1", "j"),
                          names: Mapping[int, str] | None = None) -> dict[str, dict[str, Any]]:
    """Mean of each metric × 100 per category and overall (micro-average over all rows).

    Args:
      rows: mappings with an int ``category`` and one value per metric; a value may be
        ``None`` (e.g. J when no judge was configured) and is then left out of the mean.
      metrics: row keys to average.
      names: category number → row name (default: LoCoMo's 1 multi-hop, 2 temporal,
        3 open-domain, 4 single-hop, 5 adversarial).

    Returns:
      ``{name: {"n": count, metric: mean×100 or None, ...}, ..., "overall": {...}}`` with
      categories in numeric order; a metric with no value in a group is ``None``.
    """
    names = _default_names() if names is None else dict(names)
    groups: dict[int, list[Mapping[str, Any]]] = collections.defaultdict(list)
    everything: list[Mapping[str, Any]] = []
    for row in rows:
        groups[int(row["category"])].append(row)
        everything.append(row)

    def summary(group: list[Mapping[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"n": len(group)}
        for m in metrics:
            out[m] = _mean_x100([r.get(m) for r in group])
        return out

    table = {names.get(cat, f"category-{cat}"): summary(groups[cat]) for cat in sorted(groups)}
    table["overall"] = summary(everything)
    return table


def format_markdown(table: Mapping[str, Mapping[str, Any]], digits: int = 2) -> str:
    """A per-category table (from :func:`aggregate_by_category`) as Markdown; None → n/a."""
    metrics = [k for k in next(iter(table.values()), {}) if k != "n"]
    header = ["category", "n"] + [TABLE_COLUMNS.get(m, m) for m in metrics]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, row in table.items():
        cells = [name, str(row.get("n", ""))]
        cells += ["n/a" if row.get(m) is None else f"{row[m]:.{digits}f}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_json(table: Mapping[str, Mapping[str, Any]]) -> str:
    """A per-category table as indented JSON (None → null)."""
    return json.dumps(table, indent=2)
