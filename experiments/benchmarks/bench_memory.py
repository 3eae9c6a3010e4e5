"""Memory bank throughput: jitted + vmapped JAX banks vs a straightforward numpy/Python loop.

Workload (defaults): 64 banks x 1024 slots, memories of L=64 tokens, D=384 embeddings, banks
half full at the start, ``evict_lru`` policy. Ops: per bank a sequence of N random ops
(40% ADD, 25% UPDATE, 20% DELETE, 15% NOOP; UPDATE/DELETE targets uniform over the slots, so
about half are refused); both sides apply the same sequences and must end with the same banks.
Retrieval: Q queries per bank, top-k by cosine over valid slots; both sides must agree.

The reference applies ops with a Python loop over banks and ops (numpy per op) and retrieves
with a Python loop over banks and queries (numpy matvec + argpartition per query). A second
retrieval reference batches each bank's queries into one matmul (what a careful numpy user
would write). Timings are medians over repeats, with ``block_until_ready``.

  python experiments/benchmarks/bench_memory.py [--banks 64 --slots 1024 --ops 256 ...]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from common import timed

from mr1.memory import bank as mb

PEAK_GFLOPS = 170.0  # measured float32 matmul peak of the 2-core dev machine (DESIGN.md §5)


# ----------------------------------------------------------------------------- numpy reference

class NumpyBanks:
    """B banks as numpy arrays, ops and retrieval written the straightforward way."""

    def __init__(self, b, s, L, d, pad_id=0):
        self.tokens = np.full((b, s, L), pad_id, np.int32)
        self.lengths = np.zeros((b, s), np.int32)
        self.valid = np.zeros((b, s), bool)
        self.emb = np.zeros((b, s, d), np.float32)
        self.speaker = np.full((b, s), -1, np.int32)
        self.created = np.full((b, s), -1, np.int32)
        self.updated = np.full((b, s), -1, np.int32)
        self.step = np.zeros((b,), np.int32)
        self.pad_id = pad_id

    def apply(self, b, op, target, tokens, length, embedding, speaker):
        """One op on bank ``b`` with the semantics of mr1.memory.bank (evict_lru policy)."""
        valid, step, S = self.valid[b], int(self.step[b]), self.valid.shape[1]
        self.step[b] += 1
        if op in (1, 2) and length <= 0:
            return
        if op == 1:
            free = np.flatnonzero(~valid)
            slot = free[0] if free.size else int(np.argmin(self.updated[b]))
            self.speaker[b, slot], self.created[b, slot] = speaker, step
        elif op in (2, 3):
            if not (0 <= target < S and valid[target]):
                return
            slot = target
        else:
            return
        if op == 3:
            self.tokens[b, slot] = self.pad_id
            self.lengths[b, slot] = 0
            self.valid[b, slot] = False
            self.emb[b, slot] = 0
            self.speaker[b, slot] = self.created[b, slot] = self.updated[b, slot] = -1
            return
        n = min(length, self.tokens.shape[2])
        self.tokens[b, slot] = self.pad_id
        self.tokens[b, slot, :n] = tokens[:n]
        self.lengths[b, slot] = n
        self.valid[b, slot] = True
        self.emb[b, slot] = embedding / max(np.linalg.norm(embedding), 1e-12)
        self.updated[b, slot] = step

    def retrieve(self, b, query, k):
        q = query / max(np.linalg.norm(query), 1e-12)
        scores = np.where(self.valid[b], self.emb[b] @ q, -np.inf)
        top = np.argpartition(-scores, k)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return top, scores[top]

    def retrieve_batched(self, b, queries, k):
        q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        scores = np.where(self.valid[b][None], q @ self.emb[b].T, -np.inf)
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
        return np.take_along_axis(top, order, 1)


# ----------------------------------------------------------------------------- workload

def make_ops(rng, b, n, s, L, d):
    return dict(op=rng.choice(4, size=(b, n), p=[0.15, 0.40, 0.25, 0.20]).astype(np.int32),
                target=rng.integers(0, s, (b, n)).astype(np.int32),
                tokens=rng.integers(1, 32000, (b, n, L)).astype(np.int32),
                length=rng.integers(1, L + 1, (b, n)).astype(np.int32),
                embedding=rng.normal(size=(b, n, d)).astype(np.float32),
                speaker=rng.integers(0, 2, (b, n)).astype(np.int32))




def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--banks", type=int, default=64)
    ap.add_argument("--slots", type=int, default=1024)
    ap.add_argument("--max_len", type=int, default=64)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--ops", type=int, default=256, help="ops per bank per timed call")
    ap.add_argument("--queries", type=int, default=64, help="queries per bank per timed call")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    B, S, L, D, N, Q, K = a.banks, a.slots, a.max_len, a.dim, a.ops, a.queries, a.k
    rng = np.random.default_rng(a.seed)

    # Start half full, identically on both sides.
    ref = NumpyBanks(B, S, L, D)
    banks = jax.vmap(lambda _: mb.empty_bank(S, L, D, full_policy="evict_lru"))(jnp.arange(B))
    fill = make_ops(rng, B, S // 2, S, L, D)
    fill["op"][:] = mb.OpCode.ADD
    apply_jax = jax.jit(mb.apply_actions_batched, donate_argnums=0)
    banks, _ = apply_jax(banks, mb.MemoryAction(**fill))
    for b in range(B):
        for t in range(S // 2):
            ref.apply(b, *(fill[f][b, t] for f in fill))

    # ---- ops: one warm-up call (compiles), then timed repeats with fresh op sequences.
    op_batches = [make_ops(rng, B, N, S, L, D) for _ in range(a.repeats + 1)]
    dev_batches = [jax.device_put(mb.MemoryAction(**o)) for o in op_batches]
    state = {"banks": banks}

    def jax_ops(i):
        state["banks"], res = apply_jax(state["banks"], dev_batches[i])
        jax.block_until_ready(state["banks"])
        return res

    def numpy_ops(i):
        o = op_batches[i]
        for b in range(B):
            for t in range(N):
                ref.apply(b, o["op"][b, t], o["target"][b, t], o["tokens"][b, t],
                          o["length"][b, t], o["embedding"][b, t], o["speaker"][b, t])

    jax_ops(0)
    numpy_ops(0)
    it = iter(range(1, a.repeats + 1))
    t_jax_ops = timed(lambda: jax_ops(next(it)), a.repeats)
    it = iter(range(1, a.repeats + 1))
    t_np_ops = timed(lambda: numpy_ops(next(it)), a.repeats)
    banks = state["banks"]
    same = all(np.array_equal(np.asarray(getattr(banks, f)), getattr(ref, g))
               for f, g in [("tokens", "tokens"), ("lengths", "lengths"), ("valid", "valid"),
                            ("speaker", "speaker"), ("created", "created"),
                            ("updated", "updated")])
    same &= np.allclose(np.asarray(banks.embeddings), ref.emb, atol=1e-6)
    assert same, "JAX and numpy banks diverged"
    fill_frac = float(np.mean(ref.valid))

    # ---- retrieval
    queries = rng.normal(size=(B, Q, D)).astype(np.float32)
    q_dev = jax.device_put(queries)
    retrieve_jax = jax.jit(jax.vmap(lambda bk, q: mb.retrieve_many(bk, q, K)))
    out = jax.block_until_ready(retrieve_jax(banks, q_dev))
    t_jax_ret = timed(lambda: jax.block_until_ready(retrieve_jax(banks, q_dev)), a.repeats)

    def numpy_retrieve():
        return [[ref.retrieve(b, queries[b, j], K)[0] for j in range(Q)] for b in range(B)]

    def numpy_retrieve_batched():
        return [ref.retrieve_batched(b, queries[b], K) for b in range(B)]

    got = np.asarray(out.indices)
    want = np.array(numpy_retrieve())
    # Agreement up to float near-ties: compare the reference scores of the returned slots.
    agree = np.mean([np.allclose(np.sort(np.where(ref.valid[b], ref.emb[b] @ (
        queries[b, j] / np.linalg.norm(queries[b, j])), -np.inf)[got[b, j]]),
        np.sort(np.where(ref.valid[b], ref.emb[b] @ (queries[b, j] / np.linalg.norm(
            queries[b, j])), -np.inf)[want[b, j]]), atol=1e-5)
        for b in range(B) for j in range(Q)])
    assert agree == 1.0, f"retrieval disagrees on {1 - agree:.1%} of queries"
    t_np_ret = timed(numpy_retrieve, max(1, a.repeats // 2))
    t_np_ret_b = timed(numpy_retrieve_batched, a.repeats)

    n_ops, n_q = B * N, B * Q
    gflop = 2.0 * B * Q * S * D / 1e9
    rows = [
        ("memory ops (ADD/UPDATE/DELETE/NOOP)", "ops/s", n_ops / t_np_ops, n_ops / t_jax_ops),
        ("retrieval top-k (numpy: loop over queries)", "queries/s", n_q / t_np_ret,
         n_q / t_jax_ret),
        ("retrieval top-k (numpy: one matmul per bank)", "queries/s", n_q / t_np_ret_b,
         n_q / t_jax_ret),
    ]
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} | {B} banks x {S} "
          f"slots, L={L}, D={D}, {N} ops/bank/call, {Q} queries/bank/call, k={K}, evict_lru, "
          f"bank fill {fill_frac:.0%} | median of {a.repeats} | results identical: yes")
    print()
    print("| workload | unit | numpy/Python | JAX jit+vmap | speedup |")
    print("|---|---|---:|---:|---:|")
    for name, unit, ref_rate, jax_rate in rows:
        print(f"| {name} | {unit} | {ref_rate:,.0f} | {jax_rate:,.0f} | "
              f"{jax_rate / ref_rate:.1f}x |")
    print()
    print(f"JAX retrieval: {gflop / t_jax_ret:.1f} GFLOP/s on the score matmul "
          f"({gflop / t_jax_ret / PEAK_GFLOPS:.0%} of the {PEAK_GFLOPS:.0f} GFLOP/s matmul peak); "
          f"JAX ops: {t_jax_ops / N * 1e6:.1f} us per step of {B} banks.")


if __name__ == "__main__":
    main()
