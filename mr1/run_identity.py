"""Run identity: which config a workdir's checkpoints, answers and results belong to.

A run's *identity* is its config flattened to dotted fields (``optim.learning_rate``,
``lora.rank``, ...) minus :data:`EXEMPT`, the fields that may change when a run is resumed
without changing what it computes (how long it runs, how often it validates or saves, how it is
laid out on devices, progress bars). Its *fingerprint* is a short sha256 of those fields.

* :func:`prepare_workdir` (before anything is loaded or written): the workdir must be a
  directory (or not exist yet), and a workdir that already holds a run must hold one of the
  same identity; otherwise :class:`RunIdentityError` names the fields that differ and how to
  proceed -- a new ``--workdir``, or ``MR1_ALLOW_CONFIG_CHANGE=1`` to continue the run with the
  new values (the change is then recorded, with the step it took effect at).
* :func:`record` (after validation and a successful restore): writes ``config.json`` and
  ``run_identity.json`` (fingerprint, fields, the history of allowed changes) atomically.
* :func:`checkpoint_metadata` goes into every orbax checkpoint's metadata item, and
  ``best.json`` / ``answers/`` carry the fingerprint too (:mod:`mr1.rl.trainer`,
  ``experiments/evaluate.py``), so nothing of another config is carried over or mixed in.

Workdirs written before this module existed have no ``run_identity.json``: their
``config.json`` (trainers) or ``results.json``'s ``config`` (evaluations) stands in for it as
long as the workdir holds results (checkpoints, ``best.json``, ``results.json``, ...).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import pathlib
from typing import Any, Callable, Mapping

from mr1.fileio import write_json_atomic, write_text_atomic

__all__ = ["EXEMPT", "ALLOW_ENV", "IDENTITY_FILE", "RunIdentityError", "WorkdirError",
           "CheckpointMismatchError", "identity_fields", "fingerprint", "config_fingerprint",
           "describe_diff",
           "check_directory", "stored_fields", "check_workdir", "prepare_workdir", "record", "checkpoint_metadata",
           "restore_checkpoint", "change_allowed", "set_aside_best"]

# Fields that may change on resume (fnmatch patterns over dotted names). Everything else is
# part of the identity: the model, data, seeds, rewards, losses, optimizer, LoRA, prompts...
EXEMPT: tuple[str, ...] = (
    "num_steps",               # train longer (or stop earlier)
    "progress",                # tqdm bar
    "eval.every",              # validation cadence
    "eval.batch_size",         # greedy prompts per generate call (same answers)
    "checkpoint_every",        # save cadence
    "checkpoint_keep",         # how many saves are kept
    "parallel.*",              # devices, mesh, sharding, remat, chunking: same math
    "debug.*",                 # fault injection for tests
    "rollout.microbatch_prompts",  # gradient accumulation split (same gradient)
    "rollout.prompts_per_call",    # sampler call size (same samples)
    "answer.batch_size",       # evaluation batch size (same greedy answers)
    "memory.dir",              # where the banks live (their own identity is checked there)
    "allow_config_change",     # the override itself
)
ALLOW_ENV = "MR1_ALLOW_CONFIG_CHANGE"
IDENTITY_FILE = "run_identity.json"
CONFIG_FILE = "config.json"
# What makes a workdir "hold a run" when it has no run_identity.json (older workdirs).
_RESULT_MARKERS = ("checkpoints", "best.json", "best", "summary.json", "results.json",
                   "predictions.jsonl")


class RunIdentityError(ValueError):
    """The workdir holds a run of another config."""


class WorkdirError(ValueError):
    """``--workdir`` cannot be used as a run directory (e.g. it is a file)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's arrays do not fit the train state this config builds."""


# --------------------------------------------------------------------------- fields


def _as_dict(config: Any) -> dict:
    if hasattr(config, "to_json"):
        return json.loads(config.to_json())
    return json.loads(json.dumps(dict(config)))


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _exempt(name: str, exempt: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in exempt)


def identity_fields(config: Any, exempt: tuple[str, ...] = EXEMPT) -> dict[str, Any]:
    """The config (a ConfigDict or a mapping, e.g. a loaded ``config.json``) as sorted dotted
    fields, :data:`EXEMPT` left out; values as JSON gives them (tuples become lists)."""
    flat = _flatten(_as_dict(config))
    return {k: flat[k] for k in sorted(flat) if not _exempt(k, exempt)}


def fingerprint(fields: Mapping[str, Any]) -> str:
    """16 hex digits of the sha256 of identity fields (:func:`identity_fields`)."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_fingerprint(config: Any) -> str:
    """The fingerprint of a config's identity fields."""
    return fingerprint(identity_fields(config))


_ABSENT = object()


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(set(old) | set(new))
            if old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def _show(v: Any) -> str:
    return "(absent)" if v is _ABSENT else json.dumps(v)


def describe_diff(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 4) -> str:
    """``"lora.rank 0 -> 4, seed 0 -> 7 (and 2 more)"``; "" when equal."""
    d = _diff(old, new)
    text = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, a, b in d[:limit])
    return text + (f" (and {len(d) - limit} more)" if len(d) > limit else "")


# --------------------------------------------------------------------------- workdir


