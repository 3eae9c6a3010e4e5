"""Export to HF folders (``mr1.models.export``, ``experiments/export_hf.py``): transformers
loads what mr1 trained, with the same weights and float32 logits, and ``load_policy`` reads
the folder back exactly.

Fast tests train the tiny RL config (``tiny-smollm2``: a random 2-layer model with SmolLM2's
vocabulary and the embedded tokenizer; a dense toy reward so the updates are not zero) for two
GRPO steps, full fine-tuning and LoRA, and export random Qwen-2 (qkv bias, untied head) and
Llama-3 (RoPE scaling) shapes. The ``slow`` test runs two GRPO steps of the embedded
SmolLM2-135M-Instruct itself (~5 minutes on 2 CPU cores) and exports that.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from mr1.models import load_policy
from mr1.models.config import ModelConfig, RopeScaling
from mr1.models.export import ExportError, export_policy, hf_tensors
from mr1.models.policy import Policy
from mr1.models.trained import load_trained_policy
from mr1.sampling import left_pad

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHAT = [[{"role": "user", "content": "Where does Ana live?"}],
        [{"role": "user", "content": "What did Caroline research after the support group "
                                     "meeting in May?"}],
        [{"role": "user", "content": "Hi"}]]


def _train(workdir, overrides):
    from mr1.rl import rewards
    from mr1.rl.trainer import Trainer, train
    from tests.rl_driver import HashEmbedder, make_config, toy_reward

    if "toy" not in rewards.REWARDS:
        rewards.register_reward("toy")(toy_reward)
    config = make_config({"num_steps": 2, "eval.every": 1, "checkpoint_every": 1,
                          **overrides})
    scores = itertools.count()   # every validation improves: best = the last step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "validate", lambda self: {"val_f1": float(next(scores))})
        try:
            train(config, workdir, embedder=HashEmbedder(), log=lambda s: None)
        except FileNotFoundError as e:
            pytest.skip(f"LoCoMo data unavailable: {e}")
    assert json.loads((workdir / "best.json").read_text())["step"] == 2
    return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"full": _train(root / "full", {}),
            "lora": _train(root / "lora", {"lora.rank": 4})}


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)))


def _check_transformers(policy, folder, torch_mod, prompts, tol=1e-4) -> float:
    """transformers' model of ``folder`` holds exactly mr1's tensors and its float32 logits
    match ``policy.logits`` within ``tol`` on left-padded ``prompts``; returns the max diff."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_mod.float32).eval()
    state = model.state_dict()
    for key, value in hf_tensors(policy.config, policy.params):
        np.testing.assert_array_equal(state[key].numpy(), value, err_msg=key)
    ids, mask = left_pad(prompts, policy.pad_token_id)
    ours = policy.logits(ids, mask)
    with torch_mod.no_grad():
        ref = model(input_ids=torch_mod.tensor(ids, dtype=torch_mod.long),
                    attention_mask=torch_mod.tensor(mask, dtype=torch_mod.long)).logits.numpy()
    diff = float(np.abs(ours - ref)[mask.astype(bool)].max())
    assert diff < tol, diff
    return diff


def _chat_prompts(tok) -> list[list[int]]:
    return [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                    return_dict=False) for m in CHAT]


def _check_roundtrip(policy, folder):
    back = load_policy(str(folder))
    assert _leaves_equal(back.params, policy.params)
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "rope_theta", "rope_scaling", "qkv_bias",
              "tie_embeddings", "arch")
    assert {f: getattr(back.config, f) for f in fields} == \
        {f: getattr(policy.config, f) for f in fields}
    assert np.float32(back.config.rms_norm_eps) == np.float32(policy.config.rms_norm_eps)
    return back


def test_full_grpo_run_exports_to_transformers(runs, tmp_path, torch_mod):
    from mr1.models.trained import load_base_policy

    trained, run = load_trained_policy(runs["full"] / "best")
    initial = load_base_policy(run["model"], run["tokenizer"], seed=run["seed"])
    assert not _leaves_equal(trained.params, initial.params)       # GRPO changed the weights
    folder = export_policy(trained, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    assert (folder / "model.safetensors").is_file()
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == trained.tokenizer.eos_token_id
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert _chat_prompts(tok) == _chat_prompts(trained.tokenizer)    # chat template kept
    assert "<|im_start|>assistant" in tok.apply_chat_template(CHAT[0], tokenize=False,
                                                               add_generation_prompt=True)
    _check_transformers(trained, folder, torch_mod, _chat_prompts(tok))
    back = _check_roundtrip(trained, folder)
    assert back.tokenizer.chat_template == trained.tokenizer.chat_template


def test_lora_run_exports_merged_weights(runs, tmp_path, torch_mod):
    from mr1.models.lora import merge_lora
    from mr1.models.trained import load_base_policy

    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "experiments/export_hf.py",
                           f"--checkpoint={runs['lora'] / 'best'}", f"--out={out}"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["lora_rank_merged"] == 4 and summary["architecture"] == "LlamaForCausalLM"
    trained, run = load_trained_policy(runs["lora"] / "best")
    base = load_base_policy(run["model"], run["tokenizer"], seed=run["seed"])
    assert not _leaves_equal(trained.params, base.params)     # the adapters moved the weights
    from mr1.checkpoint import restore_params
    from mr1.models.lora import init_lora, lora_scale
    like = {"lora": jax.eval_shape(lambda: init_lora(base.params, 4, tuple(run["lora"]
                                                                           ["targets"])))}
    adapters = restore_params(runs["lora"] / "best", like)["lora"]
    merged = merge_lora(base.params, adapters, lora_scale(run["lora"]["alpha"], 4))
    assert _leaves_equal(trained.params, merged)
    _check_roundtrip(trained, out)
    _check_transformers(trained, out, torch_mod, _chat_prompts(trained.tokenizer))


def _random_policy(cfg: ModelConfig, seed: int) -> Policy:
    from mr1.models import transformer

    params = transformer.init_params(cfg, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)   # biases and norms away from their init values
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + rng.normal(0, 0.3, np.shape(x)).astype(np.float32)
        if any(getattr(k, "key", "") in ("bq", "bk", "bv", "scale") for k in path) else x,
        params)
    return Policy(cfg, params, None)


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_qwen2_and_llama3_shapes_export(kind, tmp_path, torch_mod):
    common = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                  bos_token_id=2, eos_token_ids=(1,), pad_token_id=0)
    if kind == "qwen2":
        cfg = ModelConfig(name="q", rope_theta=1000.0, rms_norm_eps=1e-6, qkv_bias=True,
                          tie_embeddings=False, arch="qwen2", **common)
    else:
        cfg = ModelConfig(name="l", rope_theta=10000.0, tie_embeddings=True, arch="llama",
                          rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32), **common)
    policy = _random_policy(cfg, 0)
    folder = export_policy(policy, tmp_path / kind, max_shard_bytes=60_000)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [{"qwen2": "Qwen2ForCausalLM",
                                        "llama3": "LlamaForCausalLM"}[kind]]
    assert len(list(folder.glob("model-*.safetensors"))) > 1     # sharded, with an index
    rng = np.random.default_rng(1)
    _check_transformers(policy, folder, torch_mod,
                        [rng.integers(3, 211, size=n).tolist() for n in (5, 40, 120)])
    _check_roundtrip(policy, folder)


