"""The accelerator benchmark: every row of issue 23's table in one run, beside HF transformers.

    python experiments/benchmarks/bench_device.py --out DIR             # one GPU, <= 6 minutes
    python experiments/benchmarks/bench_device.py --out DIR --smoke     # CPU, tiny shapes (CI)
    python experiments/benchmarks/bench_device.py --out DIR --rows=matmul_peak,rollout_7b

Writes ``DIR/bench_device.json`` and ``DIR/bench_device.md`` (and prints the table), rewritten
after every row, so a run cut short keeps the rows it finished. Rows run in :data:`ROWS` order,
the roofline figures first; once ``--budget_s`` has passed the rest are marked skipped. A row
that fails (out of memory on a smaller card, say) records its error and the run goes on.

Every model has random weights. Where a row has an HF peer (logits, sampler) the HF model is
built first (``torch.manual_seed(0)``), saved as an HF folder and loaded by mr1 from there, so
both sides hold the same weights. Figures are set against the roofline measured in the same
run: the matmul peak (``--matmul_n``³ ``jnp`` matmul, bf16 and float32) and the HBM bandwidth
(a jitted ``x + 1`` over a large float32 array: bytes read + written per second). Timings are
medians after one warm-up (compile) call; compile times are those warm-up calls.

The code reuses the other benchmarks: ``common`` (timing, peaks, FLOP counts, table lines),
``bench_generate`` (mr1 / HF ``generate`` timing) and ``bench_train`` (the GRPO update and
the rollout sampler). It needs nothing beyond mr1's dependencies and torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import pathlib
import platform
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from bench_generate import bench_hf, bench_mr1
from bench_train import bench_rollout, bench_update, prompt_lengths, rollout_flops, \
    synthetic_arrays, update_flops
from common import generation_flops, table_header, table_row, timed

from mr1.models import Policy, load_policy, transformer
from mr1.models.config import get_config
from mr1.rl.train_step import LossConfig


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Every size the rows use; :data:`FULL` is the issue's, :data:`SMOKE` a CPU stand-in."""

    matmul_n: int  # the peak's square matmul
    copy_mib: int  # the bandwidth probe's float32 array
    small: str  # the sampler / logits model preset (HF peer)
    logits_lengths: tuple[int, ...]  # left-padded rows of the logits comparison
    samplers: tuple[tuple[int, int, int, int], ...]  # (prompts, samples, prompt len, new)
    big: str  # the GRPO update and 3B rollouts
    huge: str  # the 7B rollout
    update: tuple[int, int, int, int]  # (prompts, samples, prompt len, completion len)
    microbatches: tuple[int, ...]  # prompts per micro-batch, one row each
    logit_chunk: int
    rollouts_big: tuple[tuple[int, int, int, int], ...]
    rollout_huge: tuple[int, int, int, int]
    repeats: int
    hf_repeats: int


FULL = Shapes(matmul_n=8192, copy_mib=4096, small="smollm2-135m",
              logits_lengths=(300, 260, 200, 120),
              samplers=((32, 1, 560, 32), (4, 8, 560, 32), (64, 8, 512, 256)),
              big="qwen2.5-3b", huge="qwen2.5-7b", update=(8, 8, 512, 256), microbatches=(1, 2),
              logit_chunk=256, rollouts_big=((8, 8, 512, 256), (32, 8, 512, 256)),
              rollout_huge=(8, 8, 512, 256), repeats=2, hf_repeats=1)
SMOKE = Shapes(matmul_n=256, copy_mib=8, small="tiny", logits_lengths=(24, 20, 13, 6),
               samplers=((4, 1, 20, 4), (2, 2, 20, 4), (2, 2, 16, 6)),
               big="tiny-qwen", huge="tiny-qwen", update=(2, 2, 16, 8), microbatches=(1, 2),
               logit_chunk=4, rollouts_big=((2, 2, 16, 8), (4, 2, 16, 8)),
               rollout_huge=(2, 2, 16, 8), repeats=1, hf_repeats=1)


