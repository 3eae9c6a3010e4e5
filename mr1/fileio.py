"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every output a run leaves for people or for a later run (``config.json``, ``summary.json``,
``best.json``, ``predictions.jsonl``, ``results.md`` / ``results.json``, the run identity) is
written here: the text goes to a temporary file in the same directory, is flushed and
``fsync``'d, then renamed over the target with ``os.replace`` (atomic on POSIX), and the
directory is ``fsync``'d so the rename itself survives a crash. A process killed mid-write
leaves at most a ``.<name>.tmp-*`` file beside the old one.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any, Iterable

__all__ = ["write_text_atomic", "write_json_atomic", "write_jsonl_atomic"]


def _fsync_dir(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Writes ``text`` (UTF-8) to ``path`` via a temporary file and a rename; returns ``path``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2
                      ) -> pathlib.Path:
    """``obj`` as JSON (a trailing newline), written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Any]) -> pathlib.Path:
    """One JSON value per line, written atomically."""
    return write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
