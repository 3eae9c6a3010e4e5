"""HF checkpoint folders (config.json + safetensors): tiny random Qwen2 (qkv bias) and Llama-3
(RoPE scaling) models built with transformers, loaded by mr1, compared with PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mr1.models import WeightLoadError, load_policy
from mr1.sampling import generate, left_pad


def _save(model, folder, shard_size=None):
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(str(folder), safe_serialization=True, **kwargs)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, torch_mod):
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    torch_mod.manual_seed(0)
    common = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=1, pad_token_id=0, bos_token_id=2)
    qwen = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=1000.0, tie_word_embeddings=False))
    llama = LlamaForCausalLM(LlamaConfig(
        **common, rope_theta=10000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}))
    for m in (qwen, llama):  # random init has tiny biases; make them matter
        with torch_mod.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
        m.eval()
    root = tmp_path_factory.mktemp("hf")
    return {
        "qwen2": (qwen, _save(qwen, root / "qwen2", shard_size="100KB")),
        "llama3": (llama, _save(llama, root / "llama3")),
    }


@pytest.mark.parametrize("name", ["qwen2", "llama3"])
def test_folder_logits_and_greedy_match_torch(tiny_models, torch_mod, name):
    model, folder = tiny_models[name]
    policy = load_policy(str(folder))
    if name == "qwen2":
        assert policy.config.qkv_bias and not policy.config.tie_embeddings
        assert len(list(folder.glob("*.safetensors"))) > 1, "expected a sharded checkpoint"
    else:
        assert policy.config.rope_scaling is not None and policy.config.tie_embeddings
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 211, size=n).tolist() for n in (5, 40, 120)]
    ids, mask = left_pad(prompts, 0)
    ours = policy.logits(ids, mask)
    with torch_mod.no_grad():
        ref = model(input_ids=torch_mod.tensor(ids, dtype=torch_mod.long),
                    attention_mask=torch_mod.tensor(mask, dtype=torch_mod.long)).logits.numpy()
    diff = np.abs(ours - ref)[mask.astype(bool)].max()
    assert diff < 1e-4, diff

    out = generate(policy, prompts, max_new_tokens=20, temperature=0.0, chat=False)
    for i, p in enumerate(prompts):
        with torch_mod.no_grad():
            r = model.generate(torch_mod.tensor([p]), max_new_tokens=20, do_sample=False,
                               eos_token_id=1, pad_token_id=0)[0, len(p):].numpy()
        np.testing.assert_array_equal(out.tokens[i, :out.lengths[i]], r)


def test_missing_shard_is_a_clear_error(tiny_models, tmp_path):
    import shutil

    _, folder = tiny_models["qwen2"]
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (broken / victim).unlink()
    with pytest.raises(WeightLoadError, match=f"missing: .*{victim}"):
        load_policy(str(broken))


def test_missing_tensor_is_a_clear_error(tiny_models, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, folder = tiny_models["llama3"]
    broken = tmp_path / "no_norm"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    tensors.pop("model.norm.weight")
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(WeightLoadError, match="missing tensors for final_norm"):
        load_policy(str(broken))


def test_bfloat16_params(tiny_models):
    import jax.numpy as jnp

    _, folder = tiny_models["llama3"]
    f32 = load_policy(str(folder))
    bf16 = load_policy(str(folder), dtype=jnp.bfloat16)
    assert bf16.params["layers"]["wq"].dtype == jnp.bfloat16
    ids = np.arange(3, 40, dtype=np.int32)[None]
    a, b = f32.logits(ids), bf16.logits(ids)
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