def model_config(name: str):
    """A preset, or ``tiny-qwen``: the tiny preset with Qwen-2's qkv biases (smoke runs)."""
    if name == "tiny-qwen":
        return get_config("tiny").replace(name="tiny-qwen", arch="qwen2", qkv_bias=True)
    return get_config(name)


def random_policy(cfg, dtype, seed: int = 0) -> Policy:
    """Random weights of ``cfg`` (no tokenizer; the config's EOS ids only)."""
    init = jax.jit(lambda key: transformer.init_params(cfg, key, dtype))  # no f32 copy kept
    return Policy(cfg, init(jax.random.PRNGKey(seed)))


# ----------------------------------------------------------------------------- the run


class Run:
    """The measured roofline, the HF peers and the rows written so far."""

    def __init__(self, shapes: Shapes, out: pathlib.Path, smoke: bool, budget_s: float):
        self.shapes, self.out, self.smoke, self.budget_s = shapes, out, smoke, budget_s
        self.start = time.perf_counter()
        self.peak = {}  # TFLOP/s by dtype name
        self.bandwidth = None  # bytes/s
        self.rows: list[dict] = []
        self.tmp = tempfile.TemporaryDirectory()
        self.torch = _try_torch()
        self.device = jax.devices()[0]

    # -- roofline helpers
    def bf16_peak(self) -> float:
        return self.peak.get("bfloat16") or _matmul_tflops(self.shapes.matmul_n, jnp.bfloat16)

    def bw(self) -> float:
        return self.bandwidth or _copy_bandwidth(self.shapes.copy_mib)

    # -- HF peers (same weights on both sides)
    def hf_pair(self, name: str, dtype: str):
        """``(HF model on the torch device, its folder)`` for the preset ``name``."""
        torch = self.torch
        if torch is None:
            raise RuntimeError("torch is not installed")
        folder = pathlib.Path(self.tmp.name) / name
        if not folder.is_dir():
            torch.manual_seed(0)
            _hf_model(model_config(name)).save_pretrained(str(folder), safe_serialization=True)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype))
        return model.to(_torch_device(torch)).eval(), folder

    # -- output
    def record(self, row: dict):
        self.rows.append(row)
        self.out.mkdir(parents=True, exist_ok=True)
        meta = self.meta()
        (self.out / "bench_device.json").write_text(json.dumps({**meta, "rows": self.rows},
                                                               indent=1, default=float))
        (self.out / "bench_device.md").write_text(markdown(meta, self.rows))
        print(table_row(_cells(row)), flush=True)

    def meta(self) -> dict:
        versions = {"jax": jax.__version__, "python": platform.python_version()}
        if self.torch is not None:
            import transformers

            versions.update(torch=self.torch.__version__, transformers=transformers.__version__)
        return {"device": f"{self.device.platform} {self.device.device_kind} "
                          f"x{len(jax.devices())}",
                "smoke": self.smoke, "versions": versions,
                "peak_tflops": self.peak, "hbm_bandwidth_gbs": (self.bandwidth or 0) / 1e9,
                "elapsed_s": round(time.perf_counter() - self.start, 1),
                "command": " ".join(["python", "experiments/benchmarks/bench_device.py",
                                     *sys.argv[1:]])}


def _try_torch():
    try:
        import torch

        return torch
    except ImportError:
        return None


