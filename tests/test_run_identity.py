"""Issue 21, "nothing lost, nothing mixed": a workdir belongs to one config (mr1.run_identity),
every entry point reports a user's mistake as one line with exit code 2 (mr1.entry), outputs
are written atomically (mr1.fileio), and best.json / evaluate results are never carried over
to another config."""

from __future__ import annotations

import json
import os
import pathlib
import runpy
import subprocess
import sys

import jax
import pytest

from mr1 import run_identity as RI
from mr1.fileio import write_text_atomic
from tests.rl_driver import HashEmbedder, apply_overrides

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_RL = ROOT / "experiments" / "configs" / "locomo_tiny_rl.py"
# the finished run of the fixture; fields the tests change are not exempt
BASE = {"num_steps": 2, "eval.every": 0, "checkpoint_every": 1}


def tiny_config(**overrides):
    c = runpy.run_path(str(TINY_RL))["get_config"]()
    return apply_overrides(c, {**BASE, **overrides})


# ------------------------------------------------------------------ the identity itself


def test_fingerprint_ignores_only_the_exempt_fields():
    base = RI.config_fingerprint(tiny_config())
    for exempt in ({"num_steps": 9}, {"progress": True}, {"eval.every": 5},
                   {"checkpoint_every": 3}, {"parallel.remat": True},
                   {"rollout.microbatch_prompts": 2}):
        assert RI.config_fingerprint(tiny_config(**exempt)) == base, exempt
    for changed in ({"seed": 7}, {"optim.learning_rate": 0.5}, {"rollout.group_size": 2},
                    {"lora.rank": 4}, {"model": "tiny"}, {"memory.num_slots": 512}):
        assert RI.config_fingerprint(tiny_config(**changed)) != base, changed
    assert "num_steps" not in RI.identity_fields(tiny_config())
    assert RI.identity_fields(tiny_config())["lora.rank"] == 0


def test_workdir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "run"
    f.write_text("x")
    with pytest.raises(RI.WorkdirError, match="is a file, not a directory"):
        RI.prepare_workdir(tiny_config(), f)


def test_legacy_workdir_compares_with_its_config_json(tmp_path):
    """A workdir from before run_identity.json (config.json + checkpoints) is checked too."""
    (tmp_path / "config.json").write_text(tiny_config().to_json())
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    RI.check_workdir(tmp_path, tiny_config(num_steps=8))       # exempt: resumes
    with pytest.raises(RI.RunIdentityError, match=r"seed 0 -> 7"):
        RI.check_workdir(tmp_path, tiny_config(seed=7))
    # config.json alone (a launch that failed before training) holds no run
    (tmp_path / "checkpoints" / "2").rmdir()
    assert RI.check_workdir(tmp_path, tiny_config(seed=7)) == ""


# ------------------------------------------------------------------ a finished tiny run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, locomo_available):
    workdir = tmp_path_factory.mktemp("finished")
    from mr1.rl.trainer import train
    train(tiny_config(), workdir, embedder=HashEmbedder(), log=lambda s: None)
    return workdir


def _snapshot(workdir: pathlib.Path) -> dict:
    return {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}


def test_relaunch_with_another_config_refuses_with_the_fields(finished_run, monkeypatch):
    """Row 1: seed/lr/group size changed on a finished run's workdir."""
    from mr1.rl.trainer import train
    monkeypatch.delenv(RI.ALLOW_ENV, raising=False)
    before = _snapshot(finished_run)
    config = tiny_config(**{"seed": 7, "optim.learning_rate": 0.5, "rollout.group_size": 2})
    with pytest.raises(RI.RunIdentityError) as info:
        train(config, finished_run, embedder=HashEmbedder(), log=lambda s: None)
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("seed 0 -> 7", "optim.learning_rate 0.001 -> 0.5", "rollout.group_size 4 -> 2",
                 "new --workdir", RI.ALLOW_ENV):
        assert part in msg, part
    assert _snapshot(finished_run) == before          # config.json & co untouched
    rec = json.loads((finished_run / RI.IDENTITY_FILE).read_text())
    assert rec["fingerprint"] == RI.config_fingerprint(tiny_config())


