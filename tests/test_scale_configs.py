"""Issue 7, must-show 1: every config loads, plans, and compiles for its target mesh.

Configs: every ``experiments/configs/*.py`` (the CPU defaults, tiny test configs and evaluation
configs) and every ``experiments/configs/paper.py`` spec (benchmark x backbone x algorithm x
agent). For each: ``get_config`` loads, :func:`mr1.planning.make_plan` gives per-device bytes
(the paper's training configs must fit their target accelerator), ``experiments/plan.py``
prints the plan, and the real jitted update step (training configs) or greedy sampler
(evaluation configs) lowers and compiles on the config's target mesh from abstract arrays,
with fake CPU devices (one subprocess per device count; configs with the same program, e.g.
the Answer Agent and Memory Manager configs of one backbone x algorithm, compile once).
"""

from __future__ import annotations

import json
import os
import pathlib
import runpy
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"
PAPER = runpy.run_path(str(CONFIGS / "paper.py"))
FILES = sorted(p.name for p in CONFIGS.glob("*.py") if p.name not in ("__init__.py", "paper.py"))
SPECS = PAPER["all_specs"]()


def _load(name: str):
    if name.startswith("paper:"):
        return PAPER["get_config"](name.split(":", 1)[1])
    return runpy.run_path(str(CONFIGS / name))["get_config"]()


ALL = FILES + [f"paper:{s}" for s in SPECS]


def test_the_paper_grid_is_complete():
    """4 benchmarks x 5 backbones; LoCoMo training x {GRPO, PPO} x {answer, memory}; the three
    evaluation benchmarks x {base, GRPO, PPO}."""
    assert len(SPECS) == 5 * 2 * 2 + 3 * 5 * 3
    for backbone in ("llama-3.1-8b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b", "smollm2-135m"):
        for algo in ("grpo", "ppo"):
            for agent in ("answer", "memory"):
                assert f"locomo_train,{backbone},{algo},{agent}" in SPECS
            for bench in ("locomo_eval", "msc_eval", "longmemeval_eval"):
                assert f"{bench},{backbone},{algo}" in SPECS
    with pytest.raises(ValueError, match="BENCHMARK,BACKBONE,ALGO"):
        PAPER["get_config"]("locomo_train,qwen2.5-7b,grpo")  # training needs an agent
    with pytest.raises(ValueError, match="BACKBONE in"):
        PAPER["get_config"]("locomo_eval,gpt-2,grpo")


def test_paper_settings():
    c = PAPER["get_config"]("locomo_train,llama-3.1-8b,ppo,answer")
    assert (c.rollout.prompts_per_step, c.rollout.temperature) == (128, 1.0)
    assert (c.optim.learning_rate, c.optim.critic_learning_rate) == (1e-6, 1e-5)
    assert (c.plan.prompt_tokens, c.answer.max_new_tokens) == (4096, 2048)
    assert c.answer.top_k == 30 and c.reward.em == 1.0
    assert c.reward.f1 == c.reward.format == c.reward.brevity == 0.0  # EM only
    assert c.model.endswith("Llama-3.1-8B-Instruct") and c.hf_repo.startswith("meta-llama/")
    m = PAPER["get_config"]("locomo_train,qwen2.5-14b,grpo,memory")
    assert m.plan.num_devices == 8 and m.reward.answer.em == 1.0 and m.reward.answer.f1 == 0.0
    e = PAPER["get_config"]("longmemeval_eval,qwen2.5-7b,grpo")
    assert e.benchmark == "longmemeval" and e.answer.temperature == 0.0
    assert e.checkpoint == "runs/qwen2.5-7b_grpo_answer/best"
    assert e.memory.manager_checkpoint == "runs/qwen2.5-7b_grpo_memory/best"
    assert PAPER["get_config"]("msc_eval,qwen2.5-3b,base").checkpoint == ""


@pytest.mark.parametrize("name", ALL)
def test_every_config_loads_and_plans(name):
    from mr1.planning import GiB, is_train_config, make_plan

    config = _load(name)
    plan = make_plan(config)
    assert plan.components["params"] > 0
    assert plan.total >= plan.components["params"]
    if is_train_config(config):
        assert {"optimizer (Adam mu, nu)", "rollout KV cache",
                "activations (1 micro-batch)"} <= set(plan.components)
        assert set(plan.phases) == {"rollout", "update"}
    accel = (config.get("plan") or {}).get("accelerator", "")
    if name.startswith("paper:") and accel:
        assert plan.fits(accel), plan.table((accel,))
        assert plan.total < 0.9 * 80 * GiB


