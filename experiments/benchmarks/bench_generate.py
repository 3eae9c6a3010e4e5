"""Generation throughput: mr1's jitted sampler beside HF transformers ``generate``, one run.

    python experiments/benchmarks/bench_generate.py                # batches 1, 8, 32
    python experiments/benchmarks/bench_generate.py --batches=1,8 --hf_repeats=1

Same model (the embedded SmolLM2-135M-Instruct GGUF, float32 on both sides), same ≈560-token
chat prompts (LoCoMo dialogue when the data is found, else synthetic text), 32 new tokens
sampled at temperature 1.0 with EOS ignored so every row makes exactly 32 tokens. Batch sizes
of distinct prompts, plus GRPO rollout shapes (``--groups=4x8``: 4 prompts x 8 samples; HF with
``num_return_sequences``). Printed per shape (medians over repeats):

* end-to-end new tokens/s (prefill included, what a caller waits for);
* prefill tokens/s (timed as a 1-new-token call; a group's prompt counts once);
* decode-only new tokens/s = B * 31 / (t_32 - t_1);
* MFU of the end-to-end call against the float32 matmul peak measured here (2048² matmul).

The HF reference needs ``torch`` (test-only; never an mr1 dependency); without it only mr1 runs.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from common import (
    generation_flops,
    machine_line,
    matmul_peak_gflops,
    table_header,
    table_row,
    timed,
)

from mr1 import assets
from mr1.models import load_policy
from mr1.sampling import encode_prompts, generate

NEW_TOKENS = 32


def build_prompts(policy, n: int, target_tokens: int) -> list[list[int]]:
    """``n`` chat prompts of about ``target_tokens`` tokens from LoCoMo dialogue (or filler)."""
    try:
        from mr1.data.locomo import load_locomo

        turns = [f"{t.speaker}: {t.text}" for c in load_locomo() for t in c.turns]
    except Exception:  # noqa: BLE001 - data is optional for a benchmark
        rng = np.random.default_rng(0)
        words = ["memory", "agent", "answer", "question", "session", "friend", "painting",
                 "city", "dog", "trip"]
        turns = [" ".join(rng.choice(words, 12)) + "." for _ in range(5000)]
    prompts, start = [], 0
    for i in range(n):
        lines, k = [], start
        while True:
            lines.append(turns[k % len(turns)])
            k += 1
            text = ("Here is part of a conversation:\n" + "\n".join(lines)
                    + "\nSummarise what the speakers talked about.")
            ids = encode_prompts(policy, [text])[0]
            if len(ids) >= target_tokens:
                break
        prompts.append(ids[-target_tokens:] if len(ids) > target_tokens else ids)
        start = k + 7 * i
    return prompts


def bench_mr1(policy, prompts, repeats, samples=1, new_tokens=NEW_TOKENS):
    """Median seconds of a 1-new-token and a ``new_tokens`` call (both compiled first)."""
    run = lambda new: generate(policy, prompts, max_new_tokens=new, temperature=1.0,
                               seed=0, ignore_eos=True, num_samples=samples, chat=False)
    run(1), run(new_tokens)  # compile both shapes
    return timed(lambda: run(1), repeats), timed(lambda: run(new_tokens), repeats)


def load_hf():
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    gguf = assets.smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    return model.eval()


def bench_hf(model, prompts, pad_id, repeats, samples=1, new_tokens=NEW_TOKENS):
    """Median seconds of HF ``generate`` for 1 and ``new_tokens`` new tokens (the model's
    device; CUDA is synchronised before each timer stops)."""
    import torch

    from mr1.sampling import left_pad

    ids, mask = left_pad(prompts, pad_id)
    device = next(model.parameters()).device
    ids = torch.tensor(ids, dtype=torch.long, device=device)
    mask = torch.tensor(mask, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(new):
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                           top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                           pad_token_id=pad_id, num_return_sequences=samples)
        sync()

    with torch.inference_mode():  # warm-up: torch's first call pays one-off initialisation
        model.generate(input_ids=ids[:1], attention_mask=mask[:1], do_sample=True,
                       max_new_tokens=2, pad_token_id=pad_id)
    return timed(lambda: run(1), repeats), timed(lambda: run(new_tokens), repeats)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--groups", default="4x8",
                    help="PROMPTSxSAMPLES rollout shapes (G samples share one prompt), '' for none")
    ap.add_argument("--prompt_tokens", type=int, default=560)
    ap.add_argument("--repeats", type=int, default=3, help="mr1 repeats per measurement")
    ap.add_argument("--hf_repeats", type=int, default=1, help="HF repeats (slow)")
    ap.add_argument("--no_hf", action="store_true")
    args = ap.parse_args()

    peak = matmul_peak_gflops()
    policy = load_policy("smollm2-135m-instruct")
    cfg = policy.config
    batches = [int(b) for b in args.batches.split(",")]
    all_prompts = build_prompts(policy, max(batches), args.prompt_tokens)
    hf = None
    if not args.no_hf:
        try:
            hf = load_hf()
        except ImportError as e:
            print(f"(HF reference skipped: {e})")

    print("\n" + machine_line(peak))
    print(f"model: {cfg.name} ({cfg.num_params / 1e6:.0f}M params, float32); prompts "
          f"{args.prompt_tokens} tokens, {NEW_TOKENS} new tokens sampled at T=1.0, EOS ignored\n")
    print(table_header(["impl", "batch", "end-to-end new tok/s", "decode-only new tok/s",
                        "prefill tok/s", "end-to-end s", "MFU", "speed-up vs HF (e2e / decode)"],
                       "lrrrrrrr"))
    shapes = [(b, 1) for b in batches]
    shapes += [tuple(int(x) for x in g.split("x")) for g in args.groups.split(",") if g]
    for p, g in shapes:
        prompts = all_prompts[:p]
        b = p * g
        plen = max(map(len, prompts))
        flops = generation_flops(cfg, b, plen, NEW_TOKENS) - (b - p) * generation_flops(
            cfg, 1, plen, 1)  # a group's prompt is prefilled once
        rows = {"mr1 (jax)": bench_mr1(policy, prompts, args.repeats, g)}
        if hf is not None:
            rows["HF transformers (torch)"] = bench_hf(hf, prompts, policy.pad_token_id,
                                                      args.hf_repeats, g)
        ref = rows.get("HF transformers (torch)")
        label = f"{b}" if g == 1 else f"{b} ({p} prompts x {g})"
        for name, (t1, t32) in rows.items():
            e2e = b * NEW_TOKENS / t32
            dec = b * (NEW_TOKENS - 1) / max(t32 - t1, 1e-9)
            mfu = flops / t32 / (peak * 1e9)
            speed = "-"
            if ref is not None and name.startswith("mr1"):
                ref_e2e = b * NEW_TOKENS / ref[1]
                ref_dec = b * (NEW_TOKENS - 1) / max(ref[1] - ref[0], 1e-9)
                speed = f"{e2e / ref_e2e:.1f}x / {dec / ref_dec:.1f}x"
            print(table_row([name, label, f"{e2e:.1f}", f"{dec:.1f}", f"{p * plen / t1:.0f}",
                             f"{t32:.2f}", f"{100 * mfu:.0f}%", speed]), flush=True)


if __name__ == "__main__":
    main()
