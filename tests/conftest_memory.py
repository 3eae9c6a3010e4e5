"""Test helpers for mr1.memory: a plain-Python reference bank, op generators, comparisons.

Also the body of the sharded check (:func:`sharded_main`), which ``tests/test_memory_bank.py``
runs in a subprocess with 8 fake CPU devices (``XLA_FLAGS`` must be set before jax loads).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

# Small sizes keep hypothesis fast; one compiled function per (shape, policy) is reused.
S, L, D = 8, 4, 4
NUM_OPS = 5  # NOOP ADD UPDATE DELETE + one unknown code
PAD = 0


@dataclasses.dataclass
class RefSlot:
    tokens: list[int]
    embedding: np.ndarray
    speaker: int
    created: int
    updated: int


class RefBank:
    """The bank semantics of mr1.memory.bank, written as obviously as possible."""

    def __init__(self, num_slots=S, max_len=L, dim=D, policy="refuse", pad_id=PAD):
        self.num_slots, self.max_len, self.dim = num_slots, max_len, dim
        self.policy, self.pad_id = policy, pad_id
        self.slots: list[RefSlot | None] = [None] * num_slots
        self.step = 0

    def apply(self, op, target, tokens, length, embedding, speaker) -> dict:
        """Applies one op; returns the OpResult fields as Python values."""
        out = dict(applied=False, refused=False, reason=0, slot=-1, evicted=-1)
        free = [i for i, s in enumerate(self.slots) if s is None]
        target_ok = 0 <= target < self.num_slots and self.slots[target] is not None
        reason = 0
        if op not in (0, 1, 2, 3):
            reason = 4
        elif op in (1, 2) and length <= 0:
            reason = 3
        elif op == 1 and not free and self.policy == "refuse":
            reason = 1
        elif op in (2, 3) and not target_ok:
            reason = 2
        if reason:
            out.update(refused=True, reason=reason)
        elif op != 0:
            n = min(length, self.max_len)
            toks = [int(t) for t in tokens[:n]]
            emb = np.asarray(embedding, np.float32)
            emb = emb / max(float(np.sqrt(np.sum(emb * emb))), 1e-12)
            if op == 1:
                if free:
                    slot = free[0]
                else:
                    field = {"evict_lru": "updated", "evict_oldest": "created",
                             "evict_fifo": "created"}[self.policy]
                    keys = [getattr(s, field) for s in self.slots]
                    slot = keys.index(min(keys))
                    out["evicted"] = slot
                self.slots[slot] = RefSlot(toks, emb, int(speaker), self.step, self.step)
            elif op == 2:
                slot = target
                old = self.slots[slot]
                self.slots[slot] = RefSlot(toks, emb, old.speaker, old.created, self.step)
            else:
                slot = target
                self.slots[slot] = None
            out.update(applied=True, slot=slot)
        self.step += 1
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """The bank as the arrays of MemoryBank."""
        s, ln, d = self.num_slots, self.max_len, self.dim
        a = dict(tokens=np.full((s, ln), self.pad_id, np.int32), lengths=np.zeros(s, np.int32),
                 valid=np.zeros(s, bool), embeddings=np.zeros((s, d), np.float32),
                 speaker=np.full(s, -1, np.int32), created=np.full(s, -1, np.int32),
                 updated=np.full(s, -1, np.int32), step=np.int32(self.step))
        for i, sl in enumerate(self.slots):
            if sl is None:
                continue
            a["tokens"][i, : len(sl.tokens)] = sl.tokens
            a["lengths"][i] = len(sl.tokens)
            a["valid"][i] = True
            a["embeddings"][i] = sl.embedding
            a["speaker"][i], a["created"][i], a["updated"][i] = sl.speaker, sl.created, sl.updated
        return a

    def scores(self, query, speaker=None) -> np.ndarray:
        """Cosine of every slot with ``query``; -inf for ineligible slots."""
        q = np.asarray(query, np.float32)
        q = q / max(float(np.sqrt(np.sum(q * q))), 1e-12)
        out = np.full(self.num_slots, -np.inf, np.float32)
        for i, sl in enumerate(self.slots):
            if sl is not None and (speaker is None or sl.speaker == speaker):
                out[i] = float(sl.embedding @ q)
        return out


# ----------------------------------------------------------------------------- op generation

def op_arrays(op, target, length, seed, speaker, max_len=L, dim=D):
    """Deterministic tokens/embedding for a generated op (keeps hypothesis draws small).

    Embeddings are small integers, so exact score ties (and zero vectors) occur often.
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 50, size=max_len).astype(np.int32)
    emb = rng.integers(-2, 3, size=dim).astype(np.float32)
    return dict(op=op, target=target, tokens=tokens, length=length, embedding=emb,
                speaker=speaker)


