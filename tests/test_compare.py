"""experiments/compare.py and mr1.eval.compare: evaluate.py runs side by side."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from mr1.eval.compare import (check_same_questions, compare_table, load_run, parse_run_args,
                              plot_comparison, summary_json)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_run(path: pathlib.Path, f1s: dict[str, float], ids=("c/q0", "c/q1"), wall=90.0,
              per_question=None):
    """A workdir as evaluate.py leaves it: results.json (table) + predictions.jsonl (each
    question's F1 from ``per_question``, 0 by default)."""
    path.mkdir(parents=True)
    table = {c: {"n": 1, "f1": v, "bleu1": v / 2, "j": None} for c, v in f1s.items()}
    (path / "results.json").write_text(json.dumps({"table": table, "wall_s": wall}))
    per_question = per_question or [0.0] * len(ids)
    (path / "predictions.jsonl").write_text(
        "".join(json.dumps({"question_id": q, "f1": f}) + "\n"
                for q, f in zip(ids, per_question)))
    return path


def test_table_ratio_and_columns(tmp_path):
    base = load_run("untrained", write_run(tmp_path / "a", {"temporal": 4.0, "overall": 8.0}))
    rl = load_run("GRPO", write_run(tmp_path / "b", {"temporal": 30.0, "multi-hop": 10.0,
                                                     "overall": 20.0}, wall=150.0))
    table = compare_table([base, rl], base="untrained")
    lines = table.strip().splitlines()
    assert lines[0] == ("| run | temporal F1 | multi-hop F1 | overall F1 | BLEU-1 | J | "
                        "x base F1 | F1 - base [95% CI] | n | wall |")
    assert lines[2] == ("| untrained | 4.00 | n/a | **8.00** | 4.00 | n/a | 1.00 | n/a | 1 | "
                        "1.5 min |")
    assert lines[3] == ("| GRPO | 30.00 | 10.00 | **20.00** | 10.00 | n/a | 2.50 | "
                        "+0.00 [+0.00, +0.00] | 1 | 2.5 min |")
    assert "x base F1" not in compare_table([base, rl])
    s = summary_json([base, rl], "untrained")
    assert s["GRPO"]["x_base_f1"] == pytest.approx(2.5) and s["untrained"]["wall_s"] == 90.0
    png = plot_comparison([base, rl], tmp_path / "c.png", title="t")
    assert pathlib.Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_delta_and_its_bootstrap_interval(tmp_path):
    from mr1.eval.compare import paired_f1_delta

    ids = [f"c/q{i}" for i in range(40)]
    base = load_run("b", write_run(tmp_path / "b", {"overall": 20.0}, ids=ids,
                                   per_question=[0.2] * 40))
    same_gain = load_run("s", write_run(tmp_path / "s", {"overall": 30.0}, ids=ids,
                                        per_question=[0.3] * 40))
    delta, lo, hi = paired_f1_delta(same_gain, base)        # +10 on every question: no spread
    assert delta == pytest.approx(10.0) and lo == pytest.approx(10.0) and hi == pytest.approx(10.0)
    half = load_run("h", write_run(tmp_path / "h", {"overall": 30.0}, ids=ids,
                                   per_question=[0.2, 0.4] * 20))   # +20 on half of them
    delta, lo, hi = paired_f1_delta(half, base)
    assert delta == pytest.approx(10.0) and 0.0 < lo < 10.0 < hi < 20.0
    assert paired_f1_delta(half, base) == (delta, lo, hi)              # seeded


def test_different_questions_do_not_compare(tmp_path):
    a = load_run("a", write_run(tmp_path / "a", {"overall": 1.0}, ids=("q0", "q1", "q2")))
    b = load_run("b", write_run(tmp_path / "b", {"overall": 2.0}, ids=("q0", "q1")))
    with pytest.raises(ValueError, match=r"'a' and 'b' answered different questions \(3 vs 2; "
                                         r"1 only in the first, 0 only in the second\)"):
        check_same_questions([a, b])
    with pytest.raises(ValueError, match="different questions"):
        compare_table([a, b])


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json"):
        load_run("x", tmp_path)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="no per-category table"):
        load_run("x", tmp_path)
    assert parse_run_args(["A=runs/a", "runs/b"]) == [("A", "runs/a"), ("b", "runs/b")]
    with pytest.raises(ValueError, match="given twice"):
        parse_run_args(["A=x", "A=y"])
    with pytest.raises(ValueError, match="NAME=WORKDIR"):
        parse_run_args(["=x"])
    a = load_run("a", write_run(tmp_path / "a", {"overall": 1.0}))
    with pytest.raises(ValueError, match="base 'zz' is not one of the runs"):
        compare_table([a], base="zz")


def test_cli_writes_table_json_and_plot(tmp_path):
    write_run(tmp_path / "base", {"overall": 5.0})
    write_run(tmp_path / "rl", {"overall": 12.5})
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "compare.py"),
                        f"base={tmp_path / 'base'}", f"RL={tmp_path / 'rl'}", "--base=base",
                        f"--out={out}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "| RL | **12.50** | 6.25 | n/a | 2.50 | +0.00 [+0.00, +0.00] | 1 | 1.5 min |" in r.stdout
    assert (out / "compare.md").read_text() in r.stdout
    assert json.loads((out / "compare.json").read_text())["RL"]["x_base_f1"] == 2.5
    assert (out / "compare.png").stat().st_size > 1000
    bad = subprocess.run([sys.executable, str(ROOT / "experiments" / "compare.py"),
                          f"x={tmp_path / 'missing'}"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "no results.json" in bad.stderr


def test_cli_draws_the_op_distributions(tmp_path):
    """--ops_png: one bar group per op, from the runs with memory_ops (others are skipped;
    invalid outputs, counted among NOOPs by evaluate.py, are shown as INVALID only)."""
    write_run(tmp_path / "add_all", {"overall": 5.0})
    rl = write_run(tmp_path / "rl", {"overall": 7.0})
    res = json.loads((rl / "results.json").read_text())
    res["memory_ops"] = {"ops": {"ADD": 6, "UPDATE": 2, "NOOP": 3}, "invalid": {"unknown_id": 1},
                         "refused": {}}
    (rl / "results.json").write_text(json.dumps(res))
    png = tmp_path / "ops.png"
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "compare.py"),
                        f"add_all={tmp_path / 'add_all'}", f"RL={rl}", f"--ops_png={png}"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "RL ops: ADD 6, UPDATE 2, DELETE 0, NOOP 2, INVALID 1" in r.stdout
    assert "add_all ops" not in r.stdout and png.stat().st_size > 1000
    none = subprocess.run([sys.executable, str(ROOT / "experiments" / "compare.py"),
                           f"x={tmp_path / 'add_all'}", f"--ops_png={png}"],
                          capture_output=True, text=True, cwd=ROOT)
    assert none.returncode != 0 and "no run has memory_ops" in none.stderr
