"""metrics_io: CSV round trip and resume, process gating, TensorBoard events (tensorboardX),
plots."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from mr1 import metrics_io
from mr1.eval import plots
from mr1.metrics_io import MetricsWriter, plot_curves, read_csv, read_events


def _write_run(workdir, steps=range(1, 6), val_every=2, **kwargs):
    with MetricsWriter(workdir, process_index=0, **kwargs) as w:
        for s in steps:
            w.write(s, {"loss": 1.0 / s, "reward_mean": np.float32(s * 0.5)})
            if s % val_every == 0:
                w.write(s, {"val_f1": s / 10})
    return w


def test_csv_round_trip_with_late_column_and_nonfinite(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    with MetricsWriter(tmp_path, process_index=0, tensorboard=False) as w:
        w.write(0, {"b": 1, "a": np.float64(0.25)})
        w.write(1, {"a": float("nan"), "b": float("inf"), "c": jnp.asarray(3.5)})
        w.write(2, {"a": -float("inf"), "b": np.int32(7)})
        assert w.columns == ["step", "time", "a", "b", "c"]
    text = (tmp_path / "metrics.csv").read_text()
    lines = text.splitlines()
    assert lines[0] == "step,time,a,b,c"
    assert lines[1].endswith(",0.25,1.0,")  # the column that appeared later is empty here
    assert ",nan,inf,3.5" in lines[2] and ",-inf,7.0," in lines[3]
    cols = read_csv(tmp_path / "metrics.csv")
    assert list(cols) == ["step", "time", "a", "b", "c"]
    np.testing.assert_array_equal(cols["step"], [0, 1, 2])
    np.testing.assert_array_equal(cols["a"], [0.25, np.nan, -np.inf])
    np.testing.assert_array_equal(cols["b"], [1.0, np.inf, 7.0])
    np.testing.assert_array_equal(cols["c"], [np.nan, 3.5, np.nan])
    assert np.all(np.abs(cols["time"] - cols["time"][0]) < 60)


def test_bad_metric_values_raise(tmp_path):
    with MetricsWriter(tmp_path, process_index=0, tensorboard=False) as w:
        with pytest.raises(TypeError):
            w.write(0, {"x": np.ones(3)})
        with pytest.raises(ValueError):
            w.write(0, {"step": 1.0})


def test_resume_drops_rows_after_resume_step(tmp_path):
    _write_run(tmp_path, steps=range(1, 9))
    with MetricsWriter(tmp_path, process_index=0, resume_step=4) as w:
        assert w.columns == ["step", "time", "loss", "reward_mean", "val_f1"]
        w.write(5, {"loss": 0.0})
    cols = read_csv(tmp_path / "metrics.csv")
    # steps 1..4 (2 and 4 twice: their validation rows), then the resumed 5
    np.testing.assert_array_equal(cols["step"], [1, 2, 2, 3, 4, 4, 5])
    assert cols["loss"][-1] == 0.0
    assert len(list((tmp_path / "tb").iterdir())) == 2  # a new event file for the resumed run


def test_partial_last_line_is_dropped(tmp_path):
    _write_run(tmp_path, steps=range(1, 4), tensorboard=False)
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("4,17000")  # killed mid-row
    assert len(read_csv(tmp_path / "metrics.csv")["step"]) == 4
    with MetricsWriter(tmp_path, process_index=0, tensorboard=False) as w:
        w.write(4, {"loss": 0.5})
    cols = read_csv(tmp_path / "metrics.csv")
    np.testing.assert_array_equal(cols["step"], [1, 2, 2, 3, 4])


def test_nonzero_process_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    with MetricsWriter(workdir, process_index=1) as w:
        w.write(0, {"loss": 1.0})
    assert not workdir.exists()


def test_tensorboard_events_round_trip(tmp_path):
    values = {1: {"loss": 0.1, "reward_mean": 1 / 3}, 2: {"loss": float("nan"), "val_f1": 1e39}}
    with MetricsWriter(tmp_path, process_index=0) as w:
        for step, metrics in values.items():
            w.write(step, metrics)
        path = w.tb_path
    assert path.parent == tmp_path / "tb" and path.name.startswith("events.out.tfevents.")
    assert path.name.endswith(".mr1")
    events = read_events(path)
    assert repr(events) == repr(read_events(tmp_path / "tb"))  # (nan != nan)
    got = {(e["step"], e["tag"]): e["value"] for e in events}
    want = {(s, t): float(np.float32(v)) if math.isfinite(v) and abs(v) < 1e38 else v
            for s, m in values.items() for t, v in m.items()}
    want[(2, "val_f1")] = math.inf  # beyond float32: stored as inf
    assert got.keys() == want.keys()
    for key, v in want.items():
        assert got[key] == v or (math.isnan(v) and math.isnan(got[key]))
    assert all(abs(e["wall_time"] - events[0]["wall_time"]) < 60 for e in events)


def test_tensorboard_corruption_detected(tmp_path):
    with MetricsWriter(tmp_path, process_index=0) as w:
        w.write(3, {"loss": 0.5})
        path = w.tb_path
    blob = bytearray(path.read_bytes())
    for pos in (4, len(blob) - 10):  # a length byte, then a payload byte
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        path.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="CRC"):
            read_events(path)
    path.write_bytes(bytes(blob[:-3]))  # a truncated last record (killed writer) is ignored
    assert read_events(path) == []


def test_event_file_readable_by_tensorboardx_protos(tmp_path):
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    with MetricsWriter(tmp_path, process_index=0, resume_step=9) as w:
        w.write(10, {"loss": 0.25, "reward_mean": -2.0})
        path = w.tb_path
    blob = path.read_bytes()
    events, pos = [], 0
    while pos < len(blob):
        (length,) = struct.unpack("<Q", blob[pos:pos + 8])
        assert struct.unpack("<I", blob[pos + 8:pos + 12])[0] == masked_crc32c(blob[pos:pos + 8])
        data = blob[pos + 12:pos + 12 + length]
        assert struct.unpack("<I", blob[pos + 12 + length:pos + 16 + length])[0] == \
            masked_crc32c(data)
        events.append(event_pb2.Event.FromString(data))
        pos += 16 + length
    assert events[0].file_version == "brain.Event:2"
    assert events[1].session_log.status == event_pb2.SessionLog.START and events[1].step == 10
    assert events[2].step == 10
    assert {v.tag: v.simple_value for v in events[2].summary.value} == {
        "loss": 0.25, "reward_mean": -2.0}


def test_reads_tensorboardx_written_events(tmp_path):
    import tensorboardX as tbx

    with tbx.SummaryWriter(str(tmp_path)) as w:
        for step in range(3):
            w.add_scalar("x/y", step * 0.5, step)
    got = [(e["step"], e["tag"], e["value"]) for e in read_events(tmp_path)]
    assert got == [(0, "x/y", 0.0), (1, "x/y", 0.5), (2, "x/y", 1.0)]


def test_event_file_loads_in_tensorboard(tmp_path):
    loader_mod = pytest.importorskip(
        "tensorboard.backend.event_processing.event_file_loader",
        reason="tensorboard's event reader is not installed")
    with MetricsWriter(tmp_path, process_index=0) as w:
        w.write(1, {"loss": 0.5})
        path = w.tb_path
    events = list(loader_mod.LegacyEventFileLoader(str(path)).Load())
    assert events[0].file_version == "brain.Event:2"
    assert [(v.tag, v.simple_value) for v in events[1].summary.value] == [("loss", 0.5)]


def test_plot_curves_sparse_columns(tmp_path):
    with MetricsWriter(tmp_path, process_index=0, tensorboard=False) as w:
        rng = np.random.default_rng(0)
        for s in range(40):
            w.write(s, {"reward_mean": float(s + rng.normal())})
            if s % 10 == 9:
                w.write(s, {"val_f1": s / 40})
        w.write(40, {"reward_mean": float("nan")})
    png = plot_curves(tmp_path / "metrics.csv", tmp_path / "plots" / "curves.png",
                      panels=[("reward", ["reward_mean"]), ("validation F1", ["val_f1"]),
                              ("missing", ["nope"])], title="run")
    data = Path(png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_ema_is_debiased():
    np.testing.assert_allclose(metrics_io.ema(np.full(5, 3.0)), 3.0)


def test_plot_op_distribution_and_counts_from_results(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"memory_ops": {
        "ops": {"ADD": 7, "UPDATE": 2, "NOOP": 5}, "invalid": {"no_operation": 3},
        "refused": {"not_valid": 1}, "facts": 15, "manager_calls": 15, "invalid_rate": 4 / 15}}))
    counts = plots.op_counts_from_results(results)
    # 3 of the 5 NOOPs were invalid outputs; + 1 bank refusal: every emitted op counted once
    assert counts == {"ADD": 7, "UPDATE": 2, "DELETE": 0, "NOOP": 2, "INVALID": 4}
    assert sum(counts.values()) == 7 + 2 + 5 + 1
    png = plots.plot_op_distribution(
        {"prompted manager": counts, "GRPO manager": {"ADD": 3, "NOOP": 1}},
        tmp_path / "plots" / "ops.png", title="ops")
    data = Path(png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    results.write_text(json.dumps({"memory_ops": None}))   # a rag / full_context run
    with pytest.raises(ValueError, match="no memory_ops"):
        plots.op_counts_from_results(results)
