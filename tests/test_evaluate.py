"""experiments/evaluate.py end to end on the tiny config, and build_memory.py's resume."""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib
import runpy
import types

import pytest

from tests.test_agents import HashEmbedder, fake_generate

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"


@functools.cache
def _module(name):
    """Loads experiments/<name>.py once; its absl flags replace the previous script's."""
    from absl import flags

    for flag in ("config", "workdir"):      # both scripts define these two
        if flag in flags.FLAGS:
            delattr(flags.FLAGS, flag)
    spec = importlib.util.spec_from_file_location(f"_exp_{name}", ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _config(name="evaluate_locomo_tiny", **overrides):
    c = runpy.run_path(str(CONFIGS / f"{name}.py"))["get_config"]()
    for k, v in overrides.items():
        c[k] = v
    return c


COLUMNS = {"question", "gold", "prediction", "category", "f1", "bleu1", "em", "j",
           "answer_line_missing", "num_invalid_ops"}


def _check_outputs(out, n):
    lines = out["paths"]["jsonl"].read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert len(rows) == n and all(COLUMNS <= set(r) for r in rows)
    md = out["paths"]["markdown"].read_text()
    assert "| category | n | F1 | BLEU-1 | J |" in md and "| overall |" in md
    assert "not computed" in md
    table = json.loads(out["paths"]["json"].read_text())["table"]
    assert table["overall"]["n"] == n and table["overall"]["j"] is None
    return rows


def test_evaluate_memory_end_to_end_embedded_model(tmp_path, locomo_available, embedded_policy):
    ev = _module("evaluate")
    out = ev.run(_config(), tmp_path, policy=embedded_policy, log=lambda s: None)
    rows = _check_outputs(out, 2)
    assert all(isinstance(r["prediction"], str) for r in rows)
    assert (tmp_path / "memory" / "conv-30" / "DONE").is_file()


@pytest.mark.parametrize("method", ["rag", "full_context"])
def test_evaluate_baselines_fake_generate(tmp_path, locomo_available, embedded_policy, method):
    ev = _module("evaluate")
    gen = fake_generate(lambda p: "- a line\n**Answer:** 19 January, 2023")
    out = ev.run(_config(method=method), tmp_path, policy=embedded_policy,
                 embedder=HashEmbedder(), generate_fn=gen, log=lambda s: None)
    rows = _check_outputs(out, 2)
    assert len(gen.calls) == 1                               # one batched call
    assert rows[0]["f1"] == 1.0 and not rows[0]["answer_line_missing"]
    # one conversation's full context: its prefix is prefilled once per batch (or cached)
    assert gen.kwargs[0].get("share_prefix", False) == (method == "full_context")
    if method == "full_context":
        n_tokens = len(embedded_policy.tokenizer(gen.calls[0][0])["input_ids"])
        assert n_tokens < 200 + 150                          # budget 200 + the template


def test_evaluate_resumes_answers_after_an_interruption(tmp_path, locomo_available,
                                                        embedded_policy):
    """A run killed after its first conversation answers only the second when started again;
    the per-conversation answers go once the results are written; another config raises."""
    ev = _module("evaluate")
    config = _config(method="rag", split="test", max_conversations=2, max_questions=0,
                     max_questions_per_conversation=2)
    answers = tmp_path / "answers"

    def replies(prompt):
        if len(gen.calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return "**Answer:** 7 May 2023"

    gen = fake_generate(replies)
    with pytest.raises(KeyboardInterrupt):
        ev.run(config, tmp_path, policy=embedded_policy, embedder=HashEmbedder(),
               generate_fn=gen, log=lambda s: None)
    saved = sorted(p.name for p in answers.glob("*.jsonl"))
    assert len(saved) == 1 and not (tmp_path / "predictions.jsonl").exists()
    first_rows = (answers / saved[0]).read_text().splitlines()

    other = _config(method="rag", split="test", max_conversations=2, max_questions=0,
                    max_questions_per_conversation=2, rag_top_k=4)
    with pytest.raises(ValueError, match="another config"):
        ev.run(other, tmp_path, policy=embedded_policy, embedder=HashEmbedder(),
               generate_fn=fake_generate(lambda p: "x"), log=lambda s: None)

    again = fake_generate(lambda p: "**Answer:** 7 May 2023")
    out = ev.run(config, tmp_path, policy=embedded_policy, embedder=HashEmbedder(),
                 generate_fn=again, log=lambda s: None)
    rows = _check_outputs(out, 4)
    assert len(again.calls) == 1 and len(again.calls[0]) == 2  # only the second conversation
    assert [json.dumps(r) for r in rows[:2]] == first_rows      # the saved rows, in order
    assert len({r["conv_id"] for r in rows}) == 2
    assert not answers.exists()


def test_build_memory_resume_skips_finished(tmp_path, locomo_available, monkeypatch):
    bm = _module("build_memory")
    from mr1.agents import pipeline

    config = _config(split="test", max_conversations=2, max_questions=0)
    policy = types.SimpleNamespace(tokenizer=None, pad_token_id=0)
    built = []
    real_build = pipeline.MemoryBuilder.build

    def interrupted(self, conv):
        if len(built) == 1:
            raise KeyboardInterrupt("simulated interruption")
        built.append(conv.sample_id)
        return real_build(self, conv)

    monkeypatch.setattr(pipeline.MemoryBuilder, "build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bm.run(config, tmp_path, policy=policy, embedder=HashEmbedder(), log=lambda s: None)
    first = built[0]
    mem_dir = tmp_path / "memory"
    assert [p.name for p in mem_dir.iterdir() if (p / "DONE").is_file()] == [first]
    stamp = (mem_dir / first / "memory.json").stat().st_mtime_ns

    built.clear()
    monkeypatch.setattr(pipeline.MemoryBuilder, "build",
                        lambda self, conv: (built.append(conv.sample_id), real_build(self, conv))[1])
    stats = bm.run(config, tmp_path, policy=policy, embedder=HashEmbedder(), log=lambda s: None)
    assert first not in built and len(built) == 1             # only the unfinished one
    assert set(stats) == {first, built[0]}
    assert (mem_dir / first / "memory.json").stat().st_mtime_ns == stamp
    assert all((mem_dir / s / "DONE").is_file() for s in stats)


def test_cpu_table_config_picks_the_method():
    """``evaluate_locomo_cpu.py:<method>``: one set of CPU-scale answer settings, the method's
    own overrides, the full split; an unknown method is an error naming the choices."""
    path = str(ROOT / "experiments" / "configs" / "evaluate_locomo_cpu.py")
    get = runpy.run_path(path)["get_config"]
    configs = {m: get(m) for m in ("memory", "mem0", "rag", "full_context")}
    for c in configs.values():
        assert (c.answer.top_k, c.answer.max_new_tokens, c.max_questions_per_conversation) == \
            (5, 32, 0)
    assert configs["memory"].method == "memory" and configs["memory"].memory.manager == "add_all"
    assert configs["mem0"].memory.manager == "llm"
    assert configs["mem0"].memory.manager_format == "json"
    assert configs["rag"].method == "rag" and configs["rag"].rag_top_k == 10
    assert configs["full_context"].method == "full_context"
    with pytest.raises(ValueError, match="unknown method 'bm25'"):
        get("bm25")
