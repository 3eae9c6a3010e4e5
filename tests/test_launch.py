"""The launchers in launch/: shellcheck-clean, and the commands they print (--dry-run) or run
(with stub gcloud / python on PATH) are the intended ones, quoting included."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu_pod.sh"
GPU = REPO / "launch" / "gpu.sh"
PAPER_CONFIG = "experiments/configs/paper.py:locomo_train,qwen2.5-7b,grpo,answer"
JOBS = ["grpo_answer", "ppo_answer", "grpo_memory", "ppo_memory", "evaluate", "build_memory"]


def _stub(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def trap_bin(tmp_path):
    """A PATH entry whose gcloud / git / tar record that they were called (a dry run must not)."""
    bin_dir = tmp_path / "trap_bin"
    for name in ("gcloud", "git", "tar"):
        _stub(bin_dir / name, f'echo called >> "{tmp_path}/trap_called"\nexit 99\n')
    return bin_dir


def _run(script: Path, *args: str, path_first: Path | None = None, env: dict | None = None,
         cwd: Path = REPO) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("MR1_DISTRIBUTED", "PYTHON")}
    if path_first is not None:
        full_env["PATH"] = f"{path_first}{os.pathsep}{full_env.get('PATH', '')}"
    full_env.update(env or {})
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=30, check=False)


def _dry(script: Path, *args: str, trap_bin: Path) -> list[list[str]]:
    """The commands a dry run prints, each split as a shell would; asserts nothing ran."""
    r = _run(script, "--dry-run", *args, path_first=trap_bin)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), r.stdout
    assert not (trap_bin.parent / "trap_called").exists(), "a dry run ran a command"
    return [shlex.split(line[2:]) for line in lines]


def _option(cmd: list[str], name: str) -> str:
    """The value of ``--name=value`` in a command (exactly one)."""
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(f"{name}=")]
    assert len(values) == 1, (name, cmd)
    return values[0]


# ---------------------------------------------------------------------------------- static


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    scripts = sorted(str(p) for p in (REPO / "launch").glob("*.sh"))
    assert {Path(s).name for s in scripts} >= {"tpu_pod.sh", "gpu.sh"}
    r = subprocess.run([shellcheck, *scripts, str(REPO / ".ci" / "run")], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", [TPU, GPU], ids=lambda p: p.name)
def test_executable_with_help(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    r = _run(script, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: launch/{script.name}")
    for flag in ("--job", "--config", "--workdir", "--dry-run"):
        assert flag in r.stdout
    for job in JOBS:
        assert job in r.stdout


# ---------------------------------------------------------------------------------- tpu_pod.sh


def test_tpu_create(trap_bin):
    [cmd] = _dry(TPU, "create", "--name", "mr1-pod", "--zone", "us-central2-b",
                 "--accelerator=v4-64", "--project", "my-proj", "--spot", trap_bin=trap_bin)
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "mr1-pod",
                   "--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v4-64",
                   "--version=tpu-ubuntu2204-base", "--spot"]


@pytest.mark.parametrize("accelerator,version", [
    ("v5p-32", "v2-alpha-tpuv5"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v6e-64", "v2-alpha-tpuv6e"), ("v4-8", "tpu-ubuntu2204-base")])
def test_tpu_create_default_version(trap_bin, accelerator, version):
    [cmd] = _dry(TPU, "create", "--name=p", f"--accelerator={accelerator}", trap_bin=trap_bin)
    assert _option(cmd, "--accelerator-type") == accelerator
    assert _option(cmd, "--version") == version
    assert "--spot" not in cmd
    assert not any(a.startswith("--project") for a in cmd)


def test_tpu_create_defaults(trap_bin):
    [cmd] = _dry(TPU, "create", "--name=p", trap_bin=trap_bin)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "p"]
    assert _option(cmd, "--accelerator-type") == "v5p-32"
    assert _option(cmd, "--version") == "v2-alpha-tpuv5"
    assert _option(cmd, "--zone") == "us-east5-a"


def test_tpu_copy_code_and_data(trap_bin, tmp_path):
    data = tmp_path / "my data"
    data.mkdir()
    cmds = _dry(TPU, "copy", "--name", "mr1-pod", "--zone", "europe-west4-b", "--data-dir",
                str(data), "--ref", "v1.0", trap_bin=trap_bin)
    tmp = os.environ.get("TMPDIR", "/tmp").rstrip("/")
    code_tar, data_tar = f"{tmp}/mr1-mr1-pod-code.tar.gz", f"{tmp}/mr1-mr1-pod-data.tar.gz"
    assert cmds[0] == ["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", code_tar,
                       "v1.0"]
    assert cmds[1] == ["tar", "-czf", data_tar, "-C", str(data), "."]
    assert cmds[2] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", code_tar, data_tar,
                       "mr1-pod:/tmp/", "--zone=europe-west4-b", "--worker=all"]
    ssh = cmds[3]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mr1-pod"]
    assert "--worker=all" in ssh and _option(ssh, "--zone") == "europe-west4-b"
    remote = _option(ssh, "--command")
    assert remote == ("mkdir -p mr1 && tar -xzf /tmp/mr1-mr1-pod-code.tar.gz -C mr1 && "
                      "mkdir -p mr1/data && tar -xzf /tmp/mr1-mr1-pod-data.tar.gz -C mr1/data && "
                      "rm -f /tmp/mr1-mr1-pod-code.tar.gz /tmp/mr1-mr1-pod-data.tar.gz")
    assert cmds[4] == ["rm", "-f", code_tar, data_tar]
    assert len(cmds) == 5


def test_tpu_copy_code_only(trap_bin):
    cmds = _dry(TPU, "copy", "--name=p", "--remote-dir=work/mr1", trap_bin=trap_bin)
    assert cmds[0][-1] == "HEAD"
    assert not any(c[0] == "tar" for c in cmds)
    scp = cmds[1]
    assert scp[4] == "scp" and scp[-3:] == ["p:/tmp/", "--zone=us-east5-a", "--worker=all"]
    remote = _option(cmds[2], "--command")
    assert remote == ("mkdir -p work/mr1 && tar -xzf /tmp/mr1-p-code.tar.gz -C work/mr1 && "
                      "rm -f /tmp/mr1-p-code.tar.gz")
    assert cmds[3][:2] == ["rm", "-f"] and len(cmds[3]) == 3 and len(cmds) == 4


def test_tpu_install(trap_bin):
    [ssh] = _dry(TPU, "install", "--name", "p", "--zone", "z1", trap_bin=trap_bin)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "p"]
    assert "--worker=all" in ssh
    remote = shlex.split(_option(ssh, "--command"))
    assert remote[:3] == ["cd", "mr1", "&&"]
    assert "python3 -m venv .venv" in _option(ssh, "--command")
    i = remote.index("-e")
    assert remote[i - 3:i + 2] == ["pip", "install", "-q", "-e", ".[tpu]"]


def test_tpu_run(trap_bin):
    extra = ["--config.model=/models/qwen 7b", "--config.note=it's \"quoted\"", "--flag"]
    [ssh] = _dry(TPU, "run", "--name", "mr1-pod", "--zone=us-east5-a", "--job", "grpo_answer",
                 "--config", PAPER_CONFIG, "--workdir", "gs://bucket/runs/qwen grpo",
                 "--data-dir", "/local/data", "--env", "HF_HOME=/mnt/hf cache", "--",
                 *extra, trap_bin=trap_bin)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mr1-pod"]
    assert "--worker=all" in ssh and _option(ssh, "--zone") == "us-east5-a"
    remote = shlex.split(_option(ssh, "--command"))
    assert remote[:6] == ["cd", "mr1", "&&", ".", ".venv/bin/activate", "&&"]
    assert remote[6:] == ["MR1_DISTRIBUTED=1", "MR1_DATA_DIR=$PWD/data", "HF_HOME=/mnt/hf cache",
                          "python", "experiments/grpo_answer.py", f"--config={PAPER_CONFIG}",
                          "--workdir=gs://bucket/runs/qwen grpo", *extra]


def test_tpu_run_executes_on_workers(tmp_path):
    """Not a dry run: the gcloud argv matches the dry run's, and the remote command, run by bash
    in a worker's home, starts the experiment with the exact arguments and environment."""
    log = tmp_path / "gcloud.args"
    stubs = tmp_path / "bin"
    _stub(stubs / "gcloud", f'printf "%s\\0" "$@" > "{log}"\n')
    extra = ["--config.model=models/a b", "--config.x=it's", "--config.y=$HOME `id`"]
    args = ["run", "--name", "pod", "--job", "ppo_memory.py", "--config", PAPER_CONFIG,
            "--workdir=gs://b/w", "--data-dir", "/x", "--env", "A_B=1 2", "--", *extra]
    r = _run(TPU, *args, path_first=stubs)
    assert r.returncode == 0, r.stderr
    argv = log.read_text().split("\0")[:-1]
    [dry] = [shlex.split(line[2:]) for line in _run(TPU, "--dry-run", *args).stdout.splitlines()]
    assert ["gcloud", *argv] == dry

    home = tmp_path / "home"
    worker_bin = home / "worker_bin"
    out = home / "python.out"
    _stub(worker_bin / "python",
          f'printf "%s\\0" "$PWD" "$MR1_DISTRIBUTED" "$MR1_DATA_DIR" "$A_B" "$@" > "{out}"\n')
    (home / "mr1" / ".venv" / "bin").mkdir(parents=True)
    (home / "mr1" / ".venv" / "bin" / "activate").write_text(f'PATH="{worker_bin}:$PATH"\n')
    remote = _option(argv, "--command")
    subprocess.run(["bash", "-c", remote], cwd=home, env={**os.environ, "HOME": str(home)},
                   check=True, timeout=30)
    got = out.read_text().split("\0")[:-1]
    mr1_dir = str(home / "mr1")
    assert got == [mr1_dir, "1", f"{mr1_dir}/data", "1 2", "experiments/ppo_memory.py",
                   f"--config={PAPER_CONFIG}", "--workdir=gs://b/w", *extra]


