"""Fault tolerance of the RL trainer (mr1.rl.trainer) on the tiny GRPO config, in subprocesses.

* kill -9 mid-run, then re-run on the same workdir: every metrics row equals the uninterrupted
  run's (deterministic columns) and metrics.csv has no duplicate step;
* SIGTERM mid-run: the driver checkpoints the last finished step and exits 0; re-running
  finishes the run, again equal to the uninterrupted one;
* a NaN reward (``debug.nan_reward_steps``) skips that update: ``skipped == 1``, the params
  checkpointed after it are finite and equal to those before it, training continues.

The driver (``tests/rl_driver.py``) swaps in a dense toy reward (the random tiny model never
earns a real one, which would make every gradient 0 and the comparisons vacuous) and the runs
share a JAX compilation cache and the first run's memory banks. Slow (~2 min on 2 busy cores):
six trainer processes.
"""

from __future__ import annotations

import os
import pathlib
import signal
import time

import jax
import numpy as np
import pytest

from tests import rl_driver as D

pytestmark = pytest.mark.slow

# Same program, same inputs, same (cached) executables: the runs agree bit for bit in practice
# (max |diff| observed: 0); the tolerance only absorbs a different XLA thread schedule.
RTOL, ATOL = 1e-5, 1e-6
NUM_STEPS = 6


def _steps(workdir) -> set[int]:
    """Steps with a complete row in metrics.csv so far (tolerant of a file being written)."""
    path = pathlib.Path(workdir) / "metrics.csv"
    if not path.exists():
        return set()
    out = set()
    for line in path.read_text().splitlines()[1:]:
        head = line.split(",", 1)[0]
        if head.isdigit() and line.count(",") > 1:
            out.add(int(head))
    return out


def _ckpt_steps(workdir) -> set[int]:
    d = pathlib.Path(workdir) / "checkpoints"
    return {int(p.name) for p in d.iterdir() if p.name.isdigit()} if d.exists() else set()


def _wait_for(proc, cond, timeout: float, log_path) -> None:
    t_end = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"driver exited {proc.returncode} before the condition held\n"
                                 f"{D.tail(log_path)}")
        if time.time() > t_end:
            proc.kill()
            proc.wait()
            raise AssertionError(f"condition not met in {timeout:.0f}s\n{D.tail(log_path)}")
        time.sleep(0.02)


def _resumed_at(log_path) -> int:
    """The step the last driver run in ``log_path`` says it resumed from."""
    lines = [x for x in pathlib.Path(log_path).read_text().splitlines() if "resumed from" in x]
    assert lines, f"the re-run did not resume\n{D.tail(log_path)}"
    return int(lines[-1].rsplit("at step", 1)[1])


@pytest.fixture(scope="module")
def env(embedded_gguf, tmp_path_factory):
    """The uninterrupted reference run (6 steps) and the shared cache / memory banks."""
    from mr1.data import locomo
    try:
        locomo.load_locomo()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"LoCoMo data unavailable: {e}")
    root = tmp_path_factory.mktemp("rl_resume")
    cache = tmp_path_factory.getbasetemp() / "rl_jax_cache"
    ref = root / "reference"
    wall = D.run(ref, {"num_steps": NUM_STEPS, "checkpoint_every": 2}, cache_dir=cache)
    rows = D.csv_rows(ref)
    assert sorted(rows) == list(range(NUM_STEPS + 1)), sorted(rows)
    # not vacuous: the toy reward gives real gradients
    assert all(rows[s]["grad_norm"] > 1e-3 and rows[s]["reward_std"] > 0
               for s in range(1, NUM_STEPS + 1)), rows
    print(f"reference run: {wall:.1f}s")
    common = {"num_steps": NUM_STEPS, "memory.dir": str(ref / "memory")}
    return {"root": root, "cache": cache, "ref": ref, "rows": rows, "common": common}