def _holds_results(workdir: pathlib.Path) -> bool:
    for name in _RESULT_MARKERS:
        p = workdir / name
        if p.is_file() or (p.is_dir() and any(p.iterdir())):
            return True
    return False


def stored_fields(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The identity fields of the run in ``workdir``: its ``run_identity.json``, else (an older
    workdir holding results) its ``config.json`` or ``results.json``'s config; None: no run."""
    workdir = pathlib.Path(workdir)
    path = workdir / IDENTITY_FILE
    if path.is_file():
        return dict(json.loads(path.read_text())["fields"])
    if not _holds_results(workdir):
        return None
    for name, key in ((CONFIG_FILE, None), ("results.json", "config")):
        p = workdir / name
        if p.is_file():
            data = json.loads(p.read_text())
            data = data.get(key) if key else data
            if isinstance(data, dict):
                return identity_fields(data)
    return None


def change_allowed(config: Any = None) -> bool:
    """``MR1_ALLOW_CONFIG_CHANGE=1`` (or a config field ``allow_config_change=True``)."""
    if os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes"):
        return True
    get = getattr(config, "get", None)
    return bool(get("allow_config_change", False)) if get else False


def check_directory(workdir: str | os.PathLike) -> pathlib.Path:
    """``workdir`` as a Path; raises :class:`WorkdirError` if it exists and is not a directory."""
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} is a file, not a directory; pass a directory "
                           "(it is created if missing)")
    return workdir


def check_workdir(workdir: str | os.PathLike, config: Any, *, log: Callable[[str], None] = print,
                  what: str = "a run") -> str:
    """Checks that ``workdir`` can hold this config's run; returns the differences ("" none).

    Raises:
      WorkdirError: ``workdir`` exists and is not a directory.
      RunIdentityError: it holds a run of another identity and the change is not allowed.
    """
    workdir = check_directory(workdir)
    old = stored_fields(workdir) if workdir.is_dir() else None
    if old is None:
        return ""
    new = identity_fields(config)
    changes = describe_diff(old, new)
    if not changes:
        return ""
    if not change_allowed(config):
        raise RunIdentityError(
            f"{workdir} holds {what} with another config ({changes}); use a new --workdir, "
            f"or set {ALLOW_ENV}=1 to continue it with the new values (recorded in "
            f"{IDENTITY_FILE})")
    log(f"{workdir}: continuing {what} with a changed config ({changes}); "
        f"{ALLOW_ENV}=1 is set")
    return changes


def prepare_workdir(config: Any, workdir: str | os.PathLike, *,
                    log: Callable[[str], None] = print, what: str = "a run") -> pathlib.Path:
    """:func:`check_workdir`, then creates the directory. Writes no file: ``config.json``
    comes with :func:`record`, once the run has loaded its data and restored."""
    check_workdir(workdir, config, log=log, what=what)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def record(workdir: str | os.PathLike, config: Any, *, step: int | None = None,
           config_file: bool = True) -> dict:
    """Writes ``run_identity.json`` (and ``config.json``) atomically; returns the record.

    A change from the stored identity (allowed by :func:`check_workdir`) is appended to the
    record's ``history`` with the ``step`` it takes effect at.
    """
    workdir = pathlib.Path(workdir)
    fields = identity_fields(config)
    fp = fingerprint(fields)
    path = workdir / IDENTITY_FILE
    history = []
    if path.is_file():
        history = list(json.loads(path.read_text()).get("history", []))
    old = stored_fields(workdir)
    if old is not None and old != fields:
        history.append({"from_step": step, "previous": fingerprint(old), "fingerprint": fp,
                        "changed": describe_diff(old, fields, limit=1000)})
    elif not history:
        history.append({"from_step": step or 0, "fingerprint": fp})
    rec = {"fingerprint": fp, "fields": fields, "exempt": list(EXEMPT), "history": history}
    if config_file and hasattr(config, "to_json"):
        write_text_atomic(workdir / CONFIG_FILE, config.to_json(indent=2))
    write_json_atomic(path, rec)
    return rec


def checkpoint_metadata(config: Any) -> dict[str, str]:
    """What every checkpoint's metadata item carries about the run: its fingerprint."""
    return {"run_identity": config_fingerprint(config)}


def restore_checkpoint(ckpt, state):
    """``ckpt.restore(state)``, a mismatch of shapes or structure as one
    :class:`CheckpointMismatchError` line instead of orbax's tree diff."""
    try:
        return ckpt.restore(state)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 -- orbax raises ValueError / KeyError / TypeError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160].rstrip(":. ")
        raise CheckpointMismatchError(
            f"{ckpt.directory} (step {ckpt.latest_step()}) does not fit the train state of this "
            f"config (another model, lora.rank, algo or dtype?; orbax: {first}); use a new "
            "--workdir") from e


def set_aside_best(workdir: str | os.PathLike, old: str) -> None:
    """Renames ``best/`` and ``best.json`` of config ``old`` to ``best.<old>`` /
    ``best.<old>.json``, so a continued run with another config starts its own best."""
    workdir = pathlib.Path(workdir)
    for name, new in (("best", f"best.{old}"), ("best.json", f"best.{old}.json")):
        src, dst = workdir / name, workdir / new
        if src.exists() and not dst.exists():
            os.replace(src, dst)
