"""Training-metric logging: an append-only CSV, TensorBoard scalar event files, and plots.

numpy, matplotlib and tensorboardX (for the event files); no tensorflow or tensorboard.

* ``<workdir>/metrics.csv`` has columns ``step``, ``time`` (unix seconds), then the metric names
  in sorted order. Each :meth:`MetricsWriter.write` appends one row and flushes, so a ``kill -9``
  loses at most the row being written (a partial last line, which readers drop). Metrics that
  appear later (validation every N steps) widen the header: the file is rewritten once with the
  union of the columns (atomically: a temporary file, then ``os.replace``); absent cells are
  empty. Values are written as Python floats (``repr``), so NaN/inf come out as ``nan``/``inf``.
  Two writes at one step give two rows; :func:`read_csv` and :func:`plot_curves` cope with that.
* ``<workdir>/tb/events.out.tfevents.<int time>.<hostname>.<n>.mr1`` is an event file written
  by tensorboardX's ``FileWriter`` (``file_version = "brain.Event:2"`` first, then one event per
  write holding a ``Summary`` with one ``simple_value`` per metric, float32 as TensorBoard
  stores scalars; flushed per write). ``<n>`` counts the directory's earlier event files, so a
  restart within the same second gets its own file. :func:`read_events` reads scalar
  summaries back (any writer's), checking every record's CRC.
* Resume (``resume_step`` given): CSV rows with ``step > resume_step`` are dropped, since they were
  logged after the checkpoint the run restarts from and would otherwise be duplicated. TensorBoard
  gets a new event file that opens with a ``SessionLog.START`` at ``resume_step + 1``, the marker
  TensorBoard's loader uses to purge the orphaned later points of earlier files.
* Only process 0 writes (multi-host runs call the writer everywhere); elsewhere it is a no-op.

:func:`plot_curves` draws chosen CSV columns against ``step`` with matplotlib's Agg canvas (no
display, and no change to pyplot's global backend): one subplot per panel, NaN cells skipped so
sparse validation columns draw as lines with markers, and noisy columns (more than 10 points)
drawn faintly with a debiased EMA over them. (The op-distribution plot of evaluation runs
is :mod:`mr1.eval.plots`'.)
"""

from __future__ import annotations

import csv
import math
import os
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typing.Self is Python 3.11+; annotations are not evaluated at run time
    from typing import Self

import numpy as np

__all__ = ["MetricsWriter", "ema", "plot_curves", "read_csv", "read_events"]

CSV_NAME = "metrics.csv"
TB_DIRNAME = "tb"
_RESERVED = ("step", "time")

# --------------------------------------------------------------------------------------------
# TensorBoard event files, written and read through tensorboardX.
# --------------------------------------------------------------------------------------------


def _to_f32(value: float) -> float:
    """``value`` as float32 can hold it: too large finite values become +-inf, not an error."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def _iter_records(blob: bytes, path: str = "") -> Iterator[bytes]:
    """TFRecord payloads of ``blob`` (CRCs checked with tensorboardX's ``masked_crc32c``); a
    CRC mismatch raises ``ValueError``.

    A truncated final record (the writer was killed mid-write) ends the iteration quietly, as in
    TensorBoard's own reader; its length was checked by CRC first, so a corrupt length is not
    mistaken for truncation.
    """
    from tensorboardX.record_writer import masked_crc32c

    pos, n = 0, len(blob)
    while pos < n:
        if n - pos < 12:
            return
        header = blob[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", blob[pos + 8:pos + 12])
        if masked_crc32c(header) != length_crc:
            raise ValueError(f"{path}: length CRC mismatch in record at byte {pos}")
        if n - pos < 12 + length + 4:
            return
        data = blob[pos + 12:pos + 12 + length]
        (data_crc,) = struct.unpack("<I", blob[pos + 12 + length:pos + 16 + length])
        if masked_crc32c(data) != data_crc:
            raise ValueError(f"{path}: data CRC mismatch in record at byte {pos}")
        yield data
        pos += 16 + length


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Scalars (``simple_value``) of an event file, or of every event file in a directory.

    Returns dicts ``{"step", "wall_time", "tag", "value"}`` in file order (directories: files in
    name order, which is creation-time order). Raises ``ValueError`` on a CRC mismatch or a
    malformed record.
    """
    from google.protobuf.message import DecodeError
    from tensorboardX.proto.event_pb2 import Event

    path = Path(path)
    files = sorted(p for p in path.iterdir() if "tfevents" in p.name) if path.is_dir() else [path]
    rows: list[dict[str, Any]] = []
    for file in files:
        for record in _iter_records(file.read_bytes(), str(file)):
            try:
                event = Event.FromString(record)
            except DecodeError as e:
                raise ValueError(f"{file}: malformed event record") from e
            for v in event.summary.value:
                if v.WhichOneof("value") == "simple_value":
                    rows.append({"step": event.step, "wall_time": event.wall_time,
                                 "tag": v.tag, "value": v.simple_value})
    return rows


class _EventFileWriter:
    """A new event file under ``logdir`` (tensorboardX's ``FileWriter``), flushed per write."""

    def __init__(self, logdir: Path, *, start_step: int | None = None):
        from tensorboardX import FileWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        logdir.mkdir(parents=True, exist_ok=True)
        before = set(logdir.iterdir())
        # a per-directory counter in the name: a restart within the same second (tensorboardX
        # names files by the second) gets a file of its own
        n = sum(1 for p in before if "tfevents" in p.name)
        self._writer = FileWriter(str(logdir), filename_suffix=f".{n}.mr1")
        created = sorted(set(logdir.iterdir()) - before)
        self.path = created[0] if created else None
        if start_step is not None:
            self._writer.add_event(Event(wall_time=time.time(), step=start_step,
                                         session_log=SessionLog(status=SessionLog.START)))
        self._writer.flush()

    def scalars(self, step: int, wall_time: float, values: Mapping[str, float]) -> None:
        from tensorboardX.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=t, simple_value=_to_f32(v))
                                 for t, v in values.items()])
        self._writer.add_summary(summary, global_step=step, walltime=wall_time)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