def test_tpu_run_detach_and_remote_data_dir(trap_bin):
    [ssh] = _dry(TPU, "run", "--name=p", "--job=evaluate", "--config=c.py", "--workdir=gs://b/e",
                 "--remote-data-dir=/mnt/my data", "--detach", "--project=proj",
                 trap_bin=trap_bin)
    assert _option(ssh, "--project") == "proj" and "--worker=all" in ssh
    remote = shlex.split(_option(ssh, "--command"))
    i = remote.index("nohup")
    assert remote[i - 3:i] == ["{", "MR1_DISTRIBUTED=1", "MR1_DATA_DIR=/mnt/my data"]
    assert remote[i + 1:] == ["python", "experiments/evaluate.py", "--config=c.py",
                              "--workdir=gs://b/e", ">", "logs/evaluate.log", "2>&1", "<",
                              "/dev/null", "&", "}"]


def test_tpu_run_warns_on_local_workdir(trap_bin):
    r = _run(TPU, "run", "--name=p", "--job=evaluate", "--config=c.py", "--workdir=/tmp/w",
             "--dry-run", path_first=trap_bin)
    assert r.returncode == 0
    assert "not a gs:// path" in r.stderr
    assert "config file 'c.py' not found" in r.stderr


def test_tpu_exec(trap_bin):
    [ssh] = _dry(TPU, "exec", "--name=p", "--", "gsutil", "-m", "cp", "-r", "gs://b/qwen",
                 "models/", trap_bin=trap_bin)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "p"]
    assert "--worker=all" in ssh
    assert _option(ssh, "--command") == "cd mr1 && gsutil -m cp -r gs://b/qwen models/"