def test_lora_rank_change_refused_before_restore(finished_run, monkeypatch):
    """Row 2: --config.lora.rank=4 fails before config.json is touched, so the good
    checkpoint still loads; with the override the orbax diff is one line."""
    from mr1.rl.trainer import load_trained_params, run_config, train
    monkeypatch.delenv(RI.ALLOW_ENV, raising=False)
    before = _snapshot(finished_run)
    with pytest.raises(RI.RunIdentityError, match=r"lora.rank 0 -> 4"):
        train(tiny_config(**{"lora.rank": 4}), finished_run, embedder=HashEmbedder(),
              log=lambda s: None)
    assert _snapshot(finished_run) == before
    assert json.loads((finished_run / "config.json").read_text())["lora"]["rank"] == 0
    from mr1.rl.trainer import load_policy_from_config
    base = load_policy_from_config(tiny_config()).params
    ckpt = finished_run / "checkpoints"
    params = load_trained_params(ckpt, base, run=run_config(ckpt))
    assert jax.tree.structure(params) == jax.tree.structure(base)

    monkeypatch.setenv(RI.ALLOW_ENV, "1")
    with pytest.raises(RI.CheckpointMismatchError) as info:
        train(tiny_config(**{"lora.rank": 4}), finished_run, embedder=HashEmbedder(),
              log=lambda s: None)
    assert "\n" not in str(info.value) and "new --workdir" in str(info.value)
    assert _snapshot(finished_run) == before          # still nothing written


