"""Per-device memory plans for a config on a mesh, and abstract compile checks.

:func:`make_plan` estimates, for one device of a ``(data, fsdp, tp)`` mesh, the bytes of the
params, optimizer state, gradient accumulators, frozen reference model, rollout KV cache and the
activations of one update micro-batch (or, for an evaluation config, of greedy decoding), using
the same partition rules the trainer shards with (:mod:`mr1.parallel`): param and optimizer
bytes are exact (every leaf's shard from its PartitionSpec), the KV cache is exact for the
configured maximum lengths, activations are an analytic estimate of the peak of one layer (see
:func:`_activation_bytes`). :func:`abstract_update` / :func:`abstract_sampler` lower and compile
the real jitted update / sampler on a mesh from ``ShapeDtypeStruct`` inputs, so a config is
checked against its target mesh without any weights (fake CPU devices suffice).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from mr1 import parallel
from mr1.models import transformer
from mr1.models.config import ModelConfig, execution_overrides, get_config

GiB = 1024 ** 3
# Memory per device (GiB) of the accelerators plan.py knows.
ACCELERATORS = {
    "v4": 32, "v5e": 16, "v5p": 95, "v6e": 32,
    "a100-40gb": 40, "a100-80gb": 80, "h100-80gb": 80, "h200": 141,
}
HEADROOM = 0.9  # a plan "fits" when its total is under 90% of the device's memory
# Dense bf16 peak (TFLOP/s) and HBM bandwidth (TB/s) per device, from the vendors' data sheets:
# the time estimates below scale these by assumed efficiencies (nothing here is measured).
PEAK = {
    "v4": (275, 1.2), "v5e": (197, 0.82), "v5p": (459, 2.76), "v6e": (918, 1.64),
    "a100-40gb": (312, 1.56), "a100-80gb": (312, 2.04), "h100-80gb": (989, 3.35),
    "h200": (989, 4.8),
}
MFU = 0.35        # assumed matmul utilisation of prefill and the update (FSDP, remat)
BW_EFFICIENCY = 0.5  # assumed fraction of HBM bandwidth a decode step achieves


@dataclasses.dataclass
class Plan:
    """One device's memory, by component (bytes), and the setting it was computed for."""

    spec: str
    model: str
    num_params: int
    mesh: parallel.MeshShape
    kind: str                     # "train" | "eval"
    components: dict[str, int]
    notes: list[str]
    shapes: dict[str, Any]
    # phase -> the components alive together (train: "rollout" and "update"; the state is
    # resident in both, the KV cache only while sampling, gradients and activations only
    # inside the update)
    phases: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def phase_total(self, phase: str) -> int:
        return sum(self.components[c] for c in self.phases[phase])

    @property
    def total(self) -> int:
        """Peak bytes per device: the largest phase (all components when no phases)."""
        if not self.phases:
            return sum(self.components.values())
        return max(self.phase_total(p) for p in self.phases)

    def fits(self, accelerator: str) -> bool:
        return self.total <= HEADROOM * ACCELERATORS[accelerator] * GiB

    def table(self, accelerators=tuple(ACCELERATORS)) -> str:
        lines = [f"plan: {self.spec or self.model} ({self.kind}), {self.model} "
                 f"({self.num_params / 1e9:.2f} B params), {self.mesh.size} devices, mesh "
                 f"{self.mesh}",
                 "  " + ", ".join(f"{k} {v}" for k, v in self.shapes.items()),
                 f"  {'component':<28}{'GiB / device':>14}"]
        for name, b in self.components.items():
            lines.append(f"  {name:<28}{b / GiB:>14.2f}")
        for phase, names in self.phases.items():
            lines.append(f"  {'phase ' + phase:<28}{self.phase_total(phase) / GiB:>14.2f}"
                         f"   ({' + '.join(names)})")
        lines.append(f"  {'peak':<28}{self.total / GiB:>14.2f}")
        fit = ", ".join(f"{a} ({ACCELERATORS[a]} GiB): {'fits' if self.fits(a) else 'NO'}"
                        for a in accelerators)
        lines.append(f"  fits (under {HEADROOM:.0%} of memory): {fit}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def model_config(config) -> ModelConfig:
    """The config's model shapes: ``model_preset`` or, for named presets, ``model``."""
    name = config.get("model_preset", "") or config.model
    folder = pathlib.Path(str(name)).expanduser()
    if (folder / "config.json").is_file():  # an HF checkpoint folder: its config.json only
        from mr1.models.weights import config_from_hf
        cfg = config_from_hf(folder)
    else:
        try:
            cfg = get_config(name)
        except KeyError as e:
            raise ValueError(f"cannot plan model {name!r}: set config.model_preset to a "
                             "ModelConfig preset or config.model to an HF folder") from e
    return cfg.replace(**execution_overrides(config))


def is_train_config(config) -> bool:
    return "rollout" in config and "optim" in config


def abstract_params(cfg: ModelConfig, dtype) -> Any:
    return jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.PRNGKey(0), dtype))


