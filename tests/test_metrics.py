"""Metric parity with independent re-implementations of the Mem0 / A-Mem and LoCoMo definitions.

The references below are written from the published definitions (Mem0's
``evaluation/metrics/utils.py``, LoCoMo's ``task_eval/evaluation.py``), deliberately in a
different, more literal style than ``mr1.eval.metrics``; BLEU-1 is checked against nltk's
``sentence_bleu`` called directly on ``nltk.word_tokenize`` tokens.
"""

from __future__ import annotations

import collections
import json
import string

import hypothesis.strategies as st
import nltk
import nltk.tokenize
import pytest
import regex
from hypothesis import given, settings
from nltk.stem import PorterStemmer
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from mr1.eval.metrics import (METRICS, aggregate_by_category, bleu1, exact_match, f1, f1_locomo,
                              format_markdown, locomo_score, normalize_answer, score_all,
                              to_json, word_tokens)

# ------------------------------------------------------------------------------------------
# Independent references
# ------------------------------------------------------------------------------------------


def ref_mem0_f1(prediction: str, reference: str) -> float:
    if not prediction or not reference:
        return 0.0

    def toks(s):
        s = str(s).strip().lower()
        for ch in (".", ",", "!", "?"):
            s = s.replace(ch, " ")
        return s.split()

    p, r = set(toks(prediction)), set(toks(reference))
    if not p or not r:
        return 0.0
    common = p & r
    precision = len(common) / len(p)
    recall = len(common) / len(r)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


@pytest.fixture
def punkt_as_identity(monkeypatch):
    """nltk.word_tokenize with Punkt's sentence splitting replaced by 'one sentence'."""
    monkeypatch.setattr(nltk.tokenize, "sent_tokenize", lambda text, language="english": [text])


def ref_mem0_bleu1(prediction: str, reference: str) -> float:
    """Mem0's BLEU-1 (needs ``punkt_as_identity`` here: Punkt's model is not installed)."""
    if not prediction or not reference:
        return 0.0
    prediction, reference = str(prediction).strip(), str(reference).strip()
    pred = nltk.word_tokenize(prediction.lower())
    ref = [nltk.word_tokenize(reference.lower())]
    return sentence_bleu(ref, pred, weights=(1, 0, 0, 0),
                         smoothing_function=SmoothingFunction().method1)


_ps = PorterStemmer()


def ref_locomo_normalize(s: str) -> str:
    s = s.replace(",", "")
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = regex.sub(r"\b(a|an|the|and)\b", " ", s)
    return " ".join(s.split())


def ref_locomo_f1(prediction: str, ground_truth: str) -> float:
    p = [_ps.stem(w) for w in ref_locomo_normalize(prediction).split()]
    g = [_ps.stem(w) for w in ref_locomo_normalize(ground_truth).split()]
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    if same == 0:
        return 0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def ref_squad_normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = regex.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


PAIRS = [
    ("7 May 2023", "7 May 2023"),
    ("May 7, 2023", "7 May 2023"),
    ("On May 7th, 2023.", "7 May 2023"),
    ("2022", "2022"),
    ("In 2022", "2022"),
    ("3", "three"),
    ("$1,200.50", "1200.50 dollars"),
    ("The week before 9 June 2023", "the week before 9 June, 2023"),
    ("", "gold"),
    ("prediction", ""),
    ("", ""),
    ("   ", "x"),
    ("...", "x"),
    ("?!", "?!"),
    ("Yes!", "yes"),
    ("No.", "Yes."),
    ("Caroline's support group", "LGBTQ support group"),
    ("She's painting; a sunrise!", "a painting of a sunrise"),
    ("It was 10:30 a.m. on Mon.", "10:30 am Monday"),
    ("café au lait", "Café au lait"),
    ("Zürich, Genève and Bern", "Bern, Zürich"),
    ("東京 and 大阪", "東京"),
    ("naïve résumé", "resume"),
    ("\"quoted\" (parenthetical) [bracket]", "quoted parenthetical bracket"),
    ("well-known e-mail", "well known email"),
    ("the the the cat", "cat cat"),
    ("pottery, painting, and swimming", "painting, pottery"),
    ("I went. He came.", "he came"),
    ("Mr. Smith went to Washington. Then he left!", "Smith went to Washington"),
    ("don't can't won't", "do not"),
    ("x" * 50, "x" * 50),
    ("one two three four five six seven", "three"),
    ("Melanie has 3 children", "3"),
    ("\tTabs\nand newlines\n", "tabs and newlines"),
    ("emoji 🎨 art", "art 🎨"),
]


