"""Training-step throughput: the jitted GRPO update and the rollout sampler, tokens/s and MFU.

    python experiments/benchmarks/bench_train.py       # 4 prompts x 8, 512 + 32 tokens, 135M
    python experiments/benchmarks/bench_train.py --model=tiny --prompt_len=64 \
        --completion_len=8 --repeats=1                  # smoke test

Synthetic GRPO shapes: P prompts x G samples, prompts left-padded to T_p (prompt ``p`` has
``round(p / (P-1) * max_pad * T_p)`` pad tokens, so prompt 0 is full), completions of T_c
tokens, all real. Phases, each timed as the median of ``--repeats`` calls after one warm-up
(compile) call:

* update: ``mr1.rl.train_step.make_update`` with ``LossConfig()`` (GRPO) and ``make_optimizer``
  (AdamW), the batch built by ``split_microbatches`` (``P / microbatch_prompts`` micro-batches)
  and already on the device;
* step: what the trainer does after the rewards, from host arrays to new params, two ways in one
  run: ``pre-refactor`` (the trainer before ``mr1.rl.runner``: group advantages computed on the
  host, the batch sent, ``make_update``) and ``make_train_step`` (the rollout and rewards sent in
  one transfer, advantages and the update in one jitted program; ``--epochs`` x
  ``--minibatches`` optimizer steps, 1 x 1 = the same update);
* rollout: ``mr1.sampling.sample_padded`` with ``SamplingConfig(max_new_tokens=T_c,
  temperature=1.0, num_samples=G)`` and no EOS ids (config and tokenizer), so every row decodes
  exactly T_c tokens (checked).

Tokens per step count each group's prompt once (real tokens; the padded count is in the note)
plus the P*G*T_c completion tokens. Useful FLOPs come from ``ModelConfig.flops_per_token``
(attention over the real keys before each token):

* update = 3 x forward (forward + backward ~ 2 x forward): each prompt's real tokens without the
  LM head (its logits are never needed), then the G*T_c completion tokens with it;
* rollout = each prompt prefilled once (LM head only at its last token), then T_c - 1 decode
  steps for the P*G rows (``common.generation_flops``, as ``bench_generate.py``).

MFU is against the float32 matmul peak measured in the same run (2048² ``jnp`` matmul). The
note also gives MFU on the FLOPs of the padded prompts (what the step actually computes).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from common import (
    generation_flops,
    machine_line,
    matmul_peak_gflops,
    table_header,
    table_row,
    timed,
)

from mr1.models import load_policy
from mr1.rl.advantages import group_advantages
from mr1.rl.runner import make_train_step
from mr1.rl.train_step import (
    LossConfig,
    init_train_state,
    make_optimizer,
    make_update,
    split_microbatches,
)
from mr1.sampling import SamplingConfig, sample_padded

_PROMPTS = flags.DEFINE_integer("prompts", 4, "P: prompts (groups) per step")
_GROUP = flags.DEFINE_integer("group", 8, "G: samples per prompt")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 512, "T_p: padded prompt length")
_COMPLETION_LEN = flags.DEFINE_integer("completion_len", 32, "T_c: completion length")
_MICROBATCH = flags.DEFINE_integer("microbatch_prompts", 2, "prompts per gradient micro-batch")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls per phase (after one warm-up)")
_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct",
                             "load_policy name: the embedded GGUF, a preset (random weights), "
                             "a .gguf file or an HF folder")
_MAX_PAD = flags.DEFINE_float("max_pad", 0.25,
                              "left padding of the last prompt, as a fraction of T_p")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-6, "AdamW learning rate")
_PHASES = flags.DEFINE_list("phases", ["update", "step", "rollout"], "phases to time")
_EPOCHS = flags.DEFINE_integer("epochs", 1, "make_train_step: passes over the batch")
_MINIBATCHES = flags.DEFINE_integer("minibatches", 1, "make_train_step: optimizer steps per pass")
_SEED = flags.DEFINE_integer("seed", 0, "synthetic data / sampling seed")

UPDATE_MFU_TARGET = 0.40  # the target for the update


def prompt_lengths(p: int, t_p: int, max_pad: float) -> np.ndarray:
    """Real (non-pad) length of each prompt: prompt 0 full, the last ``max_pad * t_p`` shorter."""
    pads = np.round(np.linspace(0.0, max_pad * t_p, p)).astype(int) if p > 1 else np.zeros(1, int)
    return np.maximum(t_p - pads, 1)


def synthetic_arrays(lengths, t_p: int, g: int, t_c: int, vocab: int, pad_id: int,
                     seed: int) -> dict[str, np.ndarray]:
    """Host arrays of one GRPO step (``split_microbatches`` input), left-padded prompts."""
    rng = np.random.default_rng(seed)
    p = len(lengths)
    mask = (np.arange(t_p)[None, :] >= (t_p - np.asarray(lengths))[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(3, vocab, (p, t_p)), pad_id).astype(np.int32)
    n = p * g
    return {"prompt_ids": ids, "prompt_mask": mask,
            "tokens": rng.integers(3, vocab, (n, t_c)).astype(np.int32),
            "completion_mask": np.ones((n, t_c), np.float32),
            "old_logp": -rng.uniform(0.5, 4.0, (n, t_c)).astype(np.float32),
            "advantages": rng.standard_normal(n).astype(np.float32)}


def update_flops(cfg, lengths, g: int, t_c: int) -> float:
    """3 x forward: each prompt once without the LM head, then its G completions with it."""
    head = 2.0 * cfg.hidden_size * cfg.vocab_size
    total = 0.0
    for n in lengths:
        prompt = sum(cfg.flops_per_token(context=c + 1) - head for c in range(int(n)))
        completion = g * sum(cfg.flops_per_token(context=int(n) + j + 1) for j in range(t_c))
        total += prompt + completion
    return 3.0 * total


def rollout_flops(cfg, lengths, g: int, t_c: int) -> float:
    """Each prompt prefilled once, then T_c - 1 decode steps for its G samples."""
    total = 0.0
    for n in map(int, lengths):  # G samples minus the G - 1 prefills they share
        total += generation_flops(cfg, g, n, t_c) - (g - 1) * generation_flops(cfg, 1, n, 1)
    return total


def warm_and_time(fn, repeats: int) -> tuple[float, float]:
    """(seconds of the warm-up (compile) call, median seconds of ``repeats`` further calls)."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t, timed(fn, repeats)