def _check_against_reference(env, workdir, resumed: int) -> None:
    rows = D.csv_rows(workdir)  # also fails on a duplicate step
    assert sorted(rows) == sorted(env["rows"]), (sorted(rows), sorted(env["rows"]))
    assert 0 < resumed < NUM_STEPS
    for step in range(resumed + 1, NUM_STEPS + 1):
        D.assert_rows_equal(rows[step], env["rows"][step], rtol=RTOL, atol=ATOL,
                            what=f"step {step} (resumed at {resumed})")
    for step in range(resumed + 1):  # written before the interruption: the same too
        D.assert_rows_equal(rows[step], env["rows"][step], rtol=RTOL, atol=ATOL,
                            what=f"step {step} (before the interruption)")
    got = D.restore_policy_params(workdir, NUM_STEPS)
    want = D.restore_policy_params(env["ref"], NUM_STEPS)
    D.assert_params_close(got, want, rtol=RTOL, atol=ATOL, what="final params")


def test_kill9_then_resume_matches_uninterrupted(env):
    wd = env["root"] / "killed"
    log = D.log_path_of(wd)
    cfg = {**env["common"], "checkpoint_every": 2}
    proc = D.launch(wd, cfg, log_path=log, cache_dir=env["cache"])
    try:
        _wait_for(proc, lambda: 3 in _steps(wd) and 2 in _ckpt_steps(wd), 180, log)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        rc = proc.wait(timeout=30)
    assert rc == -signal.SIGKILL
    assert not (wd / "summary.json").exists()
    assert 3 in _steps(wd) and NUM_STEPS not in _steps(wd)
    at_kill = _ckpt_steps(wd)
    D.run(wd, cfg, cache_dir=env["cache"])
    resumed = _resumed_at(log)
    assert resumed == max(at_kill) >= 2, (resumed, at_kill)
    _check_against_reference(env, wd, resumed)


def test_sigterm_saves_and_exits_then_resumes(env):
    wd = env["root"] / "sigterm"
    log = D.log_path_of(wd)
    cfg = {**env["common"], "checkpoint_every": 4}  # the SIGTERM save is off the schedule
    proc = D.launch(wd, cfg, log_path=log, cache_dir=env["cache"])
    try:
        _wait_for(proc, lambda: 2 in _steps(wd), 180, log)
        os.kill(proc.pid, signal.SIGTERM)
        rc = D.wait(proc, 120, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, D.tail(log)
    last = max(_steps(wd))
    assert 2 <= last < NUM_STEPS, (last, D.tail(log))  # stopped early, after a finished step
    assert max(_ckpt_steps(wd)) == last, (_ckpt_steps(wd), last)
    assert "SIGTERM: saving step" in log.read_text()
    D.run(wd, cfg, cache_dir=env["cache"])
    assert _resumed_at(log) == last
    _check_against_reference(env, wd, last)


def test_nan_reward_skips_update(env):
    wd = env["root"] / "nan"
    cfg = {**env["common"], "num_steps": 4, "checkpoint_every": 1, "checkpoint_keep": 10,
           "debug.nan_reward_steps": [1]}
    D.run(wd, cfg, cache_dir=env["cache"])
    rows = D.csv_rows(wd)
    # loop index 1 finishes as step 2: its row is the skipped one
    assert [rows[s]["skipped"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 0.0, 0.0]
    assert np.isnan(rows[2]["reward_mean"])
    assert rows[1]["grad_norm"] > 1e-3 and rows[3]["grad_norm"] > 1e-3
    assert np.isfinite(rows[3]["loss"]) and np.isfinite(rows[4]["loss"])
    # the first step is the reference's
    D.assert_rows_equal(rows[1], env["rows"][1], rtol=RTOL, atol=ATOL, what="step 1")
    p1, p2, p3 = (D.restore_policy_params(wd, s) for s in (1, 2, 3))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(p2))
    assert D.max_param_diff(p2, p1) == 0.0  # the skipped update kept the params exactly
    assert D.max_param_diff(p3, p2) > 0.0   # and training went on