def _train_params(config, cfg: ModelConfig):
    """Abstract trainable params, optimizer, frozen base (LoRA) like the Trainer builds them."""
    from mr1.models.lora import init_lora, lora_scale
    from mr1.rl import train_step as TS

    policy = abstract_params(cfg, jnp.dtype(config.get("param_dtype", "float32")))
    rank = int((config.get("lora") or {}).get("rank", 0) or 0)
    if rank > 0:
        params = {"lora": jax.eval_shape(lambda: init_lora(policy, rank,
                                                           tuple(config.lora.targets)))}
        frozen, scale = policy, lora_scale(config.lora.alpha, rank)
    else:
        params, frozen, scale = {"policy": policy}, None, None
    if config.algo == "ppo":
        params["value_head"] = jax.eval_shape(lambda: TS.init_value_head(cfg))
    opt = TS.make_optimizer(config.optim.learning_rate,
                            critic_learning_rate=(config.optim.critic_learning_rate
                                                  if config.algo == "ppo" else None),
                            warmup_steps=config.optim.warmup_steps,
                            weight_decay=config.optim.weight_decay, b1=config.optim.b1,
                            b2=config.optim.b2, max_grad_norm=config.loss.max_grad_norm,
                            lora=rank > 0)
    return params, opt, frozen, scale, policy


def _tree_bytes(tree, sizes: dict, mode: str) -> int:
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = tuple(x.shape)
        spec, _ = parallel.spec_for(parallel.path_str(path), shape, sizes, mode)
        total += parallel.shard_bytes(shape, jnp.dtype(x.dtype).itemsize, spec, sizes)
    return total