def bench_update(policy, arrays, p, g, mb, lr, repeats, loss_cfg=None, seed=0):
    """(compile s, median s, metrics) of the GRPO update (``loss_cfg``: default
    ``LossConfig()``) on ``arrays`` in micro-batches of ``mb`` prompts."""
    cfg = policy.config
    optimizer = make_optimizer(lr)
    # the update donates its state: copy the params so policy.params stays usable (rollout)
    params = {"policy": jax.tree.map(jnp.array, policy.params)}
    box = {"state": init_train_state(params, optimizer, seed)}
    batch = jax.device_put(split_microbatches(arrays, p, g, mb))
    update = make_update(cfg, loss_cfg or LossConfig(), optimizer)
    metrics = {}

    def step():
        box["state"], m = update(box["state"], batch)
        jax.block_until_ready(box["state"])
        metrics.update(jax.device_get(m))

    compile_s, s = warm_and_time(step, repeats)
    return compile_s, s, metrics


def step_config(p, g, mb, lr, epochs, minibatches):
    """The GRPO run config whose train step is ``LossConfig()`` + ``make_optimizer(lr)``."""
    import pathlib
    import runpy

    path = (pathlib.Path(__file__).resolve().parents[1] / "configs" /
            "locomo_smollm2_135m_grpo.py")
    c = runpy.run_path(str(path))["get_config"]()
    c.rollout.prompts_per_step, c.rollout.group_size, c.rollout.microbatch_prompts = p, g, mb
    c.optim.learning_rate, c.optim.warmup_steps = lr, 0
    c.optim.epochs, c.optim.minibatches = epochs, minibatches
    c.loss.normalize_std = True
    c.parallel.num_devices = 1
    return c


