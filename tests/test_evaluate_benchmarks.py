"""config.benchmark: LoCoMo, LongMemEval and MSC through one data selection and evaluate.py.

LongMemEval and MSC files are small ones written here in the formats of
tests/test_data_longmemeval.py and tests/test_data_msc.py; the end-to-end runs use the random
``tiny`` policy, a stand-in ``generate`` and the hash embedder, so no model runs.
"""

from __future__ import annotations

import gzip
import json
import re

import ml_collections
import pytest

from mr1.agents import pipeline
from mr1.data import paths
from mr1.data.longmemeval import QUESTION_TYPES
from tests.rl_driver import HashEmbedder
from tests.test_agents import fake_generate
from tests.test_data_msc import SELF_INSTRUCT_ROW
from tests.test_evaluate import _config, _module


def lme_record(qid, qtype, question, answer, facts):
    """A LongMemEval oracle record whose one session has a user turn per fact (evidence)."""
    turns = []
    for fact in facts:
        turns += [{"role": "user", "content": fact, "has_answer": True},
                  {"role": "assistant", "content": "Noted.", "has_answer": False}]
    return {"question_id": qid, "question_type": qtype, "question": question, "answer": answer,
            "question_date": "2023/06/01 (Thu) 10:00",
            "haystack_dates": ["2023/05/20 (Sat) 02:21"],
            "haystack_session_ids": [f"answer_{qid}"], "haystack_sessions": [turns],
            "answer_session_ids": [f"answer_{qid}"]}


RECORDS = [
    lme_record("q_cats", "single-session-user", "How many cats do I have?", 3,
               ["I have 3 cats."]),
    lme_record("q_city", "knowledge-update", "Where do I live now?", "Rome",
               ["I live in Oslo.", "I moved to Rome."]),
    lme_record("q_car_abs", "multi-session", "What colour is my boat?",
               "The information provided is not enough.", ["My car is red."]),
    lme_record("q_days", "temporal-reasoning", "How many days ago did I start yoga?", "5",
               ["I started yoga today."]),
]


def _write_lme(path, records=RECORDS, gz=False):
    data = json.dumps(records).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _write_msc(path, n=3):
    rows = []
    for i in range(n):
        row = json.loads(json.dumps(SELF_INSTRUCT_ROW))
        row["metadata"] = {"initial_data_id": f"test_{i}", "session_id": 4}
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sel(**fields):
    return ml_collections.ConfigDict({"data_path": "", "split": "test", "seed": 0, **fields})


# --------------------------------------------------------------------------- data selection

def test_select_longmemeval_one_conversation_per_question(tmp_path):
    f = _write_lme(tmp_path / "lme.json")
    sel = pipeline.select_conversations(_sel(benchmark="longmemeval", data_path=str(f)))
    assert [c.sample_id for c, _ in sel] == ["q_cats", "q_city", "q_car_abs", "q_days"]
    assert all(len(qas) == 1 and qas[0].conv_id == c.sample_id for c, qas in sel)
    assert [qas[0].category for _, qas in sel] == [
        QUESTION_TYPES.index(t) + 1 for t in ("single-session-user", "knowledge-update",
                                              "multi-session", "temporal-reasoning")]
    assert sel[0][1][0].answer == "3"                       # integer answers stringified
    assert (sel[1][0].speaker_a, sel[1][0].speaker_b) == ("user", "assistant")
    assert [t.text for t in sel[1][0].turns if t.has_answer] == ["I live in Oslo.",
                                                                "I moved to Rome."]
    names = pipeline.benchmark_categories("longmemeval")
    assert [names[qas[0].category] for _, qas in sel] == [
        "single-session-user", "knowledge-update", "multi-session", "temporal-reasoning"]


def test_select_longmemeval_limits_and_s_variant(tmp_path):
    f = _write_lme(tmp_path / "lme.json")
    cfg = _sel(benchmark="longmemeval", data_path=str(f))
    cfg.max_questions = 2
    assert [c.sample_id for c, _ in pipeline.select_conversations(cfg)] == ["q_cats", "q_city"]
    cfg.max_questions, cfg.max_conversations = 0, 3
    assert len(pipeline.select_conversations(cfg)) == 3
    cfg.conversation_sampling = "random"
    picks = {s: [c.sample_id for c, _ in pipeline.select_conversations(
        ml_collections.ConfigDict({**cfg.to_dict(), "seed": s}))] for s in range(8)}
    order = [r["question_id"] for r in RECORDS]
    for ids in picks.values():                              # 3 distinct, in file order
        assert len(set(ids)) == 3 and ids == sorted(ids, key=order.index)
    assert len({tuple(v) for v in picks.values()}) > 1      # the seed picks
    again = ml_collections.ConfigDict({**cfg.to_dict(), "seed": 5})
    assert [c.sample_id for c, _ in pipeline.select_conversations(again)] == picks[5]

    gz = _write_lme(tmp_path / "lme_s.json.gz", RECORDS[:2], gz=True)
    s = pipeline.select_conversations(_sel(benchmark="longmemeval", longmemeval_variant="s",
                                           data_path=str(gz)))
    assert [c.sample_id for c, _ in s] == ["q_cats", "q_city"]