def test_tpu_delete_and_describe(trap_bin):
    [cmd] = _dry(TPU, "delete", "--name=p", "--zone=z", trap_bin=trap_bin)
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "p", "--zone=z", "--quiet"]
    [cmd] = _dry(TPU, "describe", "--name=p", "--zone=z", trap_bin=trap_bin)
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "p", "--zone=z"]


def test_tpu_all(trap_bin):
    cmds = _dry(TPU, "all", "--name=p", "--job=grpo_answer", f"--config={PAPER_CONFIG}",
                "--workdir=gs://b/r", "--data-dir=/d", "--", "--config.model=models/q",
                trap_bin=trap_bin)
    steps = [c[4] if c[0] == "gcloud" else c[0] for c in cmds]
    assert steps == ["create", "git", "tar", "scp", "ssh", "rm", "ssh", "ssh"]
    assert "pip install" in _option(cmds[6], "--command")
    run = shlex.split(_option(cmds[7], "--command"))
    assert run[6:] == ["MR1_DISTRIBUTED=1", "MR1_DATA_DIR=$PWD/data", "python",
                       "experiments/grpo_answer.py", f"--config={PAPER_CONFIG}",
                       "--workdir=gs://b/r", "--config.model=models/q"]


# ---------------------------------------------------------------------------------- gpu.sh


