"""Subprocess driver for the RL trainer tests (``tests/test_rl_resume.py``,
``tests/test_rl_multiprocess.py``): the tiny GRPO config with a dense toy reward.

    python -m tests.rl_driver WORKDIR [--set key=json ...] [--process-id I --num-processes N
        --coordinator HOST:PORT] [--dump-rollouts DIR]

With the random tiny model every real reward is 0 (garbage never matches the gold), so losses
and gradients would be 0 and any comparison vacuous; the ``toy`` reward registered here is the
completion's length mod 7 over 7, which varies within a group. Device count: set
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` in the environment. The embedder is a
deterministic bag-of-words hash (no MiniLM load or compile: it only ranks memories here).
``--dump-rollouts DIR``: every process saves each step's host rollout arrays (after any
cross-process gather) to ``DIR/s{step}_p{process}.npz`` (:data:`DUMPED_ROLLOUT_KEYS`).

Helpers for the tests (:func:`launch`, :func:`deterministic_columns`, :func:`assert_rows_equal`,
:func:`tiny_like_params`) live here too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "locomo_tiny_rl.py"
# Timing columns vary run to run; everything else in metrics.csv is a function of the step.
TIMING_SUFFIXES = ("_s", "_tok_s")
DUMPED_ROLLOUT_KEYS = ("prompt_ids", "tokens", "old_logp", "completion_mask", "rewards")


class HashEmbedder:
    """Bag-of-words hash embedding (deterministic, no model)."""

    dim = 16

    def encode(self, texts):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1.0
        n = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(n, 1e-12)


def toy_reward(prediction, gold, completion=None):
    return (len(completion or "") % 7) / 7.0


def make_config(overrides: dict):
    import runpy

    import ml_collections

    c = runpy.run_path(str(CONFIG))["get_config"]()
    c.reward = ml_collections.ConfigDict({"toy": 1.0})
    return apply_overrides(c, overrides)


def apply_overrides(c, overrides: dict):
    """Sets ``{"a.b.c": value}`` fields of config ``c`` (a JSON list becomes a tuple) and locks
    it."""
    for key, value in overrides.items():
        *parents, name = key.split(".")
        target = c
        for part in parents:
            target = target[part]
        target[name] = tuple(value) if isinstance(value, list) else value
    c.lock()
    return c


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--set", action="append", default=[], help="dotted.key=<json value>")
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--coordinator", default="")
    p.add_argument("--dump-rollouts", default="", help="save each step's rollout arrays here")
    args = p.parse_args(argv)

    import jax

    if args.process_id is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes,
                                   process_id=args.process_id,
                                   initialization_timeout=60)
    from mr1.rl import rewards
    from mr1.rl.trainer import train

    if "toy" not in rewards.REWARDS:
        rewards.register_reward("toy")(toy_reward)
    if args.dump_rollouts:
        dump_rollouts_to(args.dump_rollouts)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    config = make_config({k: json.loads(v) for k, v in overrides.items()})
    tag = f"[p{jax.process_index()}] " if jax.process_count() > 1 else ""
    t0 = time.time()
    log = lambda s: print(f"{tag}[{time.time() - t0:6.1f}s] {s}", flush=True)
    log(f"devices: {jax.devices()}")
    train(config, args.workdir, embedder=HashEmbedder(), log=log)


def dump_rollouts_to(directory) -> None:
    """Wraps ``Trainer.rollout`` so that each step's host arrays are also saved to
    ``directory/s{step}_p{process}.npz``."""
    import jax

    from mr1.rl.trainer import Trainer

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rollout = Trainer.rollout

    def dumping_rollout(self, step):
        arrays, metrics = rollout(self, step)
        np.savez(directory / f"s{step}_p{jax.process_index()}.npz",
                 **{k: np.asarray(arrays[k]) for k in DUMPED_ROLLOUT_KEYS})
        return arrays, metrics

    Trainer.rollout = dumping_rollout


def load_rollout(directory, step: int, process: int = 0) -> dict[str, np.ndarray]:
    """A rollout saved by ``--dump-rollouts``."""
    with np.load(pathlib.Path(directory) / f"s{step}_p{process}.npz") as f:
        return {k: f[k] for k in f.files}


# ------------------------------------------------------------------------------- test helpers

def driver_env(devices: int = 1, cache_dir=None) -> dict:
    """The environment of a driver subprocess: CPU with ``devices`` forced host devices, the
    repository on the path and, with ``cache_dir``, a shared persistent compilation cache."""
    env = dict(os.environ)
    if cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def launch(workdir, overrides: dict | None = None, *, devices: int = 1, log_path=None,
           extra_args: tuple = (), cache_dir=None) -> subprocess.Popen:
    """Starts the driver in a subprocess (its own session, so a kill reaches only it).

    ``cache_dir``: a JAX persistent compilation cache shared by the test's runs (each run
    would otherwise spend most of its time compiling the same programs).
    """
    env = driver_env(devices, cache_dir)
    cmd = [sys.executable, "-m", "tests.rl_driver", str(workdir)]
    for k, v in (overrides or {}).items():
        cmd += ["--set", f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}"]
    cmd += list(extra_args)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        if log_path:
            out.close()


def wait(proc: subprocess.Popen, timeout: float, log_path=None) -> int:
    """Waits for ``proc``; kills it (and fails with its log) past ``timeout``."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"driver timed out after {timeout:.0f}s\n{tail(log_path)}") from None


