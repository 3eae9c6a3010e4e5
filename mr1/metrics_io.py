"""Training-metric logging: an append-only CSV, TensorBoard scalar event files, and plots.

Dependency-free apart from numpy and matplotlib; no tensorflow, tensorboard or tensorboardX.

* ``<workdir>/metrics.csv`` has columns ``step``, ``time`` (unix seconds), then the metric names
  in sorted order. Each :meth:`MetricsWriter.write` appends one row and flushes, so a ``kill -9``
  loses at most the row being written (a partial last line, which readers drop). Metrics that
  appear later (validation every N steps) widen the header: the file is rewritten once with the
  union of the columns (atomically: a temporary file, then ``os.replace``); absent cells are
  empty. Values are written as Python floats (``repr``), so NaN/inf come out as ``nan``/``inf``.
  Two writes at one step give two rows; :func:`read_csv` and :func:`plot_curves` cope with that.
* ``<workdir>/tb/events.out.tfevents.<int time>.<hostname>.mr1`` is a TFRecord file of hand-encoded
  ``Event`` protobufs: a first record with ``file_version = "brain.Event:2"``, then one event per
  write holding a ``Summary`` with one ``simple_value`` per metric (float32, as TensorBoard stores
  scalars). TFRecord framing: uint64 length, masked CRC32C of the length, data, masked CRC32C of
  the data; CRC32C (Castagnoli) is table-driven pure Python. :func:`read_events` decodes such
  files (ours or other writers' scalar summaries) and checks every CRC.
* Resume (``resume_step`` given): CSV rows with ``step > resume_step`` are dropped, since they were
  logged after the checkpoint the run restarts from and would otherwise be duplicated. TensorBoard
  gets a new event file that opens with a ``SessionLog.START`` at ``resume_step + 1``, the marker
  TensorBoard's loader uses to purge the orphaned later points of earlier files.
* Only process 0 writes (multi-host runs call the writer everywhere); elsewhere it is a no-op.

:func:`plot_curves` draws chosen CSV columns against ``step`` with matplotlib's Agg canvas (no
display, and no change to pyplot's global backend): one subplot per panel, NaN cells skipped so
sparse validation columns draw as lines with markers, and noisy columns (more than 10 points)
drawn faintly with a debiased EMA over them. :func:`plot_op_distribution` draws Memory Manager
op distributions (fractions, raw counts on top) as grouped bars; :func:`op_counts_from_results`
reads them from an ``experiments/evaluate.py`` ``results.json``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typing.Self is Python 3.11+; annotations are not evaluated at run time
    from typing import Self

import numpy as np

__all__ = ["MetricsWriter", "crc32c", "ema", "masked_crc32c", "op_counts_from_results",
           "plot_curves", "plot_op_distribution", "read_csv", "read_events"]

CSV_NAME = "metrics.csv"
TB_DIRNAME = "tb"
_RESERVED = ("step", "time")
_FILE_VERSION = "brain.Event:2"

# --------------------------------------------------------------------------------------------
# CRC32C (Castagnoli), reflected polynomial 0x82F63B78, and TFRecord framing.
# --------------------------------------------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (``crc32c(b"123456789") == 0xE3069283``)."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits, add a constant (mod 2**32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _frame_record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header)) + data
            + struct.pack("<I", masked_crc32c(data)))


def _iter_records(blob: bytes, path: str = "") -> Iterator[bytes]:
    """TFRecord payloads of ``blob``; a CRC mismatch raises ``ValueError``.

    A truncated final record (the writer was killed mid-write) ends the iteration quietly, as in
    TensorBoard's own reader; its length was checked by CRC first, so a corrupt length is not
    mistaken for truncation.
    """
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


# --------------------------------------------------------------------------------------------
# Protobuf wire format: just what Event / Summary / SessionLog need.
# --------------------------------------------------------------------------------------------

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 -> ten-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, _LEN) + _varint(len(payload)) + payload


def _encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                  summary: bytes | None = None, session_log: bytes | None = None) -> bytes:
    out = _key(1, _I64) + struct.pack("<d", wall_time) + _key(2, _VARINT) + _varint(step)
    if file_version is not None:
        out += _len_field(3, file_version.encode("utf-8"))
    if summary is not None:
        out += _len_field(5, summary)
    if session_log is not None:
        out += _len_field(7, session_log)
    return out


def _encode_summary(values: Mapping[str, float]) -> bytes:
    out = b""
    for tag, value in values.items():
        val = _len_field(1, tag.encode("utf-8")) + _key(2, _I32) + struct.pack("<f", _to_f32(value))
        out += _len_field(1, val)
    return out


def _to_f32(value: float) -> float:
    """``value`` as float32 can hold it: too large finite values become +-inf, not an error."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