def bench_step_pre_refactor(policy, arrays, rewards, p, g, mb, lr, repeats):
    """The trainer's step after the rewards before mr1.rl.runner: host advantages, one
    transfer of the batch, ``make_update``."""
    optimizer = make_optimizer(lr)
    params = {"policy": jax.tree.map(jnp.array, policy.params)}
    box = {"state": init_train_state(params, optimizer, _SEED.value)}
    update = make_update(policy.config, LossConfig(), optimizer)
    host = {k: v for k, v in arrays.items() if k != "advantages"}

    def step():
        host["advantages"] = np.asarray(group_advantages(rewards, g))
        batch = jax.device_put(split_microbatches(host, p, g, mb))
        box["state"], m = update(box["state"], batch)
        jax.device_get(m)

    return warm_and_time(step, repeats)


def bench_step_runner(policy, arrays, rewards, p, g, mb, lr, epochs, minibatches, repeats):
    """``make_train_step``: rollout + rewards in, new runner state and metrics out."""
    step_fn = make_train_step(step_config(p, g, mb, lr, epochs, minibatches), policy.config,
                              log=lambda s: None)
    box = {"runner": step_fn.init(policy), "m": {}}
    host = {**{k: v for k, v in arrays.items() if k != "advantages"}, "rewards": rewards}

    def step():
        box["runner"], box["m"] = step_fn(box["runner"], host)

    compile_s, s = warm_and_time(step, repeats)
    return compile_s, s, box["m"]