def test_allowed_change_is_recorded_with_its_step(finished_run, monkeypatch, tmp_path):
    """With MR1_ALLOW_CONFIG_CHANGE=1 the run continues and run_identity.json records from
    which step the new values hold; the checkpoints carry the new fingerprint."""
    import shutil

    import orbax.checkpoint as ocp

    from mr1.rl.trainer import train
    workdir = tmp_path / "copy"
    shutil.copytree(finished_run, workdir)
    monkeypatch.setenv(RI.ALLOW_ENV, "1")
    config = tiny_config(**{"seed": 7, "num_steps": 3})
    train(config, workdir, embedder=HashEmbedder(), log=lambda s: None)
    rec = json.loads((workdir / RI.IDENTITY_FILE).read_text())
    assert rec["fingerprint"] == RI.config_fingerprint(config)
    last = rec["history"][-1]
    assert last["from_step"] == 2 and "seed 0 -> 7" in last["changed"]
    assert last["previous"] == rec["history"][0]["fingerprint"]
    assert json.loads((workdir / "config.json").read_text())["seed"] == 7
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(workdir / "checkpoints", options=options) as m:
        meta = m.restore(3, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    assert meta["metadata"]["run_identity"] == RI.config_fingerprint(config)


def test_best_json_of_another_config_is_not_carried_over(tmp_path):
    from mr1.rl.trainer import BestCheckpoint
    (tmp_path / "best.json").write_text(json.dumps({"step": 4, "val_f1": 30.0,
                                                    "run_identity": "aaaa"}))
    logs = []
    best = BestCheckpoint(tmp_path, identity="bbbb", log=logs.append)
    assert best.score == float("-inf")
    assert json.loads((tmp_path / "best.aaaa.json").read_text())["val_f1"] == 30.0
    assert not (tmp_path / "best.json").exists() and "not carried over" in logs[0]
    best.close()
    (tmp_path / "best.json").write_text(json.dumps({"step": 1, "val_f1": 3.0,
                                                    "run_identity": "bbbb"}))
    same = BestCheckpoint(tmp_path, identity="bbbb")
    assert same.score == 3.0                            # the same config's best is kept
    same.close()


# ------------------------------------------------------------------ one-line errors (CLI)


TINY_EVAL = ROOT / "experiments" / "configs" / "evaluate_locomo_tiny.py"


def _cli(args, workdir, env=None, timeout=600, script="grpo_answer", config=TINY_RL):
    e = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **(env or {})}
    if not (env and RI.ALLOW_ENV in env):
        e.pop(RI.ALLOW_ENV, None)
    cmd = [sys.executable, str(ROOT / "experiments" / f"{script}.py"), f"--config={config}",
           f"--workdir={workdir}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)


def _one_line(proc, *parts):
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    for p in parts:
        assert p in lines[0], (p, lines[0])
    return lines[0]


@pytest.mark.parametrize("args, parts", [
    (["--config.nonexistent=1"], ["--config.nonexistent=1", "no field 'nonexistent'"]),
    (["--config.seed=abc"], ["--config.seed=abc", "invalid literal"]),
    (["--config.model=nope"], ["unknown model 'nope'", "Known presets"]),
    (["--config.optim.minibatches=3"], ["prompts_per_step 2", "3 mini-batches"]),
    (["--config.loss.advantage_estimator=nope"], ["unknown advantage estimator 'nope'",
                                                  "available: ["]),
])
def test_cli_flag_and_model_errors_are_one_line(tmp_path, args, parts):
    _one_line(_cli(args, tmp_path / "w"), *parts)
    assert not (tmp_path / "w" / "config.json").exists()


@pytest.mark.parametrize("script, config", [("grpo_answer", TINY_RL), ("grpo_memory", None),
                                            ("evaluate", TINY_EVAL),
                                            ("build_memory", TINY_EVAL)])
def test_cli_workdir_that_is_a_file(tmp_path, script, config):
    (tmp_path / "f").write_text("")
    config = config or ROOT / "experiments" / "configs" / "locomo_tiny_memory_rl.py"
    _one_line(_cli([], tmp_path / "f", script=script, config=config),
              "is a file, not a directory")


def test_cli_evaluate_unknown_field(tmp_path):
    _one_line(_cli(["--config.nonexistent=1"], tmp_path / "w", script="evaluate",
                   config=TINY_EVAL), "--config.nonexistent=1", "no field 'nonexistent'")


def test_cli_verbose_gives_the_traceback(tmp_path):
    proc = _cli(["--config.model=nope"], tmp_path / "w", env={"MR1_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    proc = _cli(["--config.model=nope", "--verbose"], tmp_path / "w")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def _bad_locomo(tmp_path, kind) -> pathlib.Path:
    from mr1.data import paths
    good = paths.resolve("locomo").read_bytes()
    p = tmp_path / f"locomo10_{kind}.json"
    p.write_bytes({"truncated": good[: len(good) // 2],
                   "non_utf8": b"\xff\xfe" + good[:100],
                   "wrong_shape": json.dumps({"conversations": []}).encode()}[kind])
    return p


@pytest.mark.parametrize("kind", ["truncated", "non_utf8", "wrong_shape"])
def test_cli_data_errors_are_one_line_and_write_no_config(tmp_path, kind, locomo_available):
    bad = _bad_locomo(tmp_path, kind)
    line = _one_line(_cli([f"--config.data_path={bad}"], tmp_path / "w"), str(bad))
    assert line.startswith("FATAL: ")
    assert not (tmp_path / "w" / "config.json").exists()   # written only after the restore


def test_cli_config_mismatch_on_a_finished_run(finished_run):
    _one_line(_cli(["--config.num_steps=2", "--config.eval.every=0", "--config.lora.rank=4"],
                   finished_run), "lora.rank 0 -> 4", "new --workdir")


# ------------------------------------------------------------------ atomic outputs, evaluate


def test_write_text_atomic_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_text_atomic(path, "old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [path.name]


def _evaluate(tmp_path, policy, **overrides):
    from tests.test_agents import fake_generate
    from tests.test_evaluate import _config, _module
    ev = _module("evaluate")
    gen = fake_generate(lambda p: "- a line\n**Answer:** 19 January, 2023")
    return ev.run(_config(method="rag", **overrides), tmp_path, policy=policy,
                  embedder=HashEmbedder(), generate_fn=gen, log=lambda s: None)


def test_evaluate_twice_with_another_config_refuses(tmp_path, locomo_available,
                                                    embedded_policy, monkeypatch):
    """Row 8: a second evaluate.py into the same workdir with another config refuses (one
    line naming the field) and leaves the first results as they were; the same config reruns;
    the outputs are written by temp file + rename."""
    monkeypatch.delenv(RI.ALLOW_ENV, raising=False)
    out = _evaluate(tmp_path, embedded_policy)
    files = {n: (tmp_path / n).read_bytes() for n in ("predictions.jsonl", "results.json",
                                                      "results.md")}
    assert json.loads(files["results.json"])["run_identity"] == json.loads(
        (tmp_path / RI.IDENTITY_FILE).read_text())["fingerprint"]
    with pytest.raises(RI.RunIdentityError, match=r"rag_top_k 3 -> 4") as info:
        _evaluate(tmp_path, embedded_policy, rag_top_k=4)
    assert "\n" not in str(info.value)
    assert {n: (tmp_path / n).read_bytes() for n in files} == files
    # a crash while writing the results of a rerun leaves the earlier ones whole
    import mr1.fileio as fio
    real = fio.os.replace
    monkeypatch.setattr(fio.os, "replace", lambda a, b: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _evaluate(tmp_path, embedded_policy)
    monkeypatch.setattr(fio.os, "replace", real)
    assert {n: (tmp_path / n).read_bytes() for n in files} == files
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    out = _evaluate(tmp_path, embedded_policy)              # the same config: fine
    assert len(out["rows"]) == 2


def test_unfinished_answers_of_another_config_name_the_fields(tmp_path, locomo_available,
                                                              embedded_policy):
    from tests.test_evaluate import _config, _module
    ev = _module("evaluate")
    ev.AnswerCheckpoint(tmp_path, _config(method="rag"), log=lambda s: None)
    assert json.loads((tmp_path / "answers" / RI.IDENTITY_FILE).read_text())["fingerprint"] == \
        RI.config_fingerprint(_config(method="rag"))
    with pytest.raises(RI.RunIdentityError, match=r"rag_top_k 3 -> 5"):
        ev.AnswerCheckpoint(tmp_path, _config(method="rag", rag_top_k=5), log=lambda s: None)
    # an exempt field (the progress bar) resumes the same answers
    ev.AnswerCheckpoint(tmp_path, _config(method="rag", progress=True), log=lambda s: None)


# ------------------------------------------------------------------ mr1.entry in-process


def _user_errors():
    from absl import app

    from mr1.assets import AssetCorruptError
    from mr1.checkpoint import CheckpointNotFoundError
    from mr1.data.paths import DataFileError
    from mr1.models.policy import UnknownModelError
    from mr1.registry import ConfigError, UnknownNameError
    return [ConfigError("episode.max_facts=8 is less than\n14 facts"),
            UnknownNameError("unknown manager task 'x'; available: ['episodes', 'facts']"),
            app.UsageError("too many arguments"), DataFileError("bad\nfile"),
            UnknownModelError("unknown model 'x'"), RI.WorkdirError("w is a file"),
            RI.RunIdentityError("another config"), RI.CheckpointMismatchError("no fit"),
            CheckpointNotFoundError("no checkpoint directory /x"),
            AssetCorruptError("delete /c/model.safetensors")]


@pytest.mark.parametrize("err", _user_errors(), ids=lambda e: type(e).__name__)
def test_run_main_reports_user_errors_as_one_line(err, capsys, monkeypatch):
    from mr1.entry import run_main
    monkeypatch.delenv("MR1_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["prog"])

    def main(argv):
        raise err

    with pytest.raises(SystemExit) as info:
        run_main(main, argv=["prog"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("FATAL: ")
    assert " ".join(str(err.args[0]).split()) in lines[0]


def test_run_main_keeps_tracebacks_of_bugs_and_in_debug(monkeypatch):
    from mr1.entry import run_main
    monkeypatch.setattr(sys, "argv", ["prog"])
    with pytest.raises(ZeroDivisionError):      # a bug is not a user error
        run_main(lambda argv: 1 / 0, argv=["prog"])
    monkeypatch.setenv("MR1_DEBUG", "1")
    with pytest.raises(RI.WorkdirError):          # MR1_DEBUG=1: the exception itself
        run_main(lambda argv: (_ for _ in ()).throw(RI.WorkdirError("x")), argv=["prog"])
