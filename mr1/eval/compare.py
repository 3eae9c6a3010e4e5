"""Side-by-side tables of ``evaluate.py`` runs: one row per run, per-category F1, overall F1 /
BLEU-1 / J, the ratio to a base run's F1, and the wall time -- the paper's table layout. With a
base run, each row also gets its F1 difference to the base with a 95% paired bootstrap interval
over the questions (both runs answered the same ones), so a gap within noise reads as such.

Each run is a workdir holding ``results.json`` (and ``predictions.jsonl``, whose question ids
must be the same set in every run: rows on different questions do not compare, so that is an
error, not a footnote).

    python experiments/compare.py untrained=runs/eval_base GRPO=runs/eval_grpo --base=untrained
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

OVERALL = "overall"


@dataclasses.dataclass(frozen=True)
class Run:
    """One evaluated run: its name, ``results.json`` and the ids of the questions answered."""

    name: str
    path: pathlib.Path
    results: dict[str, Any]
    question_ids: frozenset[str] | None  # None: no predictions.jsonl beside results.json
    f1_by_question: Mapping[str, float] | None = None  # question id -> F1 (0-1)

    @property
    def table(self) -> dict[str, dict[str, Any]]:
        return self.results["table"]

    @property
    def categories(self) -> list[str]:
        return [c for c in self.table if c != OVERALL]


def load_run(name: str, workdir: str | os.PathLike) -> Run:
    """Reads ``workdir/results.json`` (and the question ids of ``predictions.jsonl``).

    Raises:
      FileNotFoundError: no ``results.json`` (the evaluation has not finished there).
      ValueError: a ``results.json`` without the per-category table.
    """
    path = pathlib.Path(workdir)
    res_path = path / "results.json"
    if not res_path.is_file():
        raise FileNotFoundError(f"{name}: no results.json in {path} (has evaluate.py finished "
                                "there?)")
    results = json.loads(res_path.read_text())
    if OVERALL not in results.get("table", {}):
        raise ValueError(f"{name}: {res_path} has no per-category table with an "
                         f"{OVERALL!r} row")
    pred = path / "predictions.jsonl"
    ids, f1 = None, None
    if pred.is_file():
        with open(pred) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        ids = frozenset(r["question_id"] for r in rows)
        f1 = {r["question_id"]: float(r["f1"]) for r in rows if r.get("f1") is not None}
    return Run(name, path, results, ids, f1)


def paired_f1_delta(run: Run, base: Run, n_boot: int = 2000, seed: int = 0
                    ) -> tuple[float, float, float] | None:
    """``run``'s F1 minus ``base``'s on their common questions, in F1 points, with the 2.5% and
    97.5% percentiles of ``n_boot`` paired bootstrap resamples of those questions (None when a
    run has no per-question scores)."""
    import numpy as np

    if not run.f1_by_question or not base.f1_by_question:
        return None
    common = sorted(set(run.f1_by_question) & set(base.f1_by_question))
    if not common:
        return None
    d = 100.0 * np.asarray([run.f1_by_question[q] - base.f1_by_question[q] for q in common])
    boot = np.random.default_rng(seed).choice(d, size=(n_boot, d.size)).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def check_same_questions(runs: Sequence[Run]) -> None:
    """Raises ValueError naming the first run whose question set differs from the first's."""
    ref = next((r for r in runs if r.question_ids is not None), None)
    for r in runs:
        if ref is None or r.question_ids is None or r.question_ids == ref.question_ids:
            continue
        only_ref, only_r = len(ref.question_ids - r.question_ids), len(r.question_ids -
                                                                       ref.question_ids)
        raise ValueError(f"runs {ref.name!r} and {r.name!r} answered different questions "
                         f"({len(ref.question_ids)} vs {len(r.question_ids)}; {only_ref} only "
                         f"in the first, {only_r} only in the second): their scores do not "
                         "compare")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def compare_table(runs: Sequence[Run], base: str | None = None) -> str:
    """The Markdown table of ``runs`` (see the module docstring); ``base`` names the run the
    "x base F1" column divides by (omitted when None)."""
    if not runs:
        raise ValueError("no runs to compare")
    check_same_questions(runs)
    by_name = {r.name: r for r in runs}
    if base is not None and base not in by_name:
        raise ValueError(f"base {base!r} is not one of the runs {sorted(by_name)}")
    cats = list(dict.fromkeys(c for r in runs for c in r.categories))
    head = ["run", *[f"{c} F1" for c in cats], "overall F1", "BLEU-1", "J"]
    head += ["x base F1", "F1 - base [95% CI]"] if base else []
    head += ["n", "wall"]
    lines = ["| " + " | ".join(head) + " |",
             "|---|" + "---:|" * (len(head) - 1)]
    base_f1 = by_name[base].table[OVERALL]["f1"] if base else None
    for r in runs:
        row = r.table[OVERALL]
        cells = [r.name, *[_fmt(r.table.get(c, {}).get("f1")) for c in cats],
                 f"**{row['f1']:.2f}**", _fmt(row.get("bleu1")), _fmt(row.get("j"))]
        if base:
            cells.append(f"{row['f1'] / base_f1:.2f}" if base_f1 else "n/a")
            delta = paired_f1_delta(r, by_name[base]) if r.name != base else None
            cells.append("n/a" if delta is None else
                         "{:+.2f} [{:+.2f}, {:+.2f}]".format(*delta))
        wall = r.results.get("wall_s")
        cells += [str(row.get("n", "")), f"{wall / 60:.1f} min" if wall else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def capacity_table(runs: Sequence[Run]) -> str:
    """Markdown table of the memory budget of the ``runs`` whose ``results.json`` has
    ``memory_ops`` (evaluate.py's memory method): slots per speaker, full policy, ops applied,
    ADDs refused by a full bank, memories evicted, texts truncated, invalid manager outputs,
    and the questions with a fact of an evidence turn in the banks ("" when none of the runs
    built banks)."""
    rows = [r for r in runs if r.results.get("memory_ops")]
    if not rows:
        return ""
    head = ["run", "manager", "slots", "full policy", "ADD", "UPDATE", "DELETE", "NOOP",
            "refused (full)", "evicted", "truncated", "invalid outputs", "evidence held"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---|" + "---:|" * (len(head) - 4)]
    for r in rows:
        m = r.results["memory_ops"]
        ops = m.get("ops", {})
        cells = [r.name, str(m.get("manager", "n/a")), str(m.get("num_slots", "n/a")),
                 str(m.get("full_policy", "n/a")),
                 *[str(ops.get(k, 0)) for k in ("ADD", "UPDATE", "DELETE", "NOOP")],
                 *[str(m.get(k, "n/a")) for k in ("bank_full", "evicted", "truncated")],
                 str(sum(m.get("invalid", {}).values()))]
        cov = r.results.get("evidence_coverage") or {}
        cells.append(f"{cov['covered']} / {cov['questions']}" if cov else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(runs: Sequence[Run], png_path: str | os.PathLike, title: str = "") -> str:
    """Grouped bars of F1 per category (overall last), one colour per run. Returns the path."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cats = list(dict.fromkeys(c for r in runs for c in r.categories)) + [OVERALL]
    fig = Figure(figsize=(1.5 + 1.1 * len(cats) * max(1, len(runs)) * 0.45, 3.8),
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(runs))
    x = np.arange(len(cats))
    for i, r in enumerate(runs):
        f1s = [r.table.get(c, {}).get("f1") or 0.0 for c in cats]
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, f1s, width, label=r.name,
                      color=f"C{i % 10}")
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in f1s], fontsize="x-small", padding=1)
    ax.set_xticks(x, cats)
    ax.set_ylabel("F1")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    fig.savefig(png_path, dpi=110)
    return str(png_path)


def parse_run_args(args: Sequence[str]) -> list[tuple[str, str]]:
    """``NAME=WORKDIR`` pairs (a bare ``WORKDIR`` is named after its last path part).

    Raises:
      ValueError: an empty name or path, or a name given twice.
    """
    out: list[tuple[str, str]] = []
    for a in args:
        name, sep, path = a.partition("=")
        if not sep:
            name, path = pathlib.Path(a).name, a
        if not name or not path:
            raise ValueError(f"expected NAME=WORKDIR, got {a!r}")
        if name in dict(out):
            raise ValueError(f"run name {name!r} given twice")
        out.append((name, path))
    return out


def summary_json(runs: Sequence[Run], base: str | None = None) -> dict[str, Mapping[str, Any]]:
    """``{run: {category: {n, f1, bleu1, j}}, ...}`` plus the ratio to ``base`` per run."""
    base_f1 = next((r.table[OVERALL]["f1"] for r in runs if r.name == base), None)
    return {r.name: {"workdir": str(r.path), "table": r.table, "wall_s": r.results.get("wall_s"),
                     "x_base_f1": (r.table[OVERALL]["f1"] / base_f1) if base_f1 else None}
            for r in runs}
