"""Shared-prefix generation (the full-context baseline's shape): many questions after one long
conversation context, with and without ``share_prefix``, one run.

    python experiments/benchmarks/bench_prefix.py                       # 2,048-token context
    python experiments/benchmarks/bench_prefix.py --context_tokens=7600 --questions=4

Same model (the embedded SmolLM2-135M-Instruct GGUF, float32), the full-context prompt of
``mr1.agents.answer.full_context_prompts`` on the first LoCoMo test conversation (its newest
turns up to ``--context_tokens``), its first ``--questions`` questions in one batch, 32 greedy
new tokens. Printed (medians over ``--repeats``):

* ``plain``: every row prefills its whole prompt;
* ``shared, first call``: the prefix is prefilled once for the batch (cache cleared before);
* ``shared, cached``: the prefix's keys/values are reused from the previous call (the next
  batch of the same conversation);

and whether the shared completions equal the plain ones (tokens, max |logprob difference|).
"""

from __future__ import annotations

import argparse

import numpy as np
from common import machine_line, matmul_peak_gflops, table_header, table_row, timed

from mr1 import sampling
from mr1.models import load_policy
from mr1.sampling import encode_prompts, generate, shared_prefix_length

NEW_TOKENS = 32


def build_prompts(policy, context_tokens: int, questions: int) -> list[str]:
    from mr1.agents.answer import full_context_prompts
    from mr1.data.locomo import load_locomo, split_locomo

    conv = split_locomo(load_locomo()).test[0]
    qs = [qa.question for qa in conv.qas[:questions]]
    count = lambda s: len(policy.tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    return full_context_prompts(conv, qs, count, context_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context_tokens", type=int, default=2048)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    peak = matmul_peak_gflops()
    print(machine_line(peak))
    policy = load_policy("smollm2-135m-instruct")
    prompts = build_prompts(policy, args.context_tokens, args.questions)
    ids = encode_prompts(policy, prompts)
    shared = shared_prefix_length(ids)
    print(f"{len(prompts)} prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens, "
          f"shared prefix {shared} tokens, {NEW_TOKENS} greedy new tokens")

    def run(share: bool, clear: bool = False):
        if clear:
            sampling._PREFIX_CACHE.clear()
        return generate(policy, prompts, max_new_tokens=NEW_TOKENS, share_prefix=share,
                        ignore_eos=True)

    plain = run(False)          # compile
    first = run(True, True)     # compile
    rows = [("plain", timed(lambda: run(False), args.repeats)),
            ("shared, first call", timed(lambda: run(True, True), args.repeats)),
            ("shared, cached", timed(lambda: run(True), args.repeats))]
    print(table_header(["mode", "s / batch (median)", "x plain"], "lrr"))
    for name, secs in rows:
        print(table_row([name, f"{secs:.2f}", f"{rows[0][1] / secs:.1f}"]))
    diff = float(np.abs(first.logprobs - plain.logprobs).max())
    print(f"shared == plain tokens: {np.array_equal(first.tokens, plain.tokens)}; "
          f"max |logprob difference| {diff:.2e}")


if __name__ == "__main__":
    main()