def random_ops(rng: np.random.Generator, n: int, num_slots=S, max_len=L, dim=D) -> list[dict]:
    """``n`` random ops (ADD-heavy so banks fill up and the full policy matters)."""
    ops = []
    for _ in range(n):
        op = int(rng.choice(NUM_OPS, p=[0.1, 0.4, 0.22, 0.22, 0.06]))
        ops.append(op_arrays(op, int(rng.integers(-1, num_slots + 1)),
                             int(rng.integers(0, max_len + 2)), int(rng.integers(1 << 30)),
                             int(rng.integers(0, 2)), max_len, dim))
    return ops


def stack_ops(ops: list[dict], n: int, max_len=L, dim=D) -> dict[str, np.ndarray]:
    """Stacks op dicts into MemoryAction arrays ``[n, ...]``, padding with NOOPs."""
    noop = dict(op=0, target=-1, tokens=np.zeros(max_len, np.int32), length=0,
                embedding=np.zeros(dim, np.float32), speaker=0)
    ops = list(ops) + [noop] * (n - len(ops))
    return dict(op=np.array([o["op"] for o in ops], np.int32),
                target=np.array([o["target"] for o in ops], np.int32),
                tokens=np.stack([o["tokens"] for o in ops]).astype(np.int32),
                length=np.array([o["length"] for o in ops], np.int32),
                embedding=np.stack([o["embedding"] for o in ops]).astype(np.float32),
                speaker=np.array([o["speaker"] for o in ops], np.int32))


# ----------------------------------------------------------------------------- comparisons

def assert_bank_equal(got: dict, ref: RefBank, where=""):
    """``got``: MemoryBank fields as numpy arrays. Embeddings to 1e-6, everything else exact."""
    want = ref.arrays()
    for name, w in want.items():
        g = np.asarray(got[name])
        if name == "embeddings":
            if g.shape != w.shape or np.abs(g - w).max(initial=0) > 1e-6:
                np.testing.assert_allclose(g, w, atol=1e-6, err_msg=f"{where} {name}")
        elif not np.array_equal(g, w):
            np.testing.assert_array_equal(g, w, err_msg=f"{where} {name}")


def assert_result_equal(got: dict, want: dict, where=""):
    for name, w in want.items():
        assert int(np.asarray(got[name])) == int(w), f"{where} result.{name}: {got[name]} != {w}"


def assert_retrieval_ok(indices, scores, mask, ref_scores: np.ndarray, k: int, where=""):
    """Checks a top-k answer against reference scores, up to ties (atol 1e-5).

    Exactly min(k, #eligible) entries are real; they are distinct eligible slots, best first,
    and the score at rank r equals the r-th best reference score.
    """
    indices, scores, mask = map(np.asarray, (indices, scores, mask))
    eligible = np.flatnonzero(np.isfinite(ref_scores))
    n = min(k, eligible.size)
    assert mask.tolist() == [True] * n + [False] * (k - n), f"{where} mask {mask} (n={n})"
    assert (indices[n:] == -1).all() and (scores[n:] == 0).all(), where
    real = indices[:n]
    assert len(set(real.tolist())) == n and np.isin(real, eligible).all(), f"{where} {real}"
    best = np.sort(ref_scores[eligible])[::-1][:n]
    np.testing.assert_allclose(ref_scores[real], best, atol=1e-5, err_msg=where)
    np.testing.assert_allclose(scores[:n], ref_scores[real], atol=1e-5, err_msg=where)


def array_fields(tree) -> list[str]:
    """Names of the pytree (array) fields of a flax struct dataclass."""
    return [f.name for f in dataclasses.fields(tree) if f.metadata.get("pytree_node", True)]


