"""Prints evaluate.py runs side by side (the paper's table layout) and draws their F1 bars.

    python experiments/compare.py untrained=runs/eval_base RAG=runs/eval_rag \
        GRPO=runs/eval_grpo --base=untrained --out=runs/compare

Each argument is ``NAME=WORKDIR`` (a workdir holding ``results.json`` and
``predictions.jsonl``); every run must have answered the same questions. ``--out=DIR`` also
writes ``DIR/compare.md``, ``DIR/compare.json`` and ``DIR/compare.png`` (F1 per category).
Runs that built memory banks also get a table of their budget (slots per speaker, full
policy, ops, ADDs refused by a full bank, evictions, truncations). ``--ops_png=PATH`` draws the Memory Manager op distributions (ADD / UPDATE / DELETE / NOOP /
invalid) of the runs that built their banks with a manager as grouped bars, e.g.

    python experiments/compare.py prompted=runs/abl/prompted RL=runs/abl/rl \
        --ops_png=docs/memory_ops.png --title="Memory Manager ops on the LoCoMo test split"
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_BASE = flags.DEFINE_string("base", "", "the run whose overall F1 the 'x base F1' column divides "
                            "by (default: none)")
_OUT = flags.DEFINE_string("out", "", "also write compare.md / .json / .png in this directory")
_TITLE = flags.DEFINE_string("title", "", "title of the plot")
_OPS_PNG = flags.DEFINE_string("ops_png", "", "also draw the op distributions of the runs "
                               "whose results.json has memory_ops into this PNG")


def main(argv) -> None:
    from mr1.eval.compare import (capacity_table, compare_table, load_run, parse_run_args,
                                  plot_comparison, summary_json)

    if len(argv) < 2:
        raise app.UsageError("give one or more NAME=WORKDIR runs")
    try:
        runs = [load_run(name, path) for name, path in parse_run_args(argv[1:])]
        table = compare_table(runs, _BASE.value or None)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(str(e)) from e
    capacity = capacity_table(runs)   # the memory budget's events, for runs with banks
    table += ("\n" + capacity) if capacity else ""
    print(table, end="")
    if _OUT.value:
        out = pathlib.Path(_OUT.value)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(table)
        (out / "compare.json").write_text(
            json.dumps(summary_json(runs, _BASE.value or None), indent=1) + "\n")
        png = plot_comparison(runs, out / "compare.png", title=_TITLE.value)
        print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {png}")
    if _OPS_PNG.value:
        from mr1.eval.plots import op_counts_from_results, plot_op_distribution

        counts = {r.name: op_counts_from_results(r.path / "results.json") for r in runs
                  if r.results.get("memory_ops")}
        if not counts:
            raise app.UsageError("--ops_png: no run has memory_ops (none built its banks with "
                                 "a Memory Manager)")
        for name, c in counts.items():
            print(f"{name} ops: " + ", ".join(f"{k} {v}" for k, v in c.items()))
        print(f"wrote {plot_op_distribution(counts, _OPS_PNG.value, title=_TITLE.value)}")


if __name__ == "__main__":
    from mr1.entry import run_main
    run_main(main)  # user errors: one line, exit 2
