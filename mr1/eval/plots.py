"""Plots of evaluation outputs: the Memory Manager's op distribution.

:func:`op_counts_from_results` reads the op counts of an ``experiments/evaluate.py``
``results.json`` (its ``memory_ops`` block); :func:`plot_op_distribution` draws several runs'
distributions (fractions, raw counts on top) as grouped bars with matplotlib's Agg canvas (no
display, no change to pyplot's global backend). ``experiments/compare.py --ops_png`` uses both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["OPS", "op_counts_from_results", "plot_op_distribution", "save_png"]

OPS = ("ADD", "UPDATE", "DELETE", "NOOP", "INVALID")


def op_counts_from_results(results_json_path: str | os.PathLike) -> dict[str, int]:
    """``{"ADD": n, "UPDATE": n, "DELETE": n, "NOOP": n, "INVALID": invalid + refused}`` from
    the ``memory_ops`` block of an ``experiments/evaluate.py`` ``results.json``.

    The categories are disjoint: the parser turns an invalid output into a NOOP, which
    ``memory_ops["ops"]["NOOP"]`` includes; here it counts as INVALID only (bank refusals are
    not among the applied ops).
    """
    ops = json.loads(Path(results_json_path).read_text()).get("memory_ops")
    if not ops:
        raise ValueError(f"{results_json_path} has no memory_ops (not a memory-method run?)")
    counts = {op: int(ops["ops"].get(op, 0)) for op in OPS[:-1]}
    invalid = sum(ops["invalid"].values())
    counts["NOOP"] = max(0, counts["NOOP"] - invalid)
    counts["INVALID"] = invalid + sum(ops["refused"].values())
    return counts


def plot_op_distribution(counts: Mapping[str, Mapping[str, int]], png_path: str | os.PathLike,
                         title: str = "") -> str:
    """Grouped bars of op fractions: one group per op (ADD, UPDATE, DELETE, NOOP, then INVALID
    when an entry has it), one colour per entry of ``counts`` (e.g. ``{"prompted manager":
    {...}, "GRPO manager": {...}}``), each bar its count over that entry's total, the count
    written on top. Returns ``png_path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ops = [op for op in OPS if op != "INVALID" or any(op in c for c in counts.values())]
    fig = Figure(figsize=(max(5.0, 1.0 + len(ops) * (0.4 + 0.35 * len(counts))), 3.8),
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(counts))
    x = np.arange(len(ops))
    for i, (name, c) in enumerate(counts.items()):
        raw = [int(c.get(op, 0)) for op in ops]
        total = sum(raw) or 1
        bars = ax.bar(x + (i - (len(counts) - 1) / 2) * width, [n / total for n in raw], width,
                      label=f"{name} (n={sum(raw)})", color=f"C{i % 10}")
        ax.bar_label(bars, labels=[str(n) for n in raw], fontsize="small", padding=1)
    ax.set_xticks(x, ops)
    ax.set_ylabel("fraction of ops")
    ax.set_ylim(0, 1.12)
    ax.grid(True, axis="y", alpha=0.3)
    if counts:
        ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return save_png(fig, png_path)


def save_png(fig, png_path: str | os.PathLike) -> str:
    """``fig`` saved as a 100-dpi PNG at ``png_path`` (parent folders made); returns the path."""
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return str(png_path)