# ------------------------------------------------------------------------------------------
# Parity
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred,gold", PAIRS)
def test_f1_matches_mem0_definition(pred, gold):
    assert f1(pred, gold) == pytest.approx(ref_mem0_f1(pred, gold), abs=1e-12)


@pytest.mark.parametrize("pred,gold", PAIRS)
def test_bleu1_matches_nltk_sentence_bleu(pred, gold, punkt_as_identity):
    assert bleu1(pred, gold) == pytest.approx(ref_mem0_bleu1(pred, gold), abs=1e-12)


@pytest.mark.parametrize("pred,gold", PAIRS)
def test_f1_locomo_matches_locomo_definition(pred, gold):
    assert f1_locomo(pred, gold) == pytest.approx(ref_locomo_f1(pred, gold), abs=1e-12)


@pytest.mark.parametrize("pred,gold", PAIRS)
def test_exact_match_is_squad_equality(pred, gold):
    p, g = ref_squad_normalize(pred), ref_squad_normalize(gold)
    assert exact_match(pred, gold) == float(bool(p) and p == g)


_TEXT = st.text(alphabet=st.sampled_from(list("abcAB 12.,!?;:'\"-()$%éü東 \t\n")), max_size=30)


@settings(max_examples=300, deadline=None)
@given(_TEXT, _TEXT)
def test_random_strings_parity(pred, gold):
    assert f1(pred, gold) == pytest.approx(ref_mem0_f1(pred, gold), abs=1e-12)
    assert f1_locomo(pred, gold) == pytest.approx(ref_locomo_f1(pred, gold), abs=1e-12)
    p, g = ref_squad_normalize(pred), ref_squad_normalize(gold)
    assert exact_match(pred, gold) == float(bool(p) and p == g)
    for value in (f1(pred, gold), bleu1(pred, gold), f1_locomo(pred, gold)):
        assert 0.0 <= value <= 1.0


@settings(max_examples=150, deadline=None)
@given(_TEXT, _TEXT)
def test_random_strings_bleu_parity(pred, gold):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nltk.tokenize, "sent_tokenize", lambda text, language="english": [text])
        assert bleu1(pred, gold) == pytest.approx(ref_mem0_bleu1(pred, gold), abs=1e-12)


# ------------------------------------------------------------------------------------------
# Tokenisation without Punkt
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [p for pair in PAIRS for p in pair])
def test_word_tokens_equal_word_tokenize_without_sentence_split(text, punkt_as_identity):
    assert word_tokens(text) == nltk.word_tokenize(text)
    assert word_tokens(text) == nltk.word_tokenize(text, preserve_line=True)


def test_word_tokens_documented_difference_on_multi_sentence_text():
    # Only the string-final period is split off without Punkt's sentence splitting.
    assert word_tokens("i went. he came.") == ["i", "went.", "he", "came", "."]


def test_word_tokens_equal_real_punkt_when_available():
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        pytest.skip("nltk Punkt model not installed (cannot be downloaded here); covered by "
                    "the sent_tokenize-as-identity parity tests")
    for text in ["7 May 2023", "On May 7th, 2023.", "She's painting a sunrise!", "In 2022"]:
        assert word_tokens(text) == nltk.word_tokenize(text)


# ------------------------------------------------------------------------------------------
# Behaviour
# ------------------------------------------------------------------------------------------