def test_plan_cli_prints_a_plan_and_the_grid(tmp_path):
    out = subprocess.run(
        [sys.executable, "experiments/plan.py",
         "--config=experiments/configs/paper.py:locomo_train,qwen2.5-7b,grpo,answer",
         "--devices=16", "--mesh=2,-1,2", "--accelerator=v5p", f"--json={tmp_path / 'p.json'}",
         "--config.rollout.microbatch_prompts=8"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mesh data=2 fsdp=4 tp=2" in out.stdout and "v5p (95 GiB)" in out.stdout
    for part in ("params", "optimizer", "reference model", "rollout KV cache", "activations",
                 "phase rollout", "phase update", "peak"):
        assert part in out.stdout, part
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["devices"] == 16 and plan["mesh"] == [2, 4, 2]
    assert plan["peak_gib"] == max(plan["phases_gib"].values())
    bad = subprocess.run(  # 4-prompt micro-batches cannot split over 8 batch devices
        [sys.executable, "experiments/plan.py",
         "--config=experiments/configs/paper.py:locomo_train,qwen2.5-7b,grpo,answer",
         "--devices=16", "--mesh=1,-1,2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "microbatch_prompts to a multiple of 8" in bad.stderr
    grid = subprocess.run([sys.executable, "experiments/plan.py", "--all"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert grid.returncode == 0, grid.stderr[-2000:]
    assert sum(line.startswith(("locomo_", "msc_", "longmemeval_"))
               for line in grid.stdout.splitlines()) == len(SPECS)
    assert "DOES NOT FIT" not in grid.stdout


_COMPILE = textwrap.dedent("""
    import json, runpy, sys
    sys.path.insert(0, {root!r})
    import jax
    from mr1 import parallel
    from mr1.planning import compile_config, make_plan, program_key
    paper = runpy.run_path({paper!r})
    names = json.loads({names!r})
    done, out = {{}}, {{}}
    for name in names:
        if name.startswith("paper:"):
            config = paper["get_config"](name.split(":", 1)[1])
        else:
            config = runpy.run_path({configs!r} + "/" + name)["get_config"]()
        shape = make_plan(config).mesh
        key = program_key(config, shape)
        if key not in done:
            mesh = parallel.make_mesh(shape.size, shape)
            compiled, secs = compile_config(config, mesh)
            done[key] = {{"seconds": round(secs, 1), "devices": len(mesh.devices.flat),
                          "text": len(compiled.as_text()) > 0}}
        out[name] = done[key]
        print(name, done[key], flush=True)
    print("RESULT" + json.dumps({{"configs": out, "programs": len(done)}}))
""")


def _device_count(name: str) -> int:
    from mr1.planning import make_plan
    return make_plan(_load(name)).mesh.size


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 4, 8])
def test_every_config_compiles_on_its_target_mesh(devices):
    names = [n for n in ALL if _device_count(n) == devices]
    if not names:
        pytest.skip(f"no config targets {devices} devices")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    script = _COMPILE.format(root=str(ROOT), paper=str(CONFIGS / "paper.py"),
                             configs=str(CONFIGS), names=json.dumps(names))
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    assert sorted(out["configs"]) == sorted(names)
    for name, info in out["configs"].items():
        assert info["devices"] == devices and info["text"], name


def test_plans_read_an_hf_folder_config_json(tmp_path):
    """A config whose model is an HF checkpoint folder is planned from its config.json alone
    (no weights); a name that is neither a preset nor a folder is a clear error."""
    from mr1.planning import make_plan

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "vocab_size": 1024, "hidden_size": 128,
        "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "max_position_embeddings": 4096}))
    config = PAPER["get_config"]("locomo_train,qwen2.5-3b,grpo,answer")
    config.model, config.model_preset = str(tmp_path), ""
    plan = make_plan(config)
    assert plan.num_params == 1024 * 128 * 2 + 3 * (128 * 128 * 2 + 2 * 128 * 64 + 128 + 2 * 64
                                                    + 3 * 128 * 256 + 2 * 128) + 128
    config.model = "no-such-model"
    with pytest.raises(ValueError, match="model_preset"):
        make_plan(config)