def _div(n: int, k: int) -> int:
    return -(-n // k)


def _kv_bytes(cfg: ModelConfig, rows: int, length: int, tp: int, itemsize: int) -> int:
    kv_heads = cfg.num_kv_heads // tp if cfg.num_kv_heads % tp == 0 else cfg.num_kv_heads
    return 2 * cfg.num_layers * rows * kv_heads * length * cfg.head_dim * itemsize


def _activation_bytes(cfg: ModelConfig, prompts: int, rows: int, t_p: int, t_r: int, tp: int,
                      act: int, remat: bool, logit_chunk: int = 0) -> tuple[int, str]:
    """Peak activation bytes of one scored micro-batch on one device, and how it was counted.

    ``prompts`` prompts of ``t_p`` tokens are encoded once and ``rows`` completions of ``t_r``
    tokens attend them (:func:`mr1.rl.train_step.score_completions`). Per layer: attention
    scores and probabilities in float32 over ``H / tp`` heads (the prompt pass
    ``prompts x H x t_p^2``, the completion pass ``rows x H x t_r x (t_p + t_r)``), the SwiGLU
    activations (3 x tokens x F / tp) and the layer input; x2 for the backward's cotangents.
    Remat keeps only each layer's input (and the prompt's keys/values, the completions'
    prefix) across layers; without it every layer's working set is kept. Plus the float32
    logits over the vocabulary (/ tp) at the completion positions, x3 (logits, softmax,
    cotangent). ``cfg.attention_chunk`` / ``logit_chunk`` bound the query positions whose
    scores / logits exist at once (blocks are recomputed in the backward).
    """
    h = _div(cfg.num_heads, tp)
    f = _div(cfg.intermediate_size, tp)
    tok = prompts * t_p + rows * t_r
    qc = lambda t: min(t, cfg.attention_chunk) if cfg.attention_chunk else t  # noqa: E731
    scores = 4 * h * max(prompts * qc(t_p) * t_p, rows * qc(t_r) * (t_p + t_r))
    layer = 2 * (2 * scores + 3 * tok * f * act + 2 * tok * cfg.hidden_size * act)
    prefix_kv = _kv_bytes(cfg, prompts, t_p, tp, act)
    if remat:
        kept = cfg.num_layers * tok * cfg.hidden_size * act + prefix_kv
        how = "remat: layer inputs + prompt K/V kept, one layer's working set live"
    else:
        kept = (cfg.num_layers - 1) * layer // 2 + prefix_kv
        how = "no remat: every layer's activations kept for the backward"
    lt = min(t_r, logit_chunk) if logit_chunk else t_r
    logits = 3 * rows * lt * _div(cfg.vocab_size, tp) * 4
    if cfg.attention_chunk or logit_chunk:
        how += (f"; attention over {cfg.attention_chunk or 'all'}-position query blocks, "
                f"log-probs over {logit_chunk or 'all'}-position blocks")
    return kept + layer + logits, how


def _update_prompts(config) -> tuple[int, int]:
    """Prompts and samples per prompt of one update (:func:`mr1.rl.runner.config_layout`)."""
    from mr1.rl.runner import config_layout

    layout = config_layout(config)
    return layout.prompts, layout.group_size


def make_plan(config, num_devices: int | None = None, mesh=None) -> Plan:
    """The per-device memory plan of ``config`` on ``num_devices`` (default
    ``config.plan.num_devices``) with ``mesh`` ``(data, fsdp, tp)`` (default ``config.plan.mesh``,
    else the config's ``parallel.mesh``)."""
    cfg = model_config(config)
    plan_cfg = config.get("plan") or {}
    n = int(num_devices or plan_cfg.get("num_devices", 1) or 1)
    mesh = mesh or plan_cfg.get("mesh") or (config.get("parallel") or {}).get("mesh") or ()
    shape = parallel.MeshShape.resolve(n, *mesh) if mesh else parallel.MeshShape(data=n)
    sizes = {"data": shape.data, "fsdp": shape.fsdp, "tp": shape.tp}
    mode = "fsdp" if shape.fsdp > 1 else "replicated"
    t_p = int(plan_cfg.get("prompt_tokens", 1024))
    act = jnp.dtype(cfg.compute_dtype or config.get("param_dtype", "float32")).itemsize
    notes, comp = [], {}
    if is_train_config(config):
        t_r = int(plan_cfg.get("response_tokens", config.answer.max_new_tokens))
        params, opt, frozen, _, policy = _train_params(config, cfg)
        comp["params"] = _tree_bytes(params, sizes, mode)
        if frozen is not None:
            comp["frozen base (LoRA)"] = _tree_bytes(frozen, sizes, mode)
        comp["optimizer (Adam mu, nu)"] = _tree_bytes(jax.eval_shape(opt.init, params), sizes,
                                                      mode)
        comp["gradients (accum + micro)"] = 2 * comp["params"]
        if config.loss.kl_beta > 0 and frozen is None:  # kept in the compute dtype
            ref = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
                x.shape, transformer.activation_dtype(cfg, x.dtype)), policy)
            comp["reference model"] = _tree_bytes({"policy": ref}, sizes, mode)
        P, G = _update_prompts(config)
        mb = config.rollout.microbatch_prompts or P
        if P % mb or mb % shape.batch:  # the Trainer's own check
            raise ValueError(
                f"prompts_per_step {P} must split into micro-batches of {mb} prompts, each "
                f"divisible by the {shape.batch} devices the batch is split over (mesh {shape});"
                f" set --config.rollout.microbatch_prompts to a multiple of {shape.batch}")
        sharded = bool(config.parallel.get("shard_rollouts", False))
        roll_dev = shape.batch if sharded else 1
        roll_tp = shape.tp if sharded else 1
        per_call = config.rollout.get("prompts_per_call", 0) or P
        comp["rollout KV cache"] = (
            _kv_bytes(cfg, _div(per_call, roll_dev), t_p, roll_tp, act)
            + _kv_bytes(cfg, _div(per_call * G, roll_dev), t_r, roll_tp, act))
        if not sharded:
            notes.append("rollouts sample on one device per process (parallel.shard_rollouts "
                         "= False): the KV cache is the whole batch's")
        prompts_dev = max(mb // shape.batch, 1)
        rows_dev = prompts_dev * G
        comp["activations (1 micro-batch)"], how = _activation_bytes(
            cfg, prompts_dev, rows_dev, t_p, t_r, shape.tp, act,
            bool(config.parallel.get("remat", False)),
            int(config.parallel.get("logit_chunk", 0) or 0))
        notes.append(how)
        resident = tuple(k for k in comp if k not in ("rollout KV cache",
                                                       "gradients (accum + micro)",
                                                       "activations (1 micro-batch)"))
        phases = {"rollout": resident + ("rollout KV cache",),
                  "update": resident + ("gradients (accum + micro)",
                                        "activations (1 micro-batch)")}
        shapes = {"prompts/step": P, "G": G, "prompts per sampler call": per_call,
                  "micro-batches": P // mb,
                  "per device per micro-batch": f"{prompts_dev} prompts, {rows_dev} rows",
                  "prompt": t_p, "response": t_r}
        kind = "train"
    else:
        t_r = int(plan_cfg.get("response_tokens", config.answer.max_new_tokens))
        pdt = jnp.dtype(config.get("param_dtype", "float32"))
        comp["params"] = _tree_bytes(abstract_params(cfg, pdt), sizes, mode)
        rows = config.answer.batch_size
        comp["KV cache (greedy decode)"] = _kv_bytes(cfg, _div(rows, shape.batch), t_p + t_r,
                                                     shape.tp, act)
        chunk = 2  # mr1.sampling.PREFILL_CHUNK prompts per prefill pass
        qc = min(t_p, cfg.attention_chunk) if cfg.attention_chunk else t_p
        comp["activations (prefill pass)"] = (
            4 * 2 * _div(cfg.num_heads, shape.tp) * chunk * qc * t_p
            + 3 * chunk * t_p * _div(cfg.intermediate_size, shape.tp) * act)
        shapes = {"answer batch": rows, "prompt": t_p, "response": t_r}
        kind = "eval"
        phases = {}
    return Plan(spec=config.get("spec", ""), model=cfg.name, num_params=cfg.num_params,
                mesh=shape, kind=kind, components=comp, notes=notes, shapes=shapes,
                phases=phases)


def estimate_step_seconds(config, plan: Plan, accelerator: str, *, mfu: float = MFU,
                          bw_efficiency: float = BW_EFFICIENCY,
                          response_tokens: int | None = None) -> dict[str, float]:
    """A roofline estimate of one training step on ``accelerator`` (not a measurement).

    Rollout: prefill FLOPs at ``mfu`` of peak, then ``response_tokens`` decode steps (default
    the configured maximum, a worst case: answers usually stop far earlier) each reading the
    device's bf16 weight shard and KV cache at ``bw_efficiency`` of HBM bandwidth, per sampler
    call. Update: 3 forward-equivalents (forward + backward), +1 with remat, +1 for a KL
    reference or PPO values pass, over prompt + completion tokens, at ``mfu`` of peak.
    """
    cfg = model_config(config)
    tflops, tbps = PEAK[accelerator]
    flops_s = tflops * 1e12 * mfu * plan.mesh.size
    P, G = _update_prompts(config)
    t_p = int(plan.shapes["prompt"])
    t_r = int(response_tokens or plan.shapes["response"])
    ctx = t_p + t_r // 2
    prefill = P * t_p * cfg.flops_per_token(t_p // 2) / flops_s
    per_call = config.rollout.get("prompts_per_call", 0) or P
    calls = P // per_call
    weights = 2 * cfg.num_params / plan.mesh.size  # bf16 weight shard read per decode step
    kv = plan.components["rollout KV cache"] * (ctx / (t_p + t_r))
    decode = calls * t_r * (weights + kv) / (tbps * 1e12 * bw_efficiency)
    decode_flops = P * G * t_r * cfg.flops_per_token(ctx) / flops_s
    passes = 3 + (1 if config.parallel.get("remat", False) else 0)
    passes += 1 if (config.loss.kl_beta > 0 or config.algo == "ppo") else 0
    tokens = P * t_p + P * G * t_r
    update = passes * tokens * cfg.flops_per_token(ctx) / flops_s
    rollout = prefill + max(decode, decode_flops)
    return {"rollout_s": rollout, "update_s": update, "step_s": rollout + update}


# ----------------------------------------------------------------------------- compile checks

def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def abstract_update(config, mesh, *, prompt_tokens: int | None = None,
                    response_tokens: int | None = None):
    """Lowers and compiles the trainer's jitted update (:func:`mr1.rl.runner.jit_update`: the
    advantages, reference log-probs and ``epochs x minibatches`` optimizer steps) for
    ``config`` on ``mesh`` from abstract arrays; returns ``(compiled, seconds)``. Shapes: the
    config's batch, ``plan`` lengths."""
    import time

    from mr1.rl import runner as R
    from mr1.rl import train_step as TS

    cfg = model_config(config)
    plan_cfg = config.get("plan") or {}
    t_p = prompt_tokens or int(plan_cfg.get("prompt_tokens", 1024))
    t_r = response_tokens or int(plan_cfg.get("response_tokens", config.answer.max_new_tokens))
    parts = R.step_parts(config)
    params, opt, frozen, scale, policy = _train_params(config, cfg)
    mode = "fsdp" if parallel.mesh_shape(mesh).fsdp > 1 else "replicated"
    shard = lambda t: parallel.param_shardings(t, mesh, mode)  # noqa: E731
    state = jax.eval_shape(lambda: TS.init_train_state(params, opt, 0))
    state_sharding = TS.TrainState(step=parallel.replicated(mesh), params=shard(state.params),
                                   opt_state=shard(state.opt_state),
                                   rng=parallel.replicated(mesh))
    P, G = _update_prompts(config)
    mb = config.rollout.microbatch_prompts or P
    m = P // mb
    f32, i32 = jnp.float32, jnp.int32
    s = lambda *shape, dt=f32: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    rows = mb * G
    # what the trainer sends: the rollout and the rewards (advantages etc. are computed inside)
    batch = TS.RolloutBatch(prompt_ids=s(m, mb, t_p, dt=i32), prompt_mask=s(m, mb, t_p, dt=i32),
                            tokens=s(m, rows, t_r, dt=i32), completion_mask=s(m, rows, t_r),
                            old_logp=s(m, rows, t_r), ref_logp=None, advantages=None,
                            returns=None, old_values=None)
    on_batch = lambda t: _abstract(t, jax.tree.map(  # noqa: E731
        lambda _: parallel.batch_sharding(mesh, microbatched=True), t))
    frozen_sharding = shard(frozen) if frozen is not None else None
    ref = ref_sharding = None
    if parts.lc.kl_beta > 0:  # the reference: the LoRA base, else a compute-dtype copy
        ref = frozen if frozen is not None else jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, transformer.activation_dtype(cfg, x.dtype)),
            policy)
        ref_sharding = shard(ref)
    update = R.jit_update(cfg, parts.lc, parts.sc, parts.ac, opt, lora_scale=scale, mesh=mesh,
                          state_sharding=state_sharding, frozen_sharding=frozen_sharding,
                          ref_sharding=ref_sharding)
    args = (_abstract(state, state_sharding), on_batch(batch), on_batch(s(m, rows)),
            None if frozen is None else _abstract(frozen, frozen_sharding),
            None if ref is None else _abstract(ref, ref_sharding))
    t0 = time.time()
    compiled = update.lower(*args).compile()
    return compiled, time.time() - t0