def test_select_msc(tmp_path):
    f = _write_msc(tmp_path / "msc_self_instruct.jsonl", n=3)
    sel = pipeline.select_conversations(_sel(benchmark="msc", data_path=str(f),
                                             max_conversations=2))
    assert [c.sample_id for c, _ in sel] == ["msc-si-test_0-s4-0", "msc-si-test_1-s4-1"]
    (qa,) = sel[0][1]
    assert qa.question == "What was wrong with my dog last time?" and qa.answer == "It was sick."
    assert qa.category == 0 and pipeline.benchmark_categories("msc") == {0: "dmr"}
    assert sel[0][0].observations and len(sel[0][0].sessions) == 3


def test_select_locomo_default_and_wrapper(locomo_available):
    base = {"split": "validation", "max_questions_per_conversation": 5,
            "question_sampling": "random"}
    legacy = _sel(**base)                                    # no benchmark field at all
    assert "benchmark" not in legacy
    want = pipeline.select_locomo(legacy)
    assert [c.sample_id for c, _ in want] == ["conv-30"] and len(want[0][1]) == 5
    got = pipeline.select_conversations(legacy)
    assert [(c.sample_id, [q.question_id for q in qas]) for c, qas in got] == [
        (c.sample_id, [q.question_id for q in qas]) for c, qas in want]
    # select_locomo is LoCoMo whatever the benchmark field says (the RL tasks call it)
    other = pipeline.select_locomo(_sel(benchmark="longmemeval", **base))
    assert [q.question_id for q in other[0][1]] == [q.question_id for q in want[0][1]]


def test_unknown_benchmark_is_a_clear_error():
    with pytest.raises(ValueError, match=re.escape(
            "unknown benchmark 'mscc'; known benchmarks: ['locomo', 'longmemeval', 'msc']")):
        pipeline.select_conversations(_sel(benchmark="mscc"))