def _torch_device(torch):
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _hf_model(cfg):
    """An HF (torch, float32) model of ``cfg``'s shape with transformers' random init."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                  head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                  rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                  tie_word_embeddings=cfg.tie_embeddings, pad_token_id=cfg.pad_token_id,
                  eos_token_id=list(cfg.eos_token_ids) or None, bos_token_id=cfg.bos_token_id)
    if cfg.arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


def _matmul_tflops(n: int, dtype, precision=None) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x: jnp.matmul(x, x, precision=precision))
    f(a).block_until_ready()
    return 2 * n ** 3 / timed(lambda: f(a).block_until_ready(), 5) / 1e12


def _copy_bandwidth(mib: int) -> float:
    """Bytes read + written per second by a jitted ``x + 1`` over ``mib`` MiB of float32."""
    x = jnp.zeros((mib * 2 ** 18,), jnp.float32)
    f = jax.jit(lambda y: y + 1)
    f(x).block_until_ready()
    return 2 * x.nbytes / timed(lambda: f(x).block_until_ready(), 5)


def _free(clear_compiled: bool = True):
    """Drops dead buffers (and compiled programs) between rows: the big rows need the memory.
    Smoke runs keep the compiled programs, so rows of the same shape compile once."""
    gc.collect()
    if not clear_compiled:
        return
    jax.clear_caches()
    from mr1 import sampling

    sampling._compiled_sampler.cache_clear()  # noqa: SLF001 - they hold compiled programs
    torch = _try_torch()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peak_memory_gib(device) -> float | None:
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2 ** 30


# ----------------------------------------------------------------------------- rows
# Each row: (id, what, the H200 figure, function(run) -> dict of "mr1", "hf",
# "roofline" (text cells) and "values" (numbers)).


def row_matmul_peak(run: Run) -> dict:
    n = run.shapes.matmul_n
    run.peak = {"bfloat16": _matmul_tflops(n, jnp.bfloat16),
                "float32": _matmul_tflops(n, jnp.float32),
                "float32_highest": _matmul_tflops(n, jnp.float32, "highest")}
    p = run.peak
    return {"mr1": f"bf16 {p['bfloat16']:.4g}; f32 default precision {p['float32']:.4g}; "
                   f"f32 highest {p['float32_highest']:.4g} TFLOP/s",
            "hf": "-", "roofline": "(the peak itself)", "values": dict(p)}


def row_hbm_bandwidth(run: Run) -> dict:
    run.bandwidth = _copy_bandwidth(run.shapes.copy_mib)
    return {"mr1": f"{run.bandwidth / 1e9:.4g} GB/s (read + write, {run.shapes.copy_mib} MiB "
                   "float32 x + 1)", "hf": "-", "roofline": "(the bandwidth itself)",
            "values": {"bytes_per_s": run.bandwidth}}


def row_logits_vs_hf(run: Run) -> dict:
    torch = run.torch
    model, folder = run.hf_pair(run.shapes.small, "float32")
    policy = load_policy(str(folder), dtype=jnp.float32)
    rng = np.random.default_rng(0)
    from mr1.sampling import left_pad

    rows = [rng.integers(3, policy.config.vocab_size, n).tolist()
            for n in run.shapes.logits_lengths]
    ids, mask = left_pad(rows, policy.config.pad_token_id)
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor(ids, dtype=torch.long, device=model.device),
                    attention_mask=torch.tensor(mask, dtype=torch.long, device=model.device)
                    ).logits.float().cpu().numpy()
    real = mask.astype(bool)
    highest = float(np.abs(policy.logits(ids, mask) - ref)[real].max())
    fast = dataclasses.replace(policy, config=policy.config.replace(matmul_precision="default"))
    default = float(np.abs(fast.logits(ids, mask) - ref)[real].max())
    tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    return {"mr1": f"max abs diff {highest:.2g} (Policy.logits, highest); {default:.2g} at "
                   "the backend's default precision",
            "hf": f"HF torch float32 (allow_tf32={tf32})", "roofline": "-",
            "values": {"max_abs_diff_highest": highest, "max_abs_diff_default": default}}


def _sampler_row(index: int):
    def row(run: Run) -> dict:
        p, g, t_p, new = run.shapes.samplers[index]
        dtype = "float32" if run.smoke else "bfloat16"
        model, folder = run.hf_pair(run.shapes.small, dtype)
        policy = load_policy(str(folder), dtype=jnp.dtype(dtype))
        cfg = policy.config
        rng = np.random.default_rng(index)
        prompts = [rng.integers(3, cfg.vocab_size, t_p).tolist() for _ in range(p)]
        t1, tn = bench_mr1(policy, prompts, run.shapes.repeats, g, new)
        h1, hn = bench_hf(model, prompts, cfg.pad_token_id, run.shapes.hf_repeats, g, new)
        b = p * g
        ours, theirs = b * new / tn, b * new / hn
        flops = generation_flops(cfg, b, t_p, new) - (b - p) * generation_flops(cfg, 1, t_p, 1)
        mfu = flops / tn / (run.bf16_peak() * 1e12)
        return {"mr1": f"{ours:,.0f} new tok/s ({tn:.3g} s)",
                "hf": f"{theirs:,.0f} new tok/s ({hn:.3g} s); mr1 {ours / theirs:.1f}x",
                "roofline": f"{100 * mfu:.2g}% of the bf16 peak",
                "values": {"mr1_tok_s": ours, "hf_tok_s": theirs, "mr1_s": tn, "hf_s": hn,
                           "mr1_prefill_s": t1, "hf_prefill_s": h1, "mfu": mfu}}

    return row


def _update_row(microbatch: int):
    def row(run: Run) -> dict:
        s = run.shapes
        p, g, t_p, t_c = s.update
        cfg = model_config(s.big).replace(compute_dtype="bfloat16")
        policy = random_policy(cfg, jnp.float32)  # float32 master weights
        lengths = prompt_lengths(p, t_p, 0.25)
        arrays = synthetic_arrays(lengths, t_p, g, t_c, cfg.vocab_size, cfg.pad_token_id, 0)
        loss = LossConfig(remat=True, logit_chunk=s.logit_chunk)
        compile_s, sec, m = bench_update(policy, arrays, p, g, microbatch, 1e-6, s.repeats,
                                         loss_cfg=loss)
        mfu = update_flops(cfg, lengths, g, t_c) / sec / (run.bf16_peak() * 1e12)
        mem = _peak_memory_gib(run.device)
        mem_txt = "" if mem is None else f"; peak memory so far {mem:.1f} GiB"
        return {"mr1": f"{sec:.3g} s/update, loss {float(m['loss']):.3g}{mem_txt}", "hf": "-",
                "roofline": f"{100 * mfu:.3g}% of the bf16 peak",
                "values": {"s": sec, "mfu": mfu, "compile_s": compile_s, "peak_gib": mem}}

    return row


def _decode_bytes(policy, p, g, t_p, new) -> float:
    """HBM bytes one decode step reads on average: every weight but the embedding table
    (unless tied: then it is the LM head), plus the prompt prefix and half the new cache."""
    cfg = policy.config
    leaves = jax.tree.leaves(policy.params)
    weights = sum(x.nbytes for x in leaves)
    if not cfg.tie_embeddings:
        weights -= policy.params["embed"].nbytes
    itemsize = jnp.dtype(transformer.activation_dtype(cfg, leaves[0].dtype)).itemsize
    per_key = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize
    return weights + per_key * (p * t_p + p * g * new / 2)


def _rollout_row(name_of, shape_of, decode_step: bool = False, **changes):
    """A rollout row; ``changes``: ModelConfig fields (``attention_impl``, ``decode_unroll``:
    a number, or ``"all"`` for every layer)."""

    def row(run: Run) -> dict:
        p, g, t_p, new = shape_of(run.shapes)
        cfg = model_config(name_of(run.shapes))
        if changes.get("decode_unroll") == "all":
            cfg = cfg.replace(decode_unroll=cfg.num_layers)
        cfg = cfg.replace(**{k: v for k, v in changes.items() if v != "all"})
        policy = random_policy(cfg, jnp.bfloat16)
        lengths = np.full(p, t_p)
        arrays = synthetic_arrays(lengths, t_p, g, new, cfg.vocab_size, cfg.pad_token_id, 0)
        compile_s, sec = bench_rollout(policy, arrays, g, new, 0, run.shapes.repeats)
        values = {"s": sec, "new_tok_s": p * g * new / sec, "compile_s": compile_s,
                  "mfu": rollout_flops(cfg, lengths, g, new) / sec / (run.bf16_peak() * 1e12)}
        text = f"{sec:.3g} s, {values['new_tok_s']:,.0f} new tok/s"
        roof = f"{100 * values['mfu']:.2g}% of the bf16 peak"
        if decode_step:  # per-step time from a 1-token call: (t_new - t_1) / (new - 1)
            _, sec1 = bench_rollout(policy, arrays, g, 1, 0, run.shapes.repeats)
            step = (sec - sec1) / (new - 1)
            ideal = _decode_bytes(policy, p, g, t_p, new) / run.bw()
            values.update(decode_step_ms=1e3 * step, roofline_step_ms=1e3 * ideal,
                          hbm_fraction=ideal / step if step > 0 else None)
            if step > 0:
                text += f"; decode step {1e3 * step:.2f} ms"
                share = f"{100 * ideal / step:.3g}% of the HBM roofline"
            else:  # tiny (smoke) shapes: the two calls' difference is below timer noise
                text += f"; decode step not resolved ({1e3 * step:.2f} ms)"
                share = "n/a"
            roof = (f"{share} ({1e3 * ideal:.3g} ms a step at the measured bandwidth); "
                    f"{roof}")
        return {"mr1": text, "hf": "-", "roofline": roof, "values": values}

    return row


def row_compile_times(run: Run) -> dict:
    got = {r["id"]: r["values"]["compile_s"] for r in run.rows
           if isinstance(r.get("values"), dict) and "compile_s" in r["values"]}
    text = "; ".join(f"{k} {v:.1f} s" for k, v in got.items()) or "no compiled row ran"
    return {"mr1": text, "hf": "-", "roofline": "-", "values": got}


ROWS = [
    ("matmul_peak", "jnp matmul peak (n³), bf16 / f32 (default precision: TF32 on GPUs) / f32 "
     "highest", "bf16 664 TFLOP/s; f32 at default precision 380 TFLOP/s (TF32)",
     row_matmul_peak),
    ("hbm_bandwidth", "HBM bandwidth, jitted x + 1 over a large float32 array",
     "(not measured; H200 spec 4.8 TB/s)", row_hbm_bandwidth),
    ("rollout_7b", "Qwen2.5-7B rollout 8 x 8, 512 -> 256 tok, bf16, attention_impl=xla",
     "3.81 s, 4,305 new tok/s: ≈ 14 ms a decode step, 3.2 ms of weight reads at 4.8 TB/s "
     "(≈ 23% of the HBM roofline)",
     _rollout_row(lambda s: s.huge, lambda s: s.rollout_huge, decode_step=True)),
    ("rollout_7b_pallas", "same, attention_impl=pallas (the fused decode-attention kernel)",
     "(new)", _rollout_row(lambda s: s.huge, lambda s: s.rollout_huge, decode_step=True,
                           attention_impl="pallas")),
    ("logits_vs_hf", "logits, mr1 f32 vs HF torch f32, same weights (SmolLM2-135M shape, "
     "4 rows ≤ 300 tokens, left-padded)", "max abs diff 3.7e-3 (XLA's default f32 matmul "
     "on GPU is TF32)", row_logits_vs_hf),
    ("sampler_32x1", "sampler vs HF generate, SmolLM2-135M shape, bf16: 32 prompts x 560 tok "
     "-> 32 new", "7,616 vs 742 new tok/s (10.3x)", _sampler_row(0)),
    ("sampler_4x8", "same, 4 prompts x 8 samples", "12,859 vs 798 (16.1x)", _sampler_row(1)),
    ("sampler_64x8", "same, 64 prompts x 8 samples, 512 -> 256 tok",
     "69,436 vs 11,452 (6.1x)", _sampler_row(2)),
    ("update_3b_mb1", "Qwen2.5-3B GRPO update (f32 master, bf16 compute, remat, logit_chunk "
     "256), 8 prompts x 8, 512 + 256 tok, micro-batch 1 prompt",
     "1.57 s, 35.7% of the measured bf16 peak; peak memory 87–88 GiB", _update_row(1)),
    ("update_3b_mb2", "same, micro-batch 2 prompts", "1.26 s, 44.5%", _update_row(2)),
    ("rollout_3b_8x8", "Qwen2.5-3B rollout 8 x 8, 512 -> 256 tok, bf16",
     "2.82 s, 5,800 new tok/s",
     _rollout_row(lambda s: s.big, lambda s: s.rollouts_big[0])),
    ("rollout_3b_32x8", "Qwen2.5-3B rollout 32 x 8, 512 -> 256 tok, bf16",
     "3.96 s, 16,564 new tok/s",
     _rollout_row(lambda s: s.big, lambda s: s.rollouts_big[1])),
    ("rollout_7b_unrolled", "same as rollout_7b, decode_unroll=num_layers (static weight "
     "slices in the decode step; last, so the time budget may skip it: STAGES=probe runs it)",
     "(new)", _rollout_row(lambda s: s.huge, lambda s: s.rollout_huge, decode_step=True,
                           decode_unroll="all")),
    ("compile_times", "compile (first call) of the rows above",
     "3B update 25–27 s, 3B rollout 10–11 s, 7B rollout 12 s", row_compile_times),
]
ROW_IDS = [r[0] for r in ROWS]
COLUMNS = ["row", "what", "H200 baseline (issue 23)", "mr1 (this run)", "HF peer",
           "vs roofline"]


def _cells(row: dict) -> list[str]:
    if "error" in row:
        ours = f"**failed**: {row['error']}"
    elif "skipped" in row:
        ours = f"skipped: {row['skipped']}"
    else:
        ours = row["mr1"]
    return [row["id"], row["what"], row["baseline"], ours, row.get("hf", "-"),
            row.get("roofline", "-")]


def markdown(meta: dict, rows: list[dict]) -> str:
    v = ", ".join(f"{k} {x}" for k, x in meta["versions"].items())
    lines = [f"device: {meta['device']} ({v}); smoke: {meta['smoke']}; "
             f"{meta['elapsed_s']} s; `{meta['command']}`", "",
             table_header(COLUMNS, "llllll")]
    lines += [table_row(_cells(r)) for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for bench_device.json / .md")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, CI)")
    ap.add_argument("--rows", default="", help=f"comma-separated subset of {ROW_IDS}")
    ap.add_argument("--budget_s", type=float, default=None,
                    help="no row starts after this many seconds (the rest: skipped); default "
                         "330, none with --smoke")
    args = ap.parse_args(argv)
    wanted = [r for r in args.rows.split(",") if r] or ROW_IDS
    unknown = sorted(set(wanted) - set(ROW_IDS))
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {ROW_IDS}")
    budget = args.budget_s if args.budget_s is not None else (float("inf") if args.smoke
                                                              else 330.0)
    run = Run(SMOKE if args.smoke else FULL, pathlib.Path(args.out), args.smoke, budget)
    print(f"device: {run.meta()['device']}\n" + table_header(COLUMNS, "llllll"), flush=True)
    for rid, what, baseline, fn in ROWS:
        if rid not in wanted:
            continue
        row = {"id": rid, "what": what, "baseline": baseline}
        elapsed = time.perf_counter() - run.start
        if elapsed > run.budget_s:
            row["skipped"] = f"time budget ({elapsed:.0f} s > {run.budget_s:.0f} s)"
        else:
            t = time.perf_counter()
            try:
                row.update(fn(run))
            except Exception as e:  # noqa: BLE001 - one failed row must not end the run
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            row["row_s"] = round(time.perf_counter() - t, 1)
            _free(clear_compiled=not run.smoke)
        run.record(row)
    print(f"\nwrote {run.out / 'bench_device.json'} and {run.out / 'bench_device.md'} "
          f"({time.perf_counter() - run.start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
