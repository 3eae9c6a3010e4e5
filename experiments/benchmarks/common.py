"""Helpers shared by the benchmark scripts: the measured matmul peak, median timing, useful
FLOP counts and Markdown table lines.

The scripts run as ``python experiments/benchmarks/<script>.py``, which puts this folder first
on ``sys.path``; they import this module as ``common``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak_gflops(n: int = 2048, repeats: int = 7) -> float:
    """Float32 GFLOP/s of one jitted ``n x n`` matmul (median of ``repeats`` after a warm-up):
    the peak that MFU figures are quoted against."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def machine_line(peak: float) -> str:
    """``machine: cpu x1, float32 matmul peak 176 GFLOP/s (2048² jnp matmul, median)``."""
    return (f"machine: {jax.devices()[0].platform} x{len(jax.devices())}, float32 matmul peak "
            f"{peak:.0f} GFLOP/s (2048² jnp matmul, median)")


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls (``fn`` must block until done)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def generation_flops(cfg, batch: int, prompt: int, new: int) -> float:
    """Useful FLOPs: prompt tokens without the LM head (only the last needs it), then decode."""
    head = 2.0 * cfg.hidden_size * cfg.vocab_size
    pre = sum(cfg.flops_per_token(context=c + 1) - head for c in range(prompt)) + head
    dec = sum(cfg.flops_per_token(context=prompt + i + 1) for i in range(new - 1))
    return batch * (pre + dec)


def table_header(columns: Sequence[str], align: str) -> str:
    """The two header lines of a Markdown table; ``align`` has one ``l`` or ``r`` per column."""
    if len(align) != len(columns):
        raise ValueError(f"{len(columns)} columns but align={align!r}")
    rule = "|".join("---" if a == "l" else "---:" for a in align)
    return f"{table_row(columns)}\n|{rule}|"


def table_row(cells: Sequence[str]) -> str:
    """One Markdown table row: ``| a | b | c |``."""
    return "| " + " | ".join(str(c) for c in cells) + " |"
