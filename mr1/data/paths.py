"""Where benchmark data files live: resolution, download with sha256 checks, safe reading.

A dataset file is found in this order (the first hit wins):

1. an explicit ``path`` given by the caller (a missing explicit path is an error, never a
   silent fall-through);
2. ``$MR1_DATA_DIR``: ``<dir>/<subdir>/<filename>`` and then ``<dir>/<filename>``, for the
   canonical filename and every accepted alias (e.g. the gzip-compressed
   ``longmemeval_s_cleaned.499of500.json.gz`` next to the official ``longmemeval_s_cleaned.json``);
3. the user cache, ``$MR1_CACHE/data/<subdir>/`` (default ``~/.cache/mr1/data/...``), which
   :func:`download` (or ``python -m mr1.data.paths download NAME``) fills from the canonical
   URL, checking the published sha256.

Nothing is downloaded implicitly unless the caller asks (``download=True``); when every place
misses, a single :class:`DataNotFoundError` says how to provide the file. Files found through 1
or 2 are not checksummed (a local copy may legitimately differ, e.g. the 499-of-500 LongMemEval_S
rebuild); downloads always are.

:func:`read_json` / :func:`read_jsonl` read plain or gzip files (detected by magic bytes) and
turn a corrupt or truncated file into a :class:`DataFileError` that names the file.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import pathlib
import sys
import tempfile
import urllib.request
import zlib
from typing import Any, BinaryIO, Callable, Iterator

from mr1 import assets
from mr1.assets import sha256_file  # one implementation for assets and data

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


class DataNotFoundError(FileNotFoundError):
    """A dataset file is neither given, in ``$MR1_DATA_DIR``, cached, nor downloadable."""


class DataFileError(ValueError):
    """A dataset file exists but cannot be read (corrupt, truncated, wrong format, bad sha256)."""


class ChecksumError(DataFileError):
    """A downloaded file's sha256 is not the published one."""


@dataclasses.dataclass(frozen=True)
class DataFile:
    """One downloadable benchmark file.

    Attributes:
      name: registry key (``"locomo"``, ``"longmemeval_oracle"`` ...).
      filename: canonical file name (the name the download is stored under).
      subdir: folder under ``$MR1_DATA_DIR`` and the cache (``"locomo"``, ``"longmemeval"``).
      url: canonical download URL.
      sha256: published sha256 of the file at ``url``.
      aliases: other file names accepted in ``$MR1_DATA_DIR`` / the cache (checked after
        ``filename``), e.g. compressed or partial local rebuilds.
      description: one line for ``python -m mr1.data.paths list``.
    """

    name: str
    filename: str
    subdir: str
    url: str
    sha256: str
    aliases: tuple[str, ...] = ()
    description: str = ""

    @property
    def candidates(self) -> tuple[str, ...]:
        return (self.filename, *self.aliases)


_HF_LME = "https://huggingface.co/datasets/xiaowu0162/longmemeval-cleaned/resolve/main"

DATASETS: dict[str, DataFile] = {
    d.name: d
    for d in (
        DataFile(
            name="locomo",
            filename="locomo10.json",
            subdir="locomo",
            url="https://raw.githubusercontent.com/snap-research/locomo/main/data/locomo10.json",
            sha256="79fa87e90f04081343b8c8debecb80a9a6842b76a7aa537dc9fdf651ea698ff4",
            description="LoCoMo: 10 long conversations with 1,986 QA pairs",
        ),
        DataFile(
            name="longmemeval_oracle",
            filename="longmemeval_oracle.json",
            subdir="longmemeval",
            url=f"{_HF_LME}/longmemeval_oracle.json",
            sha256="821a2034d219ab45846873dd14c14f12cfe7776e73527a483f9dac095d38620c",
            aliases=("longmemeval_oracle.json.gz",),
            description="LongMemEval oracle: 500 questions, evidence sessions only",
        ),
        DataFile(
            name="longmemeval_s",
            filename="longmemeval_s_cleaned.json",
            subdir="longmemeval",
            url=f"{_HF_LME}/longmemeval_s_cleaned.json",
            sha256="d6f21ea9d60a0d56f34a05b609c79c88a451d2ae03597821ea3d5a9678c3a442",
            aliases=("longmemeval_s_cleaned.json.gz", "longmemeval_s_cleaned.499of500.json.gz"),
            description="LongMemEval_S (cleaned): 500 questions, ~50-session haystacks",
        ),
        DataFile(
            name="msc_self_instruct",
            filename="msc_self_instruct.jsonl",
            subdir="msc",
            url=("https://huggingface.co/datasets/MemGPT/MSC-Self-Instruct/resolve/"
                 "5138f416f8fa76b75b2e080da87e8a8e346e1500/msc_self_instruct.jsonl"),
            sha256="d3dbea36848b41dc46c0f1548d0ebf74eeaf6390d6f3fe9318e8480dc984495e",
            description="MSC-Self-Instruct (MemGPT DMR): 500 multi-session chats + 1 question",
        ),
    )
}


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------