# --------------------------------------------------------------------------------------------
# CSV.
# --------------------------------------------------------------------------------------------


def _to_float(name: str, value: Any) -> float:
    """A Python float from a Python/numpy/JAX scalar (or size-1 array)."""
    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype.kind not in "biuf":
        raise TypeError(f"metric {name!r} must be a real scalar, got {type(value).__name__} "
                        f"with dtype {arr.dtype} and shape {arr.shape}")
    return float(arr.reshape(()))


def _format(value: float | None) -> str:
    if value is None:
        return ""
    return repr(value)  # shortest round-trip; nan / inf / -inf for non-finite floats


def _load_rows(path: Path) -> tuple[list[str], list[dict[str, str]], bool]:
    """Header, rows and whether the file ended with a partial line (which is left out)."""
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    partial = bool(text) and not text.endswith("\n")
    if partial:
        text = text[:text.rfind("\n") + 1]
    lines = text.splitlines(keepends=True)
    if not lines:
        return [], [], partial
    reader = csv.DictReader(lines)
    return list(reader.fieldnames or []), list(reader), partial


def _write_rows_atomic(path: Path, header: Sequence[str], rows: Sequence[Mapping[str, str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(header), restval="", extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _parse_cell(cell: str | None) -> float:
    if cell is None or cell.strip() == "":
        return math.nan
    try:
        return float(cell)
    except ValueError:
        return math.nan


def read_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Columns of a metrics CSV as float64 arrays (NaN for empty or unparsable cells).

    A partial last line (a writer killed mid-row) is ignored.
    """
    header, rows, _ = _load_rows(Path(path))
    return {name: np.array([_parse_cell(r.get(name)) for r in rows], dtype=np.float64)
            for name in header}


class MetricsWriter:
    """Writes metrics to ``<workdir>/metrics.csv`` and (optionally) TensorBoard event files.

    Args:
      workdir: run directory (created if needed, on process 0 only).
      resume_step: the checkpoint step a resumed run restarts from; CSV rows with a larger step
        are dropped and TensorBoard is told to purge its later points. ``None``: a fresh run
        (an existing CSV is appended to, never truncated).
      tensorboard: also write TensorBoard scalar event files under ``<workdir>/tb/``.
      process_index: this process's index; default ``jax.process_index()``. Only 0 writes.
    """

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None,
                 tensorboard: bool = True, process_index: int | None = None):
        if process_index is None:
            import jax

            process_index = jax.process_index()
        self.workdir = Path(workdir)
        self.csv_path = self.workdir / CSV_NAME
        self.active = process_index == 0
        self.closed = False
        self._columns: list[str] = list(_RESERVED)
        self._csv = None
        self._tb: _EventFileWriter | None = None
        if not self.active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._open_csv(resume_step)
        if tensorboard:
            start = None if resume_step is None else int(resume_step) + 1
            self._tb = _EventFileWriter(self.workdir / TB_DIRNAME, start_step=start)

    @property
    def tb_path(self) -> Path | None:
        """The event file being written, if any."""
        return self._tb.path if self._tb is not None else None

    @property
    def columns(self) -> list[str]:
        """The CSV header: ``step``, ``time``, then the metric names sorted."""
        return list(self._columns)

    def _open_csv(self, resume_step: int | None) -> None:
        if self.csv_path.exists():
            header, rows, partial = _load_rows(self.csv_path)
            if header and header[:2] != list(_RESERVED):
                raise ValueError(f"{self.csv_path} is not a metrics CSV (header {header[:2]})")
            kept = rows
            if resume_step is not None:
                kept = [r for r in rows if not _parse_cell(r.get("step")) > resume_step]
            if header:
                self._columns = list(_RESERVED) + sorted(set(header[2:]))
            if partial or len(kept) != len(rows) or not header or header != self._columns:
                _write_rows_atomic(self.csv_path, self._columns, kept)
        else:
            _write_rows_atomic(self.csv_path, self._columns, [])
        self._csv = open(self.csv_path, "a", encoding="utf-8", newline="")  # noqa: SIM115

    def _widen(self, names: Sequence[str]) -> None:
        """Rewrites the CSV with ``names`` added to the header."""
        assert self._csv is not None
        self._csv.close()
        _, rows, _ = _load_rows(self.csv_path)
        self._columns = list(_RESERVED) + sorted(set(self._columns[2:]) | set(names))
        _write_rows_atomic(self.csv_path, self._columns, rows)
        self._csv = open(self.csv_path, "a", encoding="utf-8", newline="")  # noqa: SIM115

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends one row (and one TensorBoard event) for ``step``; a no-op off process 0."""
        if self.closed:
            raise RuntimeError("MetricsWriter is closed")
        if not self.active:
            return
        step = int(step)
        values = {}
        for name, value in metrics.items():
            if not isinstance(name, str) or name in _RESERVED:
                raise ValueError(f"invalid metric name {name!r}")
            values[name] = _to_float(name, value)
        wall_time = time.time()
        new = [n for n in values if n not in self._columns]
        if new:
            self._widen(new)
        row = {"step": step, "time": wall_time, **values}
        assert self._csv is not None
        out = csv.writer(self._csv, lineterminator="\n")
        out.writerow([_format(row.get(c)) for c in self._columns])
        self._csv.flush()
        if self._tb is not None and values:
            self._tb.scalars(step, wall_time, values)

    def close(self) -> None:
        """Closes the files; idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._csv is not None:
            self._csv.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Plots.
# --------------------------------------------------------------------------------------------


def ema(values: np.ndarray, weight: float = 0.8) -> np.ndarray:
    """Exponential moving average, debiased as in TensorBoard's smoothing slider."""
    out = np.empty(len(values), dtype=np.float64)
    acc = 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1.0 - weight) * float(v)
        out[i] = acc / (1.0 - weight ** (i + 1))
    return out


def _draw_column(ax, steps: np.ndarray, y: np.ndarray, name: str, color: str) -> bool:
    """Plots the finite points of one column; returns whether anything was drawn."""
    keep = np.isfinite(steps) & np.isfinite(y)
    x, y = steps[keep], y[keep]
    if not len(x):
        return False
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    sparse = len(x) < 0.5 * len(steps) or len(x) <= 30
    marker = "o" if sparse else None
    if len(x) > 10:
        ax.plot(x, y, color=color, alpha=0.25, linewidth=1.0, marker=marker, markersize=3)
        ax.plot(x, ema(y), color=color, linewidth=1.8, label=f"{name} (EMA 0.8)")
    else:
        ax.plot(x, y, color=color, linewidth=1.5, marker=marker, markersize=4, label=name)
    return True


def plot_curves(csv_path: str | os.PathLike, png_path: str | os.PathLike, *,
                panels: Sequence[tuple[str, Sequence[str]]], title: str = "") -> str:
    """Draws ``panels`` (title, column names) from a metrics CSV against ``step`` into a PNG.

    Absent or all-NaN columns are skipped (a panel left empty says so). Returns ``png_path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = read_csv(csv_path)
    steps = data.get("step", np.zeros(0))
    n = max(1, len(panels))
    ncols = min(n, 2)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(6.0 * ncols, 3.8 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    colors = [f"C{i}" for i in range(10)]
    for i, (panel_title, names) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        drawn = 0
        for name in names:
            if name in data and _draw_column(ax, steps, data[name], name, colors[drawn % 10]):
                drawn += 1
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    return save_png(fig, png_path)


# moved to mr1.eval.plots (evaluation outputs, not training metrics); kept importable here
from mr1.eval.plots import (  # noqa: E402,F401
    OPS,
    op_counts_from_results,
    plot_op_distribution,
    save_png,
)