def to_numpy(tree) -> dict:
    """A flax struct dataclass of arrays -> dict of numpy arrays (static fields left out)."""
    import jax
    return {n: np.asarray(jax.device_get(getattr(tree, n))) for n in array_fields(tree)}


# ----------------------------------------------------------------------------- traced runs

def make_trace_fn(k: int):
    """jit(vmap(trace)): per bank, apply ops in order and record, after every step, the bank,
    the op result and the retrievals (any speaker, speaker 0) for that step's query."""
    import jax
    from mr1.memory import bank as mb

    def trace(bank, actions, queries):
        def body(b, xs):
            a, q = xs
            b, r = mb.apply_action(b, a)
            return b, (b, r, mb.retrieve(b, q, k), mb.retrieve(b, q, k, speaker=0))
        return jax.lax.scan(body, bank, (actions, queries))

    return jax.vmap(trace)


def check_traces(seqs: list[list[dict]], queries: np.ndarray, out, policy: str, k: int):
    """Replays ``seqs`` on reference banks and compares with the traced outputs.

    ``out`` = (final_banks, (banks[B,T], results[B,T], retrieved[B,T], retrieved_spk0[B,T])).
    Returns the number of steps compared.
    """
    import jax
    _, (hist, res, ret, ret0) = jax.device_get(out)
    steps = 0
    for b, seq in enumerate(seqs):
        ref = RefBank(policy=policy)
        for t, o in enumerate(seq):
            where = f"bank {b} step {t} op {o['op']} tgt {o['target']} len {o['length']}"
            want = ref.apply(**o)
            assert_result_equal({n: getattr(res, n)[b, t] for n in want}, want, where)
            assert_bank_equal({n: getattr(hist, n)[b, t] for n in array_fields(hist)}, ref,
                              where)
            q = queries[b, t]
            assert_retrieval_ok(ret.indices[b, t], ret.scores[b, t], ret.mask[b, t],
                                ref.scores(q), k, where + " retrieve")
            assert_retrieval_ok(ret0.indices[b, t], ret0.scores[b, t], ret0.mask[b, t],
                                ref.scores(q, speaker=0), k, where + " retrieve spk0")
            steps += 1
    return steps


def sharded_main(num_banks=64, rounds=8, steps=24, k=3, seed=0):
    """Runs in a subprocess with 8 CPU devices: banks sharded over a ("data",) mesh.

    Prints one JSON line with what was checked.
    """
    assert "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from mr1.memory import bank as mb

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    shard = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(seed)
    summary = {"devices": len(devices), "sequences": 0, "steps": 0}
    for policy in ("refuse", "evict_lru"):
        fn = jax.jit(make_trace_fn(k), in_shardings=shard, out_shardings=shard)
        batched = jax.jit(mb.apply_actions_batched, in_shardings=shard, out_shardings=shard)
        for _ in range(rounds // 2):
            seqs = [random_ops(rng, int(rng.integers(1, steps + 1))) for _ in range(num_banks)]
            acts = [stack_ops(s, steps) for s in seqs]
            acts = mb.MemoryAction(**{n: np.stack([a[n] for a in acts]) for n in acts[0]})
            queries = rng.integers(-2, 3, size=(num_banks, steps, D)).astype(np.float32)
            banks = jax.vmap(lambda _: mb.empty_bank(S, L, D, full_policy=policy))(
                jnp.arange(num_banks))
            banks, acts_s, q_s = jax.device_put((banks, acts, queries), shard)
            out = fn(banks, acts_s, q_s)
            final = out[0]
            assert len(final.tokens.sharding.device_set) == len(devices), final.tokens.sharding
            summary["out_sharding"] = str(final.tokens.sharding.spec)
            summary["steps"] += check_traces(seqs, queries, out, policy, k)
            summary["sequences"] += len(seqs)
            b2, _ = batched(banks, acts_s)
            for n in array_fields(final):
                np.testing.assert_array_equal(np.asarray(getattr(b2, n)),
                                              np.asarray(getattr(final, n)))
    print(json.dumps(summary))


if __name__ == "__main__":
    sharded_main(*map(int, sys.argv[1:]))
