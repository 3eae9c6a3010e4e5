"""Subprocess driver for the Memory Manager device-count test (``tests/test_memory_task.py``):
the tiny Memory Manager config (``experiments/configs/locomo_tiny_memory_rl.py``) trained by
:func:`mr1.rl.memory_task.train_memory`.

    python -m tests.memory_rl_driver WORKDIR [--set key=json ...]

Device count: ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` in the environment
(:func:`run` sets it). The embedder is :class:`tests.rl_driver.HashEmbedder` and the frozen
Answer Agent is :func:`toy_answer` (deterministic, no model).

With the random tiny model every manager output is malformed, so every output is applied as a
NOOP, all outputs of one fact get the same answers and the same reward, and the GRPO gradient
is 0 (a 1-vs-8-device comparison would be vacuous). :func:`dense_scores` therefore adds
:func:`tests.rl_driver.toy_reward` (the output's length mod 7 over 7) to the real reward of
each output; the real scoring (parse, vmapped bank copies, answers, EM/F1) still runs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

from tests.rl_driver import ROOT, HashEmbedder, tail, toy_reward

CONFIG = ROOT / "experiments" / "configs" / "locomo_tiny_memory_rl.py"


def toy_answer(prompts):
    """A deterministic stand-in Answer Agent: answers with the last memory line's first two
    words (so answers depend on the banks the manager's ops produced)."""
    out = []
    for p in prompts:
        lines = [x for x in p.splitlines() if x.startswith("- ")]
        words = lines[-1].split("] ", 1)[-1].split()[:2] if lines else ["unknown"]
        out.append("**Answer:** " + " ".join(words))
    return out


def dense_scores(score_outputs):
    """Wraps ``ManagerTask.score_outputs``: reward += :func:`toy_reward` of each output."""
    def wrapped(self, data, idx, texts, group):
        out = score_outputs(self, data, idx, texts, group)
        out["reward"] = out["reward"] + [toy_reward("", "", t) for t in texts]
        return out
    return wrapped


def make_config(overrides: dict):
    import runpy

    from tests.rl_driver import apply_overrides

    return apply_overrides(runpy.run_path(str(CONFIG))["get_config"](), overrides)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--set", action="append", default=[], help="dotted.key=<json value>")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from mr1.rl import memory_task as MT

    MT.ManagerTask.score_outputs = dense_scores(MT.ManagerTask.score_outputs)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    config = make_config({k: json.loads(v) for k, v in overrides.items()})
    t0 = time.time()
    log = lambda s: print(f"[{time.time() - t0:6.1f}s] {s}", flush=True)  # noqa: E731
    log(f"devices: {jax.devices()}")
    rewards = []
    rollout = MT.ManagerTask.rollout

    def logged_rollout(self, *a, **kw):  # record the rewards for the test
        arrays, metrics = rollout(self, *a, **kw)
        rewards.append(np.asarray(arrays["rewards"]).tolist())
        return arrays, metrics

    MT.ManagerTask.rollout = logged_rollout
    MT.train_memory(config, args.workdir, embedder=HashEmbedder(), answer_fn=toy_answer, log=log)
    (pathlib.Path(args.workdir) / "rewards.json").write_text(json.dumps(rewards))


def run(workdir, overrides=None, *, devices: int = 1, timeout: float = 300.0,
        cache_dir=None) -> subprocess.Popen:
    """Starts the driver in its own session (output to ``<workdir>.log``); see :func:`finish`."""
    from tests.rl_driver import driver_env

    env = driver_env(devices, cache_dir)
    cmd = [sys.executable, "-m", "tests.memory_rl_driver", str(workdir)]
    for k, v in (overrides or {}).items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    with open(log_path_of(workdir), "ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def log_path_of(workdir) -> pathlib.Path:
    return pathlib.Path(workdir).with_suffix(".log")


def finish(procs: dict, timeout: float) -> None:
    """Waits for every driver ``{workdir: Popen}``; on a timeout or a failure kills them all
    and fails with the log."""
    t_end = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs.values()):
            for wd, p in procs.items():
                if p.poll() not in (None, 0):
                    raise AssertionError(f"{wd}: driver exited {p.returncode}\n"
                                         f"{tail(log_path_of(wd))}")
            if time.time() > t_end:
                raise AssertionError(f"timed out after {timeout:.0f}s\n" + "\n".join(
                    tail(log_path_of(wd), 2000) for wd in procs))
            time.sleep(0.2)
        for wd, p in procs.items():
            assert p.returncode == 0, f"{wd}: driver exited {p.returncode}\n" \
                                      f"{tail(log_path_of(wd))}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()


if __name__ == "__main__":
    main()
