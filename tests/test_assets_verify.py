"""Issue 21: cached assets are checked against their pinned sha256 once per file version
(size + mtime stamp), and a truncated file says which file to delete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from mr1 import assets


@pytest.fixture
def tiny_asset(tmp_path, monkeypatch):
    """A two-file asset registered in a temporary cache."""
    monkeypatch.setenv("MR1_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_installed_root", lambda asset: None)
    files = {"a.bin": b"alpha" * 100, "sub/b.txt": b"beta"}
    asset = assets.Asset(name="tiny-test", distribution="tiny-test", version="1.0", root="m",
                         files={k: hashlib.sha256(v).hexdigest() for k, v in files.items()})
    monkeypatch.setitem(assets.ASSETS, asset.name, asset)
    folder = tmp_path / "cache" / "assets" / "tiny-test-1.0"
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return asset, folder


def test_hashes_once_per_file_version(tiny_asset, monkeypatch):
    asset, folder = tiny_asset
    calls = []
    real = assets.sha256_file
    monkeypatch.setattr(assets, "sha256_file", lambda p, *a: calls.append(p.name) or real(p))
    assert assets.resolve(asset.name) == folder
    assert sorted(calls) == ["a.bin", "b.txt"]
    assets.resolve(asset.name)
    assert len(calls) == 2                       # unchanged files: the stamp, no hashing
    stamps = json.loads((folder.parent / assets.STAMP_FILE).read_text())
    assert stamps[str((folder / "a.bin").resolve())][0] == 500
    # a new version of one file (same size, new mtime) is hashed again, and refused
    (folder / "sub" / "b.txt").write_bytes(b"BETA")
    os.utime(folder / "sub" / "b.txt", ns=(1, 1))
    with pytest.raises(assets.AssetCorruptError) as info:
        assets.resolve(asset.name)
    assert calls[2:] == ["b.txt"]
    msg = str(info.value)
    assert f"delete {folder / 'sub' / 'b.txt'}" in msg and "\n" not in msg


def test_truncated_cached_file_names_the_file_to_delete(tiny_asset):
    asset, folder = tiny_asset
    assets.resolve(asset.name)                   # verified and stamped
    with open(folder / "a.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(assets.AssetCorruptError, match=r"a\.bin is not the pinned file \(10 "
                       r"bytes.*truncated or altered\); delete"):
        assets.resolve(asset.name)
    assert isinstance(assets.AssetCorruptError("x"), assets.AssetNotFoundError)


def test_truncated_cached_minilm_safetensors(tmp_path, monkeypatch):
    """The issue's row: a truncated cached model.safetensors made load_embedder fail with
    ``SafetensorError: invalid header length``; now the resolver names the file."""
    try:
        real = assets.minilm_dir(fetch=False)
    except assets.AssetNotFoundError as e:
        pytest.skip(f"embedded MiniLM unavailable: {e}")
    monkeypatch.setenv("MR1_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_installed_root", lambda asset: None)
    asset = assets.ASSETS["all-minilm-l6-v2"]
    folder = tmp_path / "assets" / f"{asset.distribution}-{asset.version}"
    for rel in asset.files:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel == "model.safetensors":
            with open(real / rel, "rb") as src:
                (folder / rel).write_bytes(src.read(4096))   # truncated
        else:
            shutil.copy(real / rel, folder / rel)
    from mr1.memory.embedder import load_embedder
    with pytest.raises(assets.AssetCorruptError) as info:
        load_embedder()
    assert str(folder / "model.safetensors") in str(info.value)
    assert "4096 bytes" in str(info.value) and "delete" in str(info.value)
