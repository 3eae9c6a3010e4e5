"""``mr1.Memory`` latency: ``add`` per message (add_all and the embedded LLM manager) and
``search`` at 10k memories of one user; medians printed.

Every call is the API as a user sees it, real all-MiniLM embedder included, each ``add`` one
SQLite transaction (WAL, ``synchronous=FULL``: a commit is fsynced).

* ``add_all``: ``--adds`` single-message adds into an empty store (after ``--warmup``), and
  again into the 10k-memory store;
* ``prompted``: ``--llm_adds`` single-message adds with the embedded SmolLM2-135M-Instruct as
  the Memory Manager (fact extraction, up to 64 new tokens, then one ``json_op`` op word per
  fact, greedy);
* ``search``: the store is filled with ``--memories`` memories of one user (adds of 100
  messages each), then ``--searches`` queries with ``limit=5``; the query embedding and the
  bank retrieval are timed apart too, and the first search of a fresh ``Memory`` on the store
  (which rebuilds the user's bank view from SQLite) is reported on its own.

  python experiments/benchmarks/bench_memory_api.py [--adds 50 --llm_adds 4 --memories 10000]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from mr1 import Memory
from mr1.memory.embedder import load_embedder

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey").split()


def sentence(rng: np.random.Generator) -> str:
    return f"The user mentioned {' '.join(rng.choice(WORDS, 8))} on day {rng.integers(1000)}."


def median_ms(times) -> str:
    return f"{1000 * statistics.median(times):.1f} ms"


def time_adds(m: Memory, n: int, rng, user: str = "u", events=None) -> list[float]:
    """Seconds of ``n`` single-message adds; their events are counted into ``events``."""
    out = []
    for _ in range(n):
        text = sentence(rng)
        t = time.perf_counter()
        got = m.add(text, user_id=user)
        out.append(time.perf_counter() - t)
        if events is not None:
            events.update(e["event"] + (f"({e['refused']})" if "refused" in e else "")
                          for e in got)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adds", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--llm_adds", type=int, default=4)
    ap.add_argument("--memories", type=int, default=10_000)
    ap.add_argument("--searches", type=int, default=50)
    ap.add_argument("--dir", default="")
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="bench_memory_api_")
    rng = np.random.default_rng(0)
    emb = load_embedder()
    print(f"store root {root}; {jax.devices()[0].platform} x{len(jax.devices())}")

    # -- add, add_all, empty store
    m = Memory.open(f"{root}/add_all", embedder=emb)
    time_adds(m, args.warmup, rng)
    t = time_adds(m, args.adds, rng)
    print(f"add (add_all, store of <={args.warmup + args.adds}): median {median_ms(t)} per "
          f"message over {len(t)}")

    # -- add, embedded LLM manager
    if args.llm_adds > 0:
        llm = Memory.open(f"{root}/prompted", manager="prompted", embedder=emb)
        time_adds(llm, 1, rng)   # compiles
        events = collections.Counter()
        t = time_adds(llm, args.llm_adds, rng, events=events)
        print(f"add (prompted SmolLM2-135M manager, json_op): median {median_ms(t)} per "
              f"message over {len(t)}; events {dict(events)}, "
              f"{len(llm.get_all('u'))} memories kept")

    if args.memories <= 0:
        return
    # -- search at N memories of one user
    capacity = 1 << int(np.ceil(np.log2(max(args.memories + args.adds + args.warmup, 2))))
    big = Memory.open(f"{root}/search", capacity=capacity, embedder=emb)
    t0 = time.perf_counter()
    for start in range(0, args.memories, 100):
        big.add([{"role": "user", "content": sentence(rng)}
                 for _ in range(min(100, args.memories - start))], user_id="u")
    fill = time.perf_counter() - t0
    print(f"filled {args.memories} memories in {fill:.1f} s "
          f"({1000 * fill / args.memories:.2f} ms per message in adds of 100); "
          f"capacity {capacity}")
    queries = [sentence(rng) for _ in range(args.searches + 3)]
    for q in queries[:3]:
        big.search(q, user_id="u")
    t = []
    for q in queries[3:]:
        s = time.perf_counter()
        hits = big.search(q, user_id="u", limit=5)
        t.append(time.perf_counter() - s)
    assert len(hits) == 5
    print(f"search (limit 5) at {args.memories} memories: median {median_ms(t)} over {len(t)}")
    enc = []
    for q in queries[3:]:
        s = time.perf_counter()
        emb.encode([q])
        enc.append(time.perf_counter() - s)
    view = big._reading("u")
    from mr1.memory.api import _retrieve
    qv = jnp.asarray(emb.encode([queries[0]]))
    jax.block_until_ready(_retrieve(view.mem.bank, qv, 5))
    ret = []
    for _ in range(args.searches):
        s = time.perf_counter()
        jax.block_until_ready(_retrieve(view.mem.bank, qv, 5))
        ret.append(time.perf_counter() - s)
    print(f"  of which: query embedding median {median_ms(enc)}, bank retrieval "
          f"({capacity} slots x {view.mem.bank.dim}) median {median_ms(ret)}")
    t = time_adds(big, args.adds, rng)
    print(f"add (add_all) at {args.memories} memories: median {median_ms(t)} per message")
    fresh = Memory.open(f"{root}/search", embedder=emb)
    s = time.perf_counter()
    fresh.search(queries[3], user_id="u")
    print(f"first search of a fresh Memory (rebuilds the {args.memories + args.adds}-memory "
          f"bank view from SQLite): {1000 * (time.perf_counter() - s):.0f} ms")
    if not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
