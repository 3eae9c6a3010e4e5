"""experiments/benchmarks/bench_device.py --smoke (the GPU benchmark on CPU-sized shapes): every
row of issue 23's table is measured and written to the JSON and the Markdown table; and
launch/device_check.sh runs it, writing everything under $OUT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "experiments" / "benchmarks" / "bench_device.py"
sys.path.insert(0, str(BENCH.parent))
import bench_device  # noqa: E402


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]), PYTHONUNBUFFERED="1")
    env.pop("JAX_PLATFORMS", None)
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("torch", reason="the HF peer rows need torch (test-only)")
    out = tmp_path_factory.mktemp("bench_device")
    res = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, env=_env(), cwd=REPO, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return (json.loads((out / "bench_device.json").read_text()),
            (out / "bench_device.md").read_text(), res.stdout)


def test_every_row_is_measured(smoke):
    data, _, _ = smoke
    assert data["smoke"] is True and data["device"].startswith("cpu")
    assert [r["id"] for r in data["rows"]] == bench_device.ROW_IDS
    for row in data["rows"]:
        assert "error" not in row and "skipped" not in row, row
        assert row["mr1"] and row["baseline"] and row["what"], row
    rows = {r["id"]: r for r in data["rows"]}
    peak = rows["matmul_peak"]["values"]
    assert all(peak[k] > 0 for k in ("bfloat16", "float32", "float32_highest"))
    assert rows["hbm_bandwidth"]["values"]["bytes_per_s"] > 1e8
    # same weights on both sides: float32 logits agree to float32 rounding on CPU
    assert rows["logits_vs_hf"]["values"]["max_abs_diff_highest"] < 1e-4
    for rid in ("sampler_32x1", "sampler_4x8", "sampler_64x8"):
        v = rows[rid]["values"]
        assert v["mr1_tok_s"] > 0 and v["hf_tok_s"] > 0 and 0 < v["mfu"] < 1
    for rid in ("update_3b_mb1", "update_3b_mb2"):
        assert 0 < rows[rid]["values"]["mfu"] < 1 and rows[rid]["values"]["compile_s"] > 0
    for rid in ("rollout_7b", "rollout_7b_pallas", "rollout_7b_unrolled"):
        v = rows[rid]["values"]
        assert v["new_tok_s"] > 0 and v["roofline_step_ms"] > 0, v
        # tiny shapes: the step is (t_8 - t_1) / 7 and the bandwidth probe 8 MiB, both within
        # timer noise, so neither the step's sign nor its share of the roofline is bounded
        assert v["hbm_fraction"] is None or v["hbm_fraction"] > 0, v
    assert set(rows["compile_times"]["values"]) == {
        "rollout_7b", "rollout_7b_pallas", "update_3b_mb1", "update_3b_mb2",
        "rollout_3b_8x8", "rollout_3b_32x8", "rollout_7b_unrolled"}


def test_markdown_has_every_row_beside_its_baseline(smoke):
    data, md, stdout = smoke
    lines = md.splitlines()
    assert lines[2].startswith("| row | what | H200 baseline")
    for row in data["rows"]:
        line = next(l for l in lines if l.startswith(f"| {row['id']} |"))  # noqa: E741
        assert row["baseline"] in line and row["mr1"] in line
        assert line in stdout  # printed as it was measured


def test_device_check_script_writes_under_out(tmp_path):
    """launch/device_check.sh with the CPU shapes and two rows (no wheels folder, no GPU)."""
    out = tmp_path / "out"
    env = dict(_env(), OUT=str(out), STAGES="bench", PYTHON=sys.executable,
               BENCH_ARGS="--smoke --rows=matmul_peak,hbm_bandwidth")
    res = subprocess.run(["bash", str(REPO / "launch" / "device_check.sh")], env=env,
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "bench_device.json", "bench_device.log", "bench_device.md", "env.txt", "summary.txt"]
    rows = json.loads((out / "bench_device.json").read_text())["rows"]
    assert [r["id"] for r in rows] == ["matmul_peak", "hbm_bandwidth"]
    summary = (out / "summary.txt").read_text()
    assert "bench_device.py: exit 0" in summary and "pytest -m device: exit skipped" in summary
    assert "jax " in (out / "env.txt").read_text()


def test_unknown_row_is_an_error():
    with pytest.raises(SystemExit):
        bench_device.main(["--out", "/tmp/unused", "--rows", "matmul_peak,nope"])