def test_missing_data_files_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("MR1_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("MR1_CACHE", str(tmp_path / "cache"))
    with pytest.raises(paths.DataNotFoundError,
                       match=r"(?s)msc_self_instruct.*python -m mr1.data.paths download "
                             r"msc_self_instruct"):
        pipeline.select_conversations(_sel(benchmark="msc"))
    with pytest.raises(paths.DataNotFoundError, match="download longmemeval_s"):
        pipeline.select_conversations(_sel(benchmark="longmemeval", longmemeval_variant="s"))
    with pytest.raises(paths.DataNotFoundError, match="the explicit path does not exist"):
        pipeline.select_conversations(_sel(benchmark="longmemeval",
                                           data_path=str(tmp_path / "nope.json")))


def test_manager_identity_separates_benchmarks():
    c = _config()
    assert "data" not in pipeline.manager_identity(c)        # LoCoMo dirs resume as before
    c.benchmark = "longmemeval"
    assert pipeline.manager_identity(c)["data"] == "longmemeval/oracle"
    c.longmemeval_variant = "s"
    assert pipeline.manager_identity(c)["data"] == "longmemeval/s"
    c.benchmark = "msc"
    assert pipeline.manager_identity(c)["data"] == "msc"


def test_benchmark_configs():
    lme = _config("evaluate_longmemeval_smollm2")
    msc = _config("evaluate_msc_smollm2")
    base = _config("evaluate_locomo_smollm2")
    assert (base.benchmark, lme.benchmark, msc.benchmark) == ("locomo", "longmemeval", "msc")
    assert lme.longmemeval_variant == "oracle" and lme.memory.facts == "llm"
    assert msc.memory.facts == "observations"
    for c in (lme, msc):
        assert c.conversation_sampling == "random" and 0 < c.max_conversations <= 20
        assert c.model == base.model and c.method == "memory"
    try:
        paths.resolve("longmemeval_oracle")
    except paths.DataNotFoundError:
        return                                               # no local copy: configs only
    sel = pipeline.select_conversations(lme)
    assert len(sel) == lme.max_conversations == sum(len(q) for _, q in sel)
    assert len({qas[0].question_type for _, qas in sel}) >= 3  # a spread of question types


# --------------------------------------------------------------------------- evaluate.run

@pytest.fixture(scope="module")
def tiny_policy():
    from mr1.models import load_policy

    return load_policy("tiny", seed=0)


def _reply(prompt):
    """Fact extraction: the message itself as the fact; answers: 3 when a memory says cats,
    "Not mentioned" to the yoga question, else Oslo."""
    if prompt.rstrip().endswith("Facts:"):
        return prompt.rstrip()[: -len("Facts:")].rstrip().splitlines()[-1]
    if "I have 3 cats." in prompt.split("Question:")[0]:
        return "- user: I have 3 cats.\n**Answer:** 3"
    if "yoga" in prompt.split("Question:")[-1]:
        return "**Answer:** Not mentioned"
    return "**Answer:** Oslo"


def _eval_config(data_path, benchmark, **overrides):
    c = _config(f"evaluate_{benchmark}_smollm2")
    c.data_path = str(data_path)
    c.max_conversations = 0
    c.conversation_sampling = "first"
    c.answer.batch_size = 8
    c.answer.max_new_tokens = 8
    c.memory.num_slots = 16
    c.judge = False
    c.progress = False
    for k, v in overrides.items():
        c[k] = v
    return c


def test_evaluate_longmemeval_end_to_end(tmp_path, tiny_policy):
    ev = _module("evaluate")
    data = _write_lme(tmp_path / "lme.json")
    gen = fake_generate(_reply)
    out = ev.run(_eval_config(data, "longmemeval"), tmp_path / "run", policy=tiny_policy,
                 embedder=HashEmbedder(), generate_fn=gen, log=lambda s: None)
    saved = json.loads(out["paths"]["json"].read_text())
    assert saved["benchmark"] == "longmemeval" and saved["longmemeval_variant"] == "oracle"
    assert saved["split"] is None and saved["num_questions"] == 4
    assert saved["config"]["benchmark"] == "longmemeval"
    rows = [json.loads(x) for x in out["paths"]["jsonl"].read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["q_cats", "q_city", "q_car_abs", "q_days"]
    assert [r["abstention"] for r in rows] == [False, False, True, False]
    by_id = {r["question_id"]: r for r in rows}
    # the cats fact went haystack -> extraction -> bank -> answer prompt -> answer
    assert by_id["q_cats"]["prediction"] == "3" and by_id["q_cats"]["f1"] == 1.0
    assert by_id["q_city"]["prediction"] == "Oslo" and by_id["q_city"]["f1"] == 0.0
    # plain stemmed F1, not LoCoMo's category-5 "adversarial" rule (temporal-reasoning is 5),
    # which would score "Not mentioned" 1.0
    assert by_id["q_days"]["prediction"] == "Not mentioned"
    assert by_id["q_days"]["category"] == 5 and by_id["q_days"]["f1_locomo"] == 0.0
    table = saved["table"]
    assert list(table) == ["single-session-user", "multi-session", "temporal-reasoning",
                           "knowledge-update", "overall"]
    assert table["single-session-user"] == {"n": 1, "f1": 100.0, "bleu1": 100.0, "j": None}
    assert table["overall"]["n"] == 4 and table["overall"]["f1"] == pytest.approx(25.0)
    assert saved["abstention"]["abstention"]["n"] == 1
    assert saved["abstention"]["non_abstention"]["n"] == 3
    assert saved["abstention"]["non_abstention"]["f1"] == pytest.approx(100 / 3)
    assert saved["memory_ops"]["ops"]["ADD"] == saved["memory_ops"]["facts"] == 10  # a turn each
    md = out["paths"]["markdown"].read_text()
    assert "| single-session-user | 1 |" in md and "benchmark longmemeval/oracle" in md
    assert "LongMemEval: 1 abstention (F1 0.00), 3 non-abstention (F1 33.33)" in md
    manager = json.loads((tmp_path / "run" / "memory" / "manager.json").read_text())
    assert manager["data"] == "longmemeval/oracle"
    assert (tmp_path / "run" / "memory" / "q_cats" / "DONE").is_file()
    n_extract = sum(p.rstrip().endswith("Facts:") for call in gen.calls for p in call)
    assert n_extract == 10                                   # one per haystack turn

    no_facts = _eval_config(data, "longmemeval")
    no_facts.memory.facts = "observations"                   # LongMemEval ships none
    with pytest.raises(ValueError, match="have no observations.*memory.facts=llm"):
        ev.run(no_facts, tmp_path / "obs", policy=tiny_policy, embedder=HashEmbedder(),
               generate_fn=gen, log=lambda s: None)
    assert not (tmp_path / "obs").exists()                   # refused before any work


def test_evaluate_msc_end_to_end(tmp_path, tiny_policy):
    ev = _module("evaluate")
    data = _write_msc(tmp_path / "msc_self_instruct.jsonl", n=2)
    gen = fake_generate(lambda p: "**Answer:** It was sick.")
    out = ev.run(_eval_config(data, "msc"), tmp_path / "run", policy=tiny_policy,
                 embedder=HashEmbedder(), generate_fn=gen, log=lambda s: None)
    saved = json.loads(out["paths"]["json"].read_text())
    assert saved["benchmark"] == "msc" and saved["abstention"] is None
    assert saved["longmemeval_variant"] is None
    assert list(saved["table"]) == ["dmr", "overall"]
    assert saved["table"]["dmr"]["n"] == 2 and saved["table"]["dmr"]["f1"] == 100.0
    assert [r["f1_locomo"] for r in out["rows"]] == [1.0, 1.0]
    assert saved["memory_ops"]["facts"] > 0                  # persona lines as observations
    assert [len(c) for c in gen.calls] == [1, 1]                 # one call per conversation
    memories_a = gen.calls[0][0].split("Memories of Speaker 1:")[1].split("Memories of")[0]
    assert "I have a dog." in memories_a                     # Speaker 1's persona line