def test_gpu_dry_run(trap_bin):
    cmds = _dry(GPU, "--job", "grpo_answer", "--config", PAPER_CONFIG, "--workdir", "runs/my run",
                "--gpus", "0,1,2,3", "--mem-fraction=0.75", "--install", "--python", "py3",
                "--", "--config.model=/models/qwen 7b", "--config.x=it's", trap_bin=trap_bin)
    assert cmds == [
        ["cd", str(REPO)],
        ["py3", "-m", "pip", "install", "-e", ".[cuda]"],
        ["CUDA_VISIBLE_DEVICES=0,1,2,3", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.75", "py3",
         "experiments/grpo_answer.py", f"--config={PAPER_CONFIG}", "--workdir=runs/my run",
         "--config.model=/models/qwen 7b", "--config.x=it's"],
    ]


def test_gpu_dry_run_defaults(trap_bin):
    cmds = _dry(GPU, "--job=evaluate.py", "--config=c.py", trap_bin=trap_bin)
    assert cmds == [["cd", str(REPO)],
                    ["XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "python3", "experiments/evaluate.py",
                     "--config=c.py"]]
    assert not any("MR1_DISTRIBUTED" in a for c in cmds for a in c)


def test_gpu_runs_one_process(tmp_path):
    out = tmp_path / "python.out"
    py = _stub(tmp_path / "bin" / "fakepy",
               f'printf "%s\\0" "$PWD" "${{MR1_DISTRIBUTED-unset}}" "$CUDA_VISIBLE_DEVICES" '
               f'"$XLA_PYTHON_CLIENT_MEM_FRACTION" "$@" > "{out}"\n')
    r = _run(GPU, "--job", "ppo_answer", "--config", PAPER_CONFIG, "--workdir=/w d", "--gpus=2,3",
             "--", "--config.a=b c", env={"PYTHON": str(py), "MR1_DISTRIBUTED": "1"},
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.read_text().split("\0")[:-1] == [
        str(REPO), "unset", "2,3", "0.9", "experiments/ppo_answer.py", f"--config={PAPER_CONFIG}",
        "--workdir=/w d", "--config.a=b c"]


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("script,args,message", [
    (TPU, ["run", "--name=p", "--job=grpo_answer", "--config=c", "--workdir=gs://b", "--bogus"],
     "unknown option: --bogus"),
    (TPU, ["create"], "--name is required"),
    (TPU, ["run", "--name=p", "--job=sft", "--config=c", "--workdir=gs://b"],
     "unknown --job 'sft'"),
    (TPU, ["--name=p"], "no command given"),
    (TPU, ["launch", "--name=p"], "unknown command 'launch'"),
    (TPU, ["create", "delete", "--name=p"], "one command at a time"),
    (TPU, ["create", "--name=My_Pod"], "--name 'My_Pod'"),
    (TPU, ["create", "--name"], "option --name needs a value"),
    (TPU, ["run", "--name=p", "--config=c", "--workdir=gs://b"], "run needs --job"),
    (TPU, ["run", "--name=p", "--job=evaluate", "--workdir=gs://b"], "run needs --config"),
    (TPU, ["run", "--name=p", "--job=evaluate", "--config=c"], "run needs --workdir"),
    (TPU, ["run", "--name=p", "--job=evaluate", "--config=c", "--workdir=gs://b", "--env=X"],
     "--env 'X': expected NAME=VALUE"),
    (TPU, ["exec", "--name=p"], "exec needs a command after --"),
    (TPU, ["all", "--name=p", "--job=evaluate", "--config=c", "--workdir=gs://b", "--",
           "--dry-run"], "--dry-run after -- would go to the experiment"),
    (GPU, ["--job=grpo_answer", "--config=c", "--bogus"], "unknown option: --bogus"),
    (GPU, ["--config=c"], "--job is required"),
    (GPU, ["--job=sft", "--config=c"], "unknown --job 'sft'"),
    (GPU, ["--job=evaluate"], "--config is required"),
    (GPU, ["--job=evaluate", "--config=c", "--gpus=0;1"], "--gpus '0;1'"),
    (GPU, ["--job=evaluate", "--config=c", "--mem-fraction=0"], "--mem-fraction '0'"),
    (GPU, ["--job=evaluate", "--config=c", "--config.model=m"], "unknown option: --config.model"),
    (GPU, ["--job=evaluate", "--config=c", "stray"], "unexpected argument 'stray'"),
    (GPU, ["--job=evaluate", "--config=c", "--", "--dry-run"],
     "--dry-run after -- would go to the experiment"),
])
def test_bad_input(trap_bin, script, args, message):
    r = _run(script, "--dry-run", *args, path_first=trap_bin)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr, r.stderr
    assert f"see launch/{script.name} --help" in r.stderr
    assert r.stdout == ""
    assert not (trap_bin.parent / "trap_called").exists()