def cache_dir() -> pathlib.Path:
    """Folder of downloaded data: ``$MR1_CACHE/data`` (default ``~/.cache/mr1/data``)."""
    return assets.cache_dir() / "data"


def data_dir() -> pathlib.Path | None:
    """``$MR1_DATA_DIR`` as a path, or ``None`` when unset/empty."""
    value = os.environ.get("MR1_DATA_DIR", "").strip()
    return pathlib.Path(value).expanduser() if value else None


def _entry(name: str) -> DataFile:
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}") from None


def candidate_paths(name: str) -> list[pathlib.Path]:
    """Every place :func:`resolve` looks for ``name`` (without an explicit path), in order."""
    entry = _entry(name)
    places: list[pathlib.Path] = []
    root = data_dir()
    if root is not None:
        places += [root / entry.subdir / f for f in entry.candidates]
        places += [root / f for f in entry.candidates]
    places += [cache_dir() / entry.subdir / f for f in entry.candidates]
    return places


def _missing_message(entry: DataFile, looked: list[pathlib.Path], why: str = "") -> str:
    where = "\n".join(f"    {p}" for p in looked) or "    (nowhere: MR1_DATA_DIR unset)"
    return (
        f"mr1 dataset '{entry.name}' ({entry.filename}) not found{': ' + why if why else ''}.\n"
        f"  Looked in:\n{where}\n"
        f"  Provide it in one of these ways:\n"
        f"    * pass the file path explicitly (path=...);\n"
        f"    * set MR1_DATA_DIR to a folder holding {entry.subdir}/{entry.filename};\n"
        f"    * run `python -m mr1.data.paths download {entry.name}` once while online "
        f"(fetches {entry.url} into {cache_dir() / entry.subdir}, sha256-checked)."
    )


def resolve_explicit(path: PathLike) -> pathlib.Path:
    """An explicit data file path that must exist (for files with no registry entry)."""
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise DataNotFoundError(f"mr1 data file not found: {p} (pass the path of an existing "
                                "file; this format has no download entry)")
    return p


def resolve(name: str, path: PathLike | None = None, *, download: bool = False) -> pathlib.Path:
    """Returns the local path of dataset file ``name`` (a key of :data:`DATASETS`).

    Args:
      name: registry key.
      path: explicit file; returned as is if it exists, else :class:`DataNotFoundError`.
      download: when nothing is found locally, try :func:`download` (network) before failing.

    Raises:
      DataNotFoundError: the file is nowhere to be found (one message listing every place
        looked and the three ways to provide it).
    """
    entry = _entry(name)
    if path is not None:
        p = pathlib.Path(path).expanduser()
        if not p.is_file():
            raise DataNotFoundError(_missing_message(entry, [p], "the explicit path does not exist"))
        return p
    looked = candidate_paths(name)
    for p in looked:
        if p.is_file():
            return p
    if download:
        try:
            return _download(name)
        except (OSError, ChecksumError) as err:
            raise DataNotFoundError(_missing_message(entry, looked, f"download failed: {err}")) \
                from err
    raise DataNotFoundError(_missing_message(entry, looked))


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------

Fetcher = Callable[[str], BinaryIO]


def _urlopen(url: str, timeout: float = 60.0) -> BinaryIO:
    """Default fetcher: ``urllib`` (http, https and file:// URLs)."""
    return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (registry URLs only)