_SESSION_START = _key(1, _VARINT) + _varint(1)  # SessionLog{status: START}


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) triples; LEN values are bytes, I64/I32 raw bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire == _I64:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == _I32:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == _LEN:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf field")
        yield field, wire, value


def _decode_event(data: bytes) -> list[dict[str, Any]]:
    """Scalar summary values of one ``Event`` (an empty list for other events)."""
    wall_time, step, summaries = 0.0, 0, []
    for field, wire, value in _fields(data):
        if field == 1 and wire == _I64:
            (wall_time,) = struct.unpack("<d", value)
        elif field == 2 and wire == _VARINT:
            step = value - (1 << 64) if value >= 1 << 63 else value
        elif field == 5 and wire == _LEN:
            summaries.append(value)
    rows = []
    for summary in summaries:
        for field, wire, value in _fields(summary):
            if field != 1 or wire != _LEN:
                continue
            tag, scalar = None, None
            for vfield, vwire, vvalue in _fields(value):
                if vfield == 1 and vwire == _LEN:
                    tag = vvalue.decode("utf-8")
                elif vfield == 2 and vwire == _I32:
                    (scalar,) = struct.unpack("<f", vvalue)
            if tag is not None and scalar is not None:
                rows.append({"step": step, "wall_time": wall_time, "tag": tag, "value": scalar})
    return rows


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Scalars (``simple_value``) of an event file, or of every event file in a directory.

    Returns dicts ``{"step", "wall_time", "tag", "value"}`` in file order (directories: files in
    name order, which is creation-time order). Raises ``ValueError`` on a CRC mismatch or a
    malformed protobuf.
    """
    path = Path(path)
    files = sorted(p for p in path.iterdir() if "tfevents" in p.name) if path.is_dir() else [path]
    rows: list[dict[str, Any]] = []
    for file in files:
        for record in _iter_records(file.read_bytes(), str(file)):
            rows.extend(_decode_event(record))
    return rows


class _EventFileWriter:
    """Appends framed ``Event`` records to a new file under ``logdir``."""

    def __init__(self, logdir: Path, *, start_step: int | None = None):
        logdir.mkdir(parents=True, exist_ok=True)
        stamp = int(time.time())
        host = socket.gethostname() or "localhost"
        while (logdir / f"events.out.tfevents.{stamp}.{host}.mr1").exists():
            stamp += 1  # a restart within the same second: keep the earlier file
        self.path = logdir / f"events.out.tfevents.{stamp}.{host}.mr1"
        self._file = open(self.path, "xb")  # noqa: SIM115 (held open across writes)
        self._write(_encode_event(time.time(), 0, file_version=_FILE_VERSION))
        if start_step is not None:
            self._write(_encode_event(time.time(), start_step, session_log=_SESSION_START))

    def _write(self, event: bytes) -> None:
        self._file.write(_frame_record(event))
        self._file.flush()

    def scalars(self, step: int, wall_time: float, values: Mapping[str, float]) -> None:
        self._write(_encode_event(wall_time, step, summary=_encode_summary(values)))

    def close(self) -> None:
        self._file.close()


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
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return str(png_path)


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
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return str(png_path)