def abstract_sampler(config, mesh, *, prompt_tokens: int | None = None,
                     response_tokens: int | None = None):
    """Lowers and compiles the greedy sampler of an evaluation config on ``mesh`` (rows over the
    batch axes) from abstract arrays; returns ``(compiled, seconds)``."""
    import time

    from mr1.sampling import SamplingConfig, _compiled_sampler

    cfg = model_config(config)
    plan_cfg = config.get("plan") or {}
    t_p = prompt_tokens or int(plan_cfg.get("prompt_tokens", 1024))
    t_r = response_tokens or int(plan_cfg.get("response_tokens", config.answer.max_new_tokens))
    pdt = jnp.dtype(config.get("param_dtype", "float32"))
    params = abstract_params(cfg, pdt)
    mode = "fsdp" if parallel.mesh_shape(mesh).fsdp > 1 else "replicated"
    params = _abstract(params, parallel.param_shardings(params, mesh, mode))
    b = config.answer.batch_size
    rows = parallel.batch_or_replicated(mesh, b)
    ids = jax.ShapeDtypeStruct((b, t_p), jnp.int32, sharding=rows)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=parallel.replicated(mesh))
    fn = _compiled_sampler(cfg, SamplingConfig(max_new_tokens=t_r, mesh=mesh),
                           cfg.eos_token_ids, cfg.pad_token_id)
    t0 = time.time()
    compiled = fn.lower(params, ids, ids, key).compile()
    return compiled, time.time() - t0