def download(name: str, *, dest_dir: PathLike | None = None, url: str | None = None,
             fetch: Fetcher | None = None, force: bool = False, quiet: bool = False
             ) -> pathlib.Path:
    """Downloads dataset ``name`` into the cache and checks its sha256.

    The bytes are streamed into a temporary file next to the target, hashed on the way, and
    moved into place only when the hash matches, so a partial or wrong file never looks
    cached.

    Args:
      name: registry key.
      dest_dir: folder to store into (default ``cache_dir()/<subdir>``).
      url: override the registry URL (tests use a ``file://`` URL).
      fetch: callable ``url -> binary file object`` (default: ``urllib.request.urlopen``).
      force: download even when a verified file is already there.
      quiet: no progress line on stderr.

    Returns:
      The path of the verified file.

    Raises:
      ChecksumError: the downloaded bytes do not have the published sha256 (nothing is kept).
      OSError: network or file-system failures (``urllib.error.URLError`` is one).
    """
    entry = _entry(name)
    target_dir = pathlib.Path(dest_dir) if dest_dir is not None else cache_dir() / entry.subdir
    target = target_dir / entry.filename
    if target.is_file() and not force:
        if sha256_file(target) == entry.sha256:
            return target
        log.warning("%s exists but its sha256 is not the published one; downloading again", target)
    source = url or entry.url
    if not quiet:
        print(f"[mr1.data] downloading {entry.name} from {source} -> {target}",
              file=sys.stderr, flush=True)
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".part", dir=target_dir)
    tmp = pathlib.Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, (fetch or _urlopen)(source) as src:
            while block := src.read(1 << 20):
                digest.update(block)
                out.write(block)
        got = digest.hexdigest()
        if got != entry.sha256:
            raise ChecksumError(
                f"{entry.name}: the file downloaded from {source} has sha256 {got}, expected "
                f"{entry.sha256}; it was discarded (truncated download or a changed upstream "
                "file). Retry, or provide a verified copy through MR1_DATA_DIR.")
        os.replace(tmp, target)  # atomic on one file system
    finally:
        tmp.unlink(missing_ok=True)
    if not quiet:
        print(f"[mr1.data] {entry.name}: verified, at {target}", file=sys.stderr, flush=True)
    return target


_download = download  # `resolve` has a `download` flag that shadows the function name


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

_GZIP_MAGIC = b"\x1f\x8b"


def _open_text(path: pathlib.Path) -> io.TextIOBase:
    """Opens ``path`` as UTF-8 text, transparently un-gzipping (detected by magic bytes)."""
    with open(path, "rb") as f:
        gz = f.read(2) == _GZIP_MAGIC
    if gz:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


_READ_ERRORS = (json.JSONDecodeError, UnicodeDecodeError, EOFError, gzip.BadGzipFile, zlib.error)


def _corrupt(path: pathlib.Path, err: Exception) -> DataFileError:
    return DataFileError(
        f"cannot read dataset file {path}: {type(err).__name__}: {err}. The file is corrupt or "
        "truncated (or not the expected format); delete it and download it again "
        "(`python -m mr1.data.paths download NAME`) or point MR1_DATA_DIR at a good copy.")


def read_json(path: PathLike) -> Any:
    """Parses a JSON file (plain or gzip); :class:`DataFileError` naming the file if corrupt."""
    path = pathlib.Path(path)
    try:
        with _open_text(path) as f:
            return json.load(f)
    except _READ_ERRORS as err:
        raise _corrupt(path, err) from err


def iter_jsonl(path: PathLike) -> Iterator[dict]:
    """Yields the JSON object of every non-blank line (plain or gzip)."""
    path = pathlib.Path(path)
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataFileError(
                        f"cannot read dataset file {path}: line {lineno} is not valid JSON "
                        f"({err}); the file is corrupt or truncated.") from err
    except _READ_ERRORS as err:
        raise _corrupt(path, err) from err


def read_jsonl(path: PathLike) -> list[dict]:
    """All rows of a JSON-lines file (see :func:`iter_jsonl`)."""
    return list(iter_jsonl(path))


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _cmd_list(names: list[str]) -> int:
    for name in names or DATASETS:
        entry = _entry(name)
        try:
            where = str(resolve(name))
        except DataNotFoundError:
            where = "(not found locally)"
        print(f"{entry.name:20s} {entry.description}\n{'':20s} {where}")
    return 0


def _cmd_download(names: list[str]) -> int:
    """Downloads each dataset that cannot already be found (``$MR1_DATA_DIR``, cache)."""
    for name in names or DATASETS:
        try:
            print(f"{name}: found at {resolve(name)}")
        except DataNotFoundError:
            print(download(name))
    return 0


def _cmd_where(names: list[str]) -> int:
    for name in names:
        print(resolve(name))
    return 0


_COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "list": _cmd_list,
    "download": _cmd_download,
    "where": _cmd_where,
}


def main(argv: list[str] | None = None) -> int:
    """``python -m mr1.data.paths {list|download|where} [NAME ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in _COMMANDS:
        print(f"usage: python -m mr1.data.paths {{{'|'.join(_COMMANDS)}}} [NAME ...]\n"
              f"datasets: {', '.join(DATASETS)}", file=sys.stderr)
        return 2
    try:
        return _COMMANDS[argv[0]](argv[1:])
    except (DataNotFoundError, DataFileError, KeyError) as err:
        print(err.args[0] if err.args else err, file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
