"""Data path resolution, download (offline: file:// URLs and fake fetchers) and safe reading."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import pathlib
import subprocess
import sys
import urllib.error

import pytest

from mr1.data import paths
from mr1.data.paths import (ChecksumError, DataFileError, DataNotFoundError, download,
                            read_json, read_jsonl, resolve)

PAYLOAD = json.dumps([{"sample_id": "x"}]).encode()


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No MR1_DATA_DIR, an empty cache, and no network: every test starts from nothing."""
    monkeypatch.delenv("MR1_DATA_DIR", raising=False)
    monkeypatch.setenv("MR1_CACHE", str(tmp_path / "cache"))

    def no_network(url, timeout=60.0):
        raise AssertionError(f"test tried to reach the network: {url}")

    monkeypatch.setattr(paths, "_urlopen", no_network)


@pytest.fixture
def local_locomo(tmp_path, monkeypatch):
    """Registry entry 'locomo' pointed at a local file:// URL with that file's sha256."""
    src = tmp_path / "upstream" / "locomo10.json"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    entry = dataclasses.replace(paths.DATASETS["locomo"], url=src.as_uri(),
                                sha256=hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setitem(paths.DATASETS, "locomo", entry)
    monkeypatch.setattr(paths, "_urlopen", lambda url, timeout=60.0: open(url[len("file://"):],
                                                                           "rb"))
    return entry


def test_registry_has_canonical_sources():
    d = paths.DATASETS
    assert set(d) >= {"locomo", "longmemeval_oracle", "longmemeval_s", "msc_self_instruct"}
    assert d["locomo"].sha256 == "79fa87e90f04081343b8c8debecb80a9a6842b76a7aa537dc9fdf651ea698ff4"
    assert d["locomo"].url.endswith("snap-research/locomo/main/data/locomo10.json")
    assert d["longmemeval_s"].sha256.startswith("d6f21ea9")
    assert "longmemeval_s_cleaned.499of500.json.gz" in d["longmemeval_s"].aliases
    assert d["msc_self_instruct"].sha256.startswith("d3dbea36")
    for entry in d.values():
        assert len(entry.sha256) == 64 and entry.url.startswith("https://")


def test_explicit_path_wins_and_missing_explicit_path_is_an_error(tmp_path):
    f = tmp_path / "mine.json"
    f.write_bytes(PAYLOAD)
    assert resolve("locomo", f) == f
    with pytest.raises(DataNotFoundError, match="explicit path does not exist"):
        resolve("locomo", tmp_path / "nope.json")


def test_data_dir_subdir_then_flat_layout(tmp_path, monkeypatch):
    root = tmp_path / "data"
    monkeypatch.setenv("MR1_DATA_DIR", str(root))
    (root / "locomo").mkdir(parents=True)
    flat = root / "locomo10.json"
    flat.write_bytes(PAYLOAD)
    assert resolve("locomo") == flat
    nested = root / "locomo" / "locomo10.json"
    nested.write_bytes(PAYLOAD)
    assert resolve("locomo") == nested


def test_data_dir_accepts_aliases_and_prefers_canonical_name(tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "longmemeval").mkdir(parents=True)
    monkeypatch.setenv("MR1_DATA_DIR", str(root))
    alias = root / "longmemeval" / "longmemeval_s_cleaned.499of500.json.gz"
    alias.write_bytes(gzip.compress(PAYLOAD))
    assert resolve("longmemeval_s") == alias
    official = root / "longmemeval" / "longmemeval_s_cleaned.json"
    official.write_bytes(PAYLOAD)
    assert resolve("longmemeval_s") == official


def test_cache_is_used_after_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MR1_DATA_DIR", str(tmp_path / "empty"))
    cached = tmp_path / "cache" / "data" / "locomo" / "locomo10.json"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(PAYLOAD)
    assert paths.cache_dir() == tmp_path / "cache" / "data"
    assert resolve("locomo") == cached


def test_absent_everywhere_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MR1_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(DataNotFoundError) as info:
        resolve("locomo")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "MR1_DATA_DIR" in msg and "path=" in msg
    assert "python -m mr1.data.paths download locomo" in msg
    assert str(tmp_path / "empty" / "locomo" / "locomo10.json") in msg


def test_unknown_dataset_name():
    with pytest.raises(KeyError, match="unknown dataset"):
        resolve("locomo11")


def test_download_from_file_url_verifies_and_caches(local_locomo, tmp_path):
    got = download("locomo", quiet=True)
    assert got == tmp_path / "cache" / "data" / "locomo" / "locomo10.json"
    assert got.read_bytes() == PAYLOAD
    assert resolve("locomo") == got
    # already verified: no second fetch
    assert download("locomo", quiet=True, fetch=lambda url: pytest.fail("refetched")) == got


def test_download_with_real_urllib_file_url(tmp_path, monkeypatch):
    """The default fetcher's code path (urllib.request.urlopen) with a file:// URL."""
    import urllib.request

    monkeypatch.setattr(paths, "_urlopen",
                        lambda url, timeout=60.0: urllib.request.urlopen(url, timeout=timeout))
    src = tmp_path / "msc.jsonl"
    src.write_bytes(b'{"a": 1}\n')
    entry = dataclasses.replace(paths.DATASETS["msc_self_instruct"], url=src.as_uri(),
                                sha256=hashlib.sha256(b'{"a": 1}\n').hexdigest())
    monkeypatch.setitem(paths.DATASETS, "msc_self_instruct", entry)
    got = download("msc_self_instruct", quiet=True)
    assert read_jsonl(got) == [{"a": 1}]


def test_download_with_fake_fetcher_and_dest_dir(tmp_path, monkeypatch):
    entry = dataclasses.replace(paths.DATASETS["locomo"],
                                sha256=hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setitem(paths.DATASETS, "locomo", entry)
    seen = []

    def fetch(url):
        seen.append(url)
        return io.BytesIO(PAYLOAD)

    got = download("locomo", dest_dir=tmp_path / "elsewhere", fetch=fetch, quiet=True)
    assert seen == [entry.url]
    assert got == tmp_path / "elsewhere" / "locomo10.json"


def test_checksum_mismatch_keeps_nothing(tmp_path):
    target_dir = tmp_path / "cache" / "data" / "locomo"
    with pytest.raises(ChecksumError, match="sha256") as info:
        download("locomo", fetch=lambda url: io.BytesIO(b"truncated"), quiet=True)
    assert "79fa87e9" in str(info.value)
    assert not any(target_dir.iterdir())  # neither the file nor a .part leftover
    with pytest.raises(DataNotFoundError):
        resolve("locomo")


def test_resolve_with_download_offline_gives_the_same_clear_error(monkeypatch):
    def offline(url, timeout=60.0):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(paths, "_urlopen", offline)
    with pytest.raises(DataNotFoundError, match="download failed.*no route to host") as info:
        resolve("locomo", download=True)
    assert "MR1_DATA_DIR" in str(info.value)


def test_resolve_with_download_fetches(local_locomo, tmp_path):
    assert resolve("locomo", download=True).read_bytes() == PAYLOAD


def test_read_json_plain_and_gzip(tmp_path):
    plain, gz = tmp_path / "a.json", tmp_path / "a.json.gz"
    plain.write_bytes(PAYLOAD)
    gz.write_bytes(gzip.compress(PAYLOAD))
    assert read_json(plain) == read_json(gz) == [{"sample_id": "x"}]
    # gzip detected by content, not name
    odd = tmp_path / "gz_without_suffix.json"
    odd.write_bytes(gzip.compress(PAYLOAD))
    assert read_json(odd) == [{"sample_id": "x"}]


@pytest.mark.parametrize("content", [
    PAYLOAD[:-5],                               # truncated JSON
    gzip.compress(PAYLOAD)[:-12],               # truncated gzip stream
    b"\x1f\x8b" + b"not really gzip" * 3,       # gzip magic, garbage body
    b"\xff\xfe\x00 not utf-8",                  # undecodable bytes
])
def test_corrupt_files_are_clear_errors_naming_the_file(tmp_path, content):
    bad = tmp_path / "broken_file.json"
    bad.write_bytes(content)
    with pytest.raises(DataFileError, match="broken_file.json"):
        read_json(bad)


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(DataFileError, match=r"rows.jsonl: line 3"):
        read_jsonl(bad)


def test_cli_where_download_and_usage(local_locomo, tmp_path, capsys):
    assert paths.main([]) == 2
    assert paths.main(["where", "locomo"]) == 1
    assert "python -m mr1.data.paths download locomo" in capsys.readouterr().err
    assert paths.main(["download", "locomo"]) == 0
    out = capsys.readouterr().out.strip()
    assert pathlib.Path(out).read_bytes() == PAYLOAD
    assert paths.main(["where", "locomo"]) == 0
    assert capsys.readouterr().out.strip() == out
    assert paths.main(["list", "locomo"]) == 0


def test_cli_module_entry_point(tmp_path):
    root = tmp_path / "d"
    (root / "locomo").mkdir(parents=True)
    (root / "locomo" / "locomo10.json").write_bytes(PAYLOAD)
    env = dict(os.environ, MR1_DATA_DIR=str(root), MR1_CACHE=str(tmp_path / "c"))
    proc = subprocess.run([sys.executable, "-m", "mr1.data.paths", "where", "locomo"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(root / "locomo" / "locomo10.json")
    assert "Warning" not in proc.stderr, proc.stderr