def program_key(config, mesh_shape: parallel.MeshShape) -> str:
    """Configs with equal keys compile to the same program (e.g. the Answer Agent and Memory
    Manager configs of one backbone and algorithm: same model, batch and lengths)."""
    import json

    cfg = model_config(config)
    plan_cfg = config.get("plan") or {}
    key = {"model": dataclasses.asdict(cfg), "mesh": mesh_shape.as_tuple(),
           "param_dtype": config.get("param_dtype", "float32"),
           "prompt": int(plan_cfg.get("prompt_tokens", 1024)),
           "response": int(plan_cfg.get("response_tokens", config.answer.max_new_tokens))}
    if is_train_config(config):
        key.update(algo=config.algo, loss=config.loss.to_dict(), optim=config.optim.to_dict(),
                   lora=(config.get("lora") or {}) and config.lora.to_dict(),
                   rollout=[config.rollout.prompts_per_step, config.rollout.group_size,
                            config.rollout.microbatch_prompts],
                   parallel={k: config.parallel.get(k, 0) for k in ("remat", "logit_chunk")})
    else:
        key.update(batch=config.answer.batch_size)
    return json.dumps(key, sort_keys=True, default=str)


def compile_config(config, mesh):
    """:func:`abstract_update` for training configs, :func:`abstract_sampler` otherwise."""
    return (abstract_update if is_train_config(config) else abstract_sampler)(config, mesh)


def compiled_memory(compiled) -> dict[str, float] | None:
    """XLA's per-device memory analysis of a compiled program (GiB), where the backend has it."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
    return {k.replace("_size_in_bytes", ""): getattr(m, k, 0) / GiB for k in keys}


def fake_device_flags(num_devices: int) -> str:
    """``XLA_FLAGS`` for ``num_devices`` fake CPU devices (set before jax is imported)."""
    return f"--xla_force_host_platform_device_count={int(num_devices)}"


__all__ = ["ACCELERATORS", "PEAK", "Plan", "make_plan", "estimate_step_seconds", "abstract_update", "abstract_sampler",
           "compiled_memory", "fake_device_flags", "model_config", "is_train_config",
           "program_key", "compile_config"]