def bench_rollout(policy, arrays, g, t_c, seed, repeats):
    # No EOS ids anywhere (Policy.eos_token_ids merges config and tokenizer ids): drop the
    # tokenizer and keep its pad id in the config, so every row decodes t_c tokens.
    cfg = policy.config.replace(eos_token_ids=(), pad_token_id=policy.pad_token_id)
    no_eos = dataclasses.replace(policy, config=cfg, tokenizer=None)
    assert no_eos.eos_token_ids == () and no_eos.pad_token_id == policy.pad_token_id
    scfg = SamplingConfig(max_new_tokens=t_c, temperature=1.0, num_samples=g)
    calls = {"n": 0, "lengths": None}

    def step():
        key = jax.random.PRNGKey(seed + calls["n"])
        calls["n"] += 1
        _, _, calls["lengths"] = sample_padded(no_eos, arrays["prompt_ids"],
                                               arrays["prompt_mask"], key, scfg)

    compile_s, s = warm_and_time(step, repeats)
    lengths = calls["lengths"]
    if not np.all(lengths == t_c):
        raise RuntimeError(f"rollout rows stopped early: lengths {lengths.tolist()}")
    return compile_s, s


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    logging.set_verbosity(logging.WARNING)
    p, g, t_p, t_c = _PROMPTS.value, _GROUP.value, _PROMPT_LEN.value, _COMPLETION_LEN.value
    mb, repeats = _MICROBATCH.value, _REPEATS.value
    unknown = set(_PHASES.value) - {"update", "step", "rollout"}
    if unknown:
        raise app.UsageError(f"unknown phases {sorted(unknown)}; known: update, step, rollout")

    peak = matmul_peak_gflops()
    policy = load_policy(_MODEL.value)
    cfg = policy.config
    if t_p + t_c > cfg.max_position_embeddings:
        raise app.UsageError(f"prompt_len + completion_len = {t_p + t_c} exceeds the model's "
                             f"{cfg.max_position_embeddings} positions")
    lengths = prompt_lengths(p, t_p, _MAX_PAD.value)
    arrays = synthetic_arrays(lengths, t_p, g, t_c, cfg.vocab_size, policy.pad_token_id,
                              _SEED.value)
    real_prompt, padded_prompt, completion = int(lengths.sum()), p * t_p, p * g * t_c
    tokens = real_prompt + completion
    padded_lengths = np.full(p, t_p)
    dtype = jax.tree.leaves(policy.params)[0].dtype

    print("\n" + machine_line(peak))
    print(f"model: {cfg.name} ({cfg.num_params / 1e6:.1f}M params, {dtype}); {p} prompts x {g} "
          f"samples, prompts left-padded to {t_p} (real lengths {lengths.tolist()}), "
          f"{t_c} completion tokens; micro-batches of {mb} prompts ({p // mb} per update)")
    print(f"update: {LossConfig()}, AdamW lr={_LEARNING_RATE.value:g}; rollout: "
          f"{SamplingConfig(max_new_tokens=t_c, temperature=1.0, num_samples=g)}, EOS ignored")
    print(f"tokens/step = {real_prompt} real prompt tokens (each group's prompt once; "
          f"{padded_prompt} padded) + {completion} completion tokens; medians of {repeats} "
          f"after 1 warm-up\n", flush=True)

    rows = []
    if "update" in _PHASES.value:
        compile_s, s, m = bench_update(policy, arrays, p, g, mb, _LEARNING_RATE.value, repeats,
                                       seed=_SEED.value)
        flops = update_flops(cfg, lengths, g, t_c)
        padded = update_flops(cfg, padded_lengths, g, t_c)
        met = "met" if flops / s / (peak * 1e9) >= UPDATE_MFU_TARGET else "not met"
        note = (f"GRPO, {p // mb} micro-batches of {mb}x{g}; padded {padded_prompt + completion} "
                f"tok/step: {100 * padded / s / (peak * 1e9):.0f}% MFU; target "
                f">= {100 * UPDATE_MFU_TARGET:.0f}% ({met}); warm-up {compile_s:.1f} s; "
                f"loss {m['loss']:.3g}, skipped {m['skipped']:.0f}")
        rows.append(("update (GRPO)", s, flops, note))
    if "step" in _PHASES.value:
        rewards = np.random.default_rng(_SEED.value + 1).random(p * g).astype(np.float32)
        e, k = _EPOCHS.value, _MINIBATCHES.value
        flops = update_flops(cfg, lengths, g, t_c)
        compile_s, s = bench_step_pre_refactor(policy, arrays, rewards, p, g, mb,
                                               _LEARNING_RATE.value, repeats)
        rows.append(("step, pre-refactor (host adv + make_update)", s, flops,
                     f"warm-up {compile_s:.1f} s"))
        compile_s, s, m = bench_step_runner(policy, arrays, rewards, p, g, mb,
                                            _LEARNING_RATE.value, e, k, repeats)
        rows.append((f"step, make_train_step ({e} x {k})", s, e * flops,
                     f"{e * k} optimizer steps; warm-up {compile_s:.1f} s; loss {m['loss']:.3g}, "
                     f"clip_frac {m['clip_frac']:.3g}, skipped {m['skipped']:.0f}"))
    if "rollout" in _PHASES.value:
        compile_s, s = bench_rollout(policy, arrays, g, t_c, _SEED.value, repeats)
        flops = rollout_flops(cfg, lengths, g, t_c)
        padded = rollout_flops(cfg, padded_lengths, g, t_c)
        note = (f"{completion / s:.1f} new tok/s; padded {padded_prompt + completion} tok/step: "
                f"{100 * padded / s / (peak * 1e9):.0f}% MFU; warm-up {compile_s:.1f} s")
        rows.append(("rollout (sample_padded)", s, flops, note))

    print(table_header(["phase", "tokens/step", "s/step (median)", "tokens/s", "GFLOP/s",
                        "MFU vs measured peak", "note"], "lrrrrrl"))
    for name, s, flops, note in rows:
        print(table_row([name, tokens, f"{s:.3f}", f"{tokens / s:.1f}", f"{flops / s / 1e9:.1f}",
                         f"{100 * flops / s / (peak * 1e9):.0f}%", note]), flush=True)


if __name__ == "__main__":
    app.run(main)