def test_bfloat16_export_and_errors(tmp_path):
    cfg = ModelConfig(name="t", vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16)
    policy = _random_policy(cfg, 3)
    back = load_policy(str(export_policy(policy, tmp_path / "bf16", dtype="bfloat16")))
    import ml_dtypes
    want = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
                        policy.params)
    assert _leaves_equal(back.params, want)
    with pytest.raises(ExportError, match="dtype"):
        export_policy(policy, tmp_path / "x", dtype="int8")
    biased = Policy(cfg.replace(qkv_bias=True),
                    policy.params, None)
    with pytest.raises(ExportError, match="o_proj"):
        export_policy(biased, tmp_path / "y")
    with pytest.raises(FileNotFoundError, match="not a trainer checkpoint"):
        load_trained_policy(tmp_path)


@pytest.mark.slow
def test_embedded_smollm2_after_grpo_exports_to_transformers(tmp_path, torch_mod,
                                                             embedded_gguf):
    """Two GRPO steps of the real SmolLM2-135M-Instruct (the tiny RL config's batch, real EM/F1
    reward), exported from ``<run>/checkpoints``: transformers holds the exact trained
    tensors, and its float32 logits match mr1's within 2e-4 (30 layers of float32 in another
    summation order: ~1e-4 at logits of ~40, as between mr1 and transformers' own load of the
    GGUF) and ``load_policy`` reads the folder back bit for bit."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "experiments/grpo_answer.py",
         "--config=experiments/configs/locomo_tiny_rl.py",
         "--config.model=smollm2-135m-instruct", "--config.tokenizer=", "--config.num_steps=2",
         "--config.eval.every=2", "--config.eval.num_questions=2", "--config.eval.batch_size=2",
         "--config.optim.learning_rate=1e-5", f"--workdir={run}"], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=1800)
    if "DataNotFoundError" in proc.stderr:
        pytest.skip("LoCoMo data unavailable")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained, _ = load_trained_policy(run / "checkpoints")
    assert not _leaves_equal(trained.params, load_policy("smollm2-135m-instruct").params)
    folder = export_policy(trained, tmp_path / "hf")
    diff = _check_transformers(trained, folder, torch_mod, _chat_prompts(trained.tokenizer),
                               tol=2e-4)
    print(f"max |mr1 - transformers| float32 logits: {diff:.2e}")
    _check_roundtrip(trained, folder)


def test_memory_runs_trained_checkpoints(runs, tmp_path):
    """``Memory.open`` takes RL checkpoints as its Memory Manager and Answer Agent: the
    policies it runs hold the trained (LoRA-merged) params, and add / answer go through them."""
    from types import SimpleNamespace

    from mr1 import Memory
    from mr1.memory.embedder import load_embedder
    from mr1.sampling import generate

    used = []

    def gen(policy, prompts, max_new_tokens, **kw):
        if prompts[0].startswith("Extract the facts"):   # a random model writes no fact lines
            return SimpleNamespace(texts=[p.split("\n\n")[1].split(": ", 1)[1] for p in prompts])
        used.append(policy)
        return generate(policy, prompts, min(max_new_tokens, 8), **kw)

    m = Memory.open(tmp_path / "mem", manager=str(runs["full"] / "best"),
                    answer=str(runs["lora"] / "best"), embedder=load_embedder(),
                    generate_fn=gen)
    manager, _ = load_trained_policy(runs["full"] / "best")
    answer, _ = load_trained_policy(runs["lora"] / "best")
    assert _leaves_equal(m.manager.params, manager.params)
    assert _leaves_equal(m.answer_policy.params, answer.params)
    [event] = m.add("Ana lives in Lisbon.", user_id="ana")
    assert event["event"] in ("ADD", "UPDATE", "DELETE", "NOOP") and used == [m.manager]
    out = m.answer("Where does Ana live?", user_id="ana")
    assert used[-1] is m.answer_policy and isinstance(out["answer"], str)