def tail(log_path, n: int = 4000) -> str:
    if not log_path or not pathlib.Path(log_path).exists():
        return ""
    return pathlib.Path(log_path).read_text(errors="replace")[-n:]


def log_path_of(workdir) -> pathlib.Path:
    return pathlib.Path(workdir).with_suffix(".log")


def run(workdir, overrides=None, *, devices: int = 1, timeout: float = 240.0,
        cache_dir=None) -> float:
    """Runs the driver to completion; returns its wall time. Fails with its log on error."""
    log_path = log_path_of(workdir)
    t0 = time.time()
    proc = launch(workdir, overrides, devices=devices, log_path=log_path, cache_dir=cache_dir)
    rc = wait(proc, timeout, log_path)
    assert rc == 0, f"driver exited {rc}\n{tail(log_path)}"
    return time.time() - t0


def csv_rows(workdir) -> dict[int, dict[str, float]]:
    """``{step: {column: value}}`` from ``metrics.csv`` (fails on a duplicate step)."""
    from mr1.metrics_io import read_csv

    cols = read_csv(pathlib.Path(workdir) / "metrics.csv")
    steps = [int(s) for s in cols["step"]]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.csv: {steps}"
    return {s: {k: float(v[i]) for k, v in cols.items()} for i, s in enumerate(steps)}


def deterministic_columns(row: dict) -> list[str]:
    return sorted(k for k in row if k not in ("step", "time") and not k.endswith(TIMING_SUFFIXES))


def assert_rows_equal(got: dict, want: dict, *, rtol: float, atol: float, what: str = "") -> None:
    cols = deterministic_columns(want)
    assert cols == deterministic_columns(got), (what, cols, deterministic_columns(got))
    a = np.array([got[c] for c in cols])
    b = np.array([want[c] for c in cols])
    bad = ~np.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
    assert not bad.any(), f"{what}: " + ", ".join(
        f"{c}: {x!r} != {y!r}" for c, x, y, m in zip(cols, a, b, bad) if m)


_PARAMS_LIKE: dict = {}


def restore_policy_params(workdir, step: int | None = None) -> dict:
    """The checkpointed ``params`` (``{"policy": ...}``) of ``step`` as numpy arrays."""
    import jax

    from mr1.checkpoint import restore_params
    from mr1.models import load_policy

    if "like" not in _PARAMS_LIKE:  # the trainer's tree: {"policy": tiny-smollm2 params}
        _PARAMS_LIKE["like"] = {"policy": load_policy("tiny-smollm2", seed=0).params}
    got = restore_params(pathlib.Path(workdir) / "checkpoints", _PARAMS_LIKE["like"], step=step)
    return jax.tree.map(np.asarray, got)


def assert_params_close(got: dict, want: dict, *, rtol: float, atol: float, what: str = "",
                        outlier_atol: float | None = None, max_outlier_frac: float = 0.0) -> None:
    """Every leaf finite and allclose; with ``outlier_atol``, up to ``max_outlier_frac`` of all
    elements may exceed ``rtol``/``atol`` as long as they stay within ``outlier_atol``."""
    import jax

    n = bad = 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        name = f"{what}: {jax.tree_util.keystr(path)}"
        assert a.shape == b.shape and np.isfinite(a).all(), name
        if outlier_atol is None:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)
            continue
        np.testing.assert_allclose(a, b, rtol=0, atol=outlier_atol, err_msg=name)
        n += a.size
        bad += int((~np.isclose(a, b, rtol=rtol, atol=atol)).sum())
    assert bad <= max_outlier_frac * n, f"{what}: {bad} of {n} elements off by more than " \
                                        f"rtol {rtol} / atol {atol}"


def max_param_diff(a: dict, b: dict) -> float:
    import jax

    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b))
    return max(diffs)


if __name__ == "__main__":
    main()