def test_known_values():
    assert f1("7 May 2023", "7 May 2023") == 1.0
    assert f1("The cat.", "cat") == pytest.approx(2 / 3)
    assert f1("", "x") == f1("x", "") == 0.0
    assert bleu1("7 may 2023", "7 May 2023") == pytest.approx(1.0)
    assert bleu1("", "x") == 0.0 and bleu1("   ", "x") == 0.0
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("", "") == 0.0 and exact_match("a", "the") == 0.0
    assert exact_match("Café", "café") == 1.0
    assert normalize_answer("  The  quick, brown fox! ") == "quick brown fox"
    assert f1_locomo("painted sunrises", "painting a sunrise") == pytest.approx(1.0)


def test_locomo_per_category_rules():
    # 1: multi-answer, mean over gold parts of the best prediction part
    assert locomo_score("Paris, London", "London, Rome", 1) == pytest.approx(0.5)
    # 3: only the gold text before the first ';'
    assert locomo_score("likely yes", "likely yes; because she said so", 3) == pytest.approx(1.0)
    assert locomo_score("x", "y", 2) == locomo_score("x", "y", 4) == 0.0
    assert f1_locomo("Paris, London", "London, Rome", category=1) == pytest.approx(0.5)
    assert f1_locomo("Paris, London", "London, Rome") == pytest.approx(0.5)  # multiset F1
    assert f1_locomo("London", "London, Rome", category=1) == pytest.approx(0.5)
    assert f1_locomo("London", "London, Rome") == pytest.approx(2 / 3)
    # 5: the "not mentioned" option
    assert locomo_score("Not mentioned in the conversation", "", 5) == 1.0
    assert locomo_score("No information available.", "", 5) == 1.0
    assert locomo_score("Yes", "", 5) == 0.0
    with pytest.raises(ValueError, match="category"):
        locomo_score("x", "y", 7)


def test_registry_and_score_all():
    assert set(METRICS) == {"em", "f1", "bleu1", "f1_locomo"}
    scores = score_all("7 May 2023", "7 May 2023")
    assert scores == {"em": 1.0, "f1": 1.0, "bleu1": pytest.approx(1.0), "f1_locomo": 1.0}


# ------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------

ROWS = [
    {"category": 1, "f1": 0.5, "bleu1": 0.25, "j": None},
    {"category": 1, "f1": 1.0, "bleu1": 0.75, "j": None},
    {"category": 2, "f1": 0.0, "bleu1": 0.0, "j": None},
    {"category": 4, "f1": 1.0, "bleu1": 1.0, "j": None},
    {"category": 3, "f1": 0.2, "bleu1": 0.1, "j": None},
]


def test_aggregate_by_category():
    table = aggregate_by_category(ROWS)
    assert list(table) == ["multi-hop", "temporal", "open-domain", "single-hop", "overall"]
    assert table["multi-hop"] == {"n": 2, "f1": pytest.approx(75.0), "bleu1": pytest.approx(50.0),
                                  "j": None}
    assert table["overall"]["n"] == 5
    assert table["overall"]["f1"] == pytest.approx(100 * 2.7 / 5)
    assert table["overall"]["j"] is None  # no judge: not computed, never 0


def test_aggregate_with_judge_and_custom_names():
    rows = [dict(r, j=float(i % 2)) for i, r in enumerate(ROWS)]
    table = aggregate_by_category(rows, names={1: "a", 2: "b", 3: "c", 4: "d"})
    assert table["a"]["j"] == pytest.approx(50.0)
    assert table["overall"]["j"] == pytest.approx(40.0)


def test_markdown_and_json():
    table = aggregate_by_category(ROWS)
    md = format_markdown(table)
    lines = md.strip().splitlines()
    assert lines[0] == "| category | n | F1 | BLEU-1 | J |"
    assert lines[2] == "| multi-hop | 2 | 75.00 | 50.00 | n/a |"
    assert lines[-1].startswith("| overall | 5 | 54.00 | 42.00 | n/a |")
    assert json.loads(to_json(table))["overall"]["j"] is None
