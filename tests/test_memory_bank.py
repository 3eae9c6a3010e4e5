"""mr1.memory.bank against a plain-Python reference: ops, retrieval, render, vmap, sharding, orbax."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mr1.memory import bank as mb
from tests.conftest_memory import (D, L, S, RefBank, array_fields, assert_bank_equal, assert_result_equal,
                                   assert_retrieval_ok, check_traces, make_trace_fn, op_arrays,
                                   stack_ops, to_numpy)

REPO = pathlib.Path(__file__).resolve().parents[1]
POLICIES = ("refuse", "evict_lru", "evict_oldest")

# Compiled once per policy and reused by every example (no per-example recompiles).
APPLY = jax.jit(mb.apply_action)  # one executable per (shapes, full_policy, pad_id)
RETRIEVE = jax.jit(mb.retrieve, static_argnames="k")


def act(bank, policy=None, **kw):
    a = mb.make_action(max_len=L, dim=D, pad_id=bank.pad_id, **kw)
    if policy is not None:
        bank = bank.replace(full_policy=policy)
    return APPLY(bank, a)


# ----------------------------------------------------------------------------- unit behaviour

@pytest.mark.device
def test_add_fills_first_free_slot_then_policy_decides():
    bank = mb.empty_bank(S, L, D)
    for i in range(S):
        bank, r = act(bank, op=mb.OpCode.ADD, tokens=[i + 1], embedding=[1, 0, 0, 0])
        assert int(r.slot) == i and bool(r.applied) and int(r.evicted) == -1
    assert bool(bank.valid.all()) and int(bank.step) == S
    refused_bank, r = act(bank, op=mb.OpCode.ADD, tokens=[9], embedding=[1, 0, 0, 0])
    assert int(r.reason) == mb.Refusal.BANK_FULL and bool(r.refused) and int(r.slot) == -1
    np.testing.assert_array_equal(refused_bank.tokens, bank.tokens)
    # Touch slot 0 so slot 1 becomes the least recently updated.
    bank, _ = act(bank, op=mb.OpCode.UPDATE, target=0, tokens=[7, 7], embedding=[0, 1, 0, 0])
    lru, r = act(bank, "evict_lru", op=mb.OpCode.ADD, tokens=[9], embedding=[1, 0, 0, 0])
    assert int(r.evicted) == 1 and int(r.slot) == 1 and int(lru.tokens[1, 0]) == 9
    oldest, r = act(bank, "evict_oldest", op=mb.OpCode.ADD, tokens=[9], embedding=[1, 0, 0, 0])
    assert int(r.evicted) == 0 and int(oldest.created[0]) == S + 1


@pytest.mark.device
def test_update_keeps_id_delete_clears_and_refusals():
    bank = mb.empty_bank(S, L, D, pad_id=5)
    bank, _ = act(bank, op=mb.OpCode.ADD, tokens=[1, 2, 3], embedding=[3, 4, 0, 0], speaker=1)
    np.testing.assert_allclose(bank.embeddings[0], [0.6, 0.8, 0, 0], atol=1e-7)
    bank, r = act(bank, op=mb.OpCode.UPDATE, target=0, tokens=[8], embedding=[0, 0, 2, 0])
    assert int(r.slot) == 0 and bank.tokens[0].tolist() == [8, 5, 5, 5]
    assert int(bank.speaker[0]) == 1 and int(bank.created[0]) == 0 and int(bank.updated[0]) == 1
    assert int(bank.lengths[0]) == 1
    for kw, reason in [(dict(op=mb.OpCode.UPDATE, target=3, tokens=[1]), mb.Refusal.BAD_TARGET),
                       (dict(op=mb.OpCode.DELETE, target=S), mb.Refusal.BAD_TARGET),
                       (dict(op=mb.OpCode.DELETE, target=-1), mb.Refusal.BAD_TARGET),
                       (dict(op=mb.OpCode.ADD, tokens=[]), mb.Refusal.EMPTY_TEXT),
                       (dict(op=mb.OpCode.UPDATE, target=0, tokens=[]), mb.Refusal.EMPTY_TEXT),
                       (dict(op=9), mb.Refusal.UNKNOWN_OP)]:
        after, r = act(bank, **kw)
        assert int(r.reason) == reason and not bool(r.applied), kw
        for n in array_fields(bank):
            if n != "step":
                np.testing.assert_array_equal(getattr(after, n), getattr(bank, n))
    bank, r = act(bank, op=mb.OpCode.DELETE, target=0)
    assert bool(r.applied) and not bool(bank.valid[0]) and int(bank.lengths[0]) == 0
    assert bank.tokens[0].tolist() == [5] * L and int(bank.speaker[0]) == -1
    assert float(jnp.abs(bank.embeddings[0]).sum()) == 0.0


def test_update_pads_with_pad_id():
    bank = mb.empty_bank(S, L, D, pad_id=7)
    bank, _ = act(bank, op=mb.OpCode.ADD, tokens=[1, 2, 3], embedding=[1, 0, 0, 0])
    bank, _ = mb.apply_action(bank, mb.make_action(mb.OpCode.UPDATE, 0, [4], [1, 0, 0, 0],
                                                   max_len=L, dim=D))
    assert bank.tokens[0].tolist() == [4, 7, 7, 7]


def test_unknown_policy_raises():
    with pytest.raises(KeyError, match="full_policy"):
        mb.empty_bank(S, L, D, full_policy="lifo")


@pytest.mark.device
def test_retrieve_fewer_than_k_speaker_filter_and_k_above_slots():
    bank = mb.empty_bank(S, L, D)
    for emb, spk in [([1, 0, 0, 0], 0), ([0, 1, 0, 0], 1), ([1, 1, 0, 0], 1)]:
        bank, _ = act(bank, op=mb.OpCode.ADD, tokens=[1], embedding=emb, speaker=spk)
    r = RETRIEVE(bank, jnp.array([2.0, 0, 0, 0]), k=S + 3)
    assert r.indices.tolist()[:3] == [0, 2, 1] and r.mask.tolist() == [True] * 3 + [False] * S
    np.testing.assert_allclose(r.scores[:3], [1, 2 ** -0.5, 0], atol=1e-6)
    r1 = RETRIEVE(bank, jnp.array([1.0, 0, 0, 0]), k=2, speaker=1)
    assert r1.indices.tolist() == [2, 1]
    r0 = RETRIEVE(bank, jnp.array([0.0, 1, 0, 0]), k=2, speaker=0)
    assert r0.indices.tolist() == [0, -1] and r0.mask.tolist() == [True, False]


@pytest.mark.device
def test_retrieve_many_equals_vmapped_retrieve():
    rng = np.random.default_rng(5)
    bank = mb.empty_bank(S, L, D)
    for i in range(S - 2):
        bank, _ = act(bank, op=1, tokens=[1], embedding=rng.normal(size=D), speaker=i % 2)
    qs = jnp.asarray(rng.normal(size=(7, D)), jnp.float32)
    spk = jnp.asarray(rng.integers(0, 2, 7), jnp.int32)
    for k, speaker in [(3, None), (S + 1, None), (2, spk)]:
        many = mb.retrieve_many(bank, qs, k, speaker)
        one = jax.vmap(lambda q, s: mb.retrieve(bank, q, k, None if speaker is None else s))(
            qs, spk)
        assert many.indices.shape == (7, k)
        for x, y in zip(jax.tree.leaves(many), jax.tree.leaves(one)):
            np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- stateful property

OPS = st.sampled_from([0, 1, 1, 1, 2, 3, 4])


class BankMachine(RuleBasedStateMachine):
    """Random op sequences on the jitted bank and the reference; identical after every step."""

    policy = "refuse"

    def __init__(self):
        super().__init__()
        self.ref = RefBank(policy=self.policy)
        self.bank = mb.empty_bank(S, L, D, full_policy=self.policy)

    def _apply(self, o):
        want = self.ref.apply(**o)
        self.bank, res = APPLY(self.bank, mb.MemoryAction(
            **{k: jnp.asarray(v) for k, v in o.items()}))
        assert_result_equal(to_numpy(res), want, f"op {o['op']} target {o['target']}")

    @rule(op=OPS, slot=st.integers(-1, S), length=st.integers(0, L + 1),
          seed=st.integers(0, 2 ** 30), speaker=st.integers(0, 1))
    def any_op(self, op, slot, length, seed, speaker):
        self._apply(op_arrays(op, slot, length, seed, speaker))

    @precondition(lambda self: any(s is not None for s in self.ref.slots))
    @rule(data=st.data(), op=st.sampled_from([2, 3]), length=st.integers(0, L),
          seed=st.integers(0, 2 ** 30))
    def op_on_valid_slot(self, data, op, length, seed):
        valid = [i for i, s in enumerate(self.ref.slots) if s is not None]
        self._apply(op_arrays(op, data.draw(st.sampled_from(valid)), length, seed, 0))

    @rule(seed=st.integers(0, 2 ** 30), k=st.sampled_from([1, 3, S + 2]),
          speaker=st.sampled_from([None, 0, 1]))
    def retrieve(self, seed, k, speaker):
        q = np.random.default_rng(seed).integers(-2, 3, size=D).astype(np.float32)
        r = RETRIEVE(self.bank, jnp.asarray(q), k=k, speaker=speaker)
        assert_retrieval_ok(r.indices, r.scores, r.mask, self.ref.scores(q, speaker), k)

    @invariant()
    def same_contents(self):
        assert_bank_equal(to_numpy(self.bank), self.ref)


MACHINE_SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])


class RefuseMachine(BankMachine):
    policy = "refuse"


class LruMachine(BankMachine):
    policy = "evict_lru"


TestStatefulRefuse = RefuseMachine.TestCase
TestStatefulRefuse.settings = MACHINE_SETTINGS
TestStatefulLru = LruMachine.TestCase
TestStatefulLru.settings = MACHINE_SETTINGS


# ----------------------------------------------------------------------------- vmap over banks

B, T, K = 16, 24, 3
TRACE = {p: jax.jit(make_trace_fn(K)) for p in ("refuse", "evict_lru")}
OP_ST = st.builds(op_arrays, OPS, st.integers(-1, S), st.integers(0, L + 1),
                  st.integers(0, 2 ** 30), st.integers(0, 1))
SEQS = st.lists(st.lists(OP_ST, min_size=1, max_size=T), min_size=B, max_size=B)


@pytest.mark.parametrize("policy", ["refuse", "evict_lru"])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seqs=SEQS, qseed=st.integers(0, 2 ** 30))
def test_vmapped_banks_match_reference_every_step(policy, seqs, qseed):
    acts = [stack_ops(s, T) for s in seqs]
    acts = mb.MemoryAction(**{n: jnp.asarray(np.stack([a[n] for a in acts])) for n in acts[0]})
    queries = np.random.default_rng(qseed).integers(-2, 3, (B, T, D)).astype(np.float32)
    banks = jax.vmap(lambda _: mb.empty_bank(S, L, D, full_policy=policy))(jnp.arange(B))
    out = TRACE[policy](banks, acts, jnp.asarray(queries))
    assert check_traces(seqs, queries, out, policy, K) == sum(map(len, seqs))


@pytest.mark.device
def test_trace_compiled_once():
    # The hypothesis tests above reuse one executable per policy.
    for fn in TRACE.values():
        assert fn._cache_size() <= 1


@pytest.mark.device
def test_batched_apply_equals_vmap_of_scan():
    rng = np.random.default_rng(1)
    from tests.conftest_memory import random_ops
    acts = [stack_ops(random_ops(rng, T), T) for _ in range(B)]
    acts = mb.MemoryAction(**{n: jnp.asarray(np.stack([a[n] for a in acts])) for n in acts[0]})
    banks = jax.vmap(lambda _: mb.empty_bank(S, L, D, full_policy="evict_lru"))(jnp.arange(B))
    b1, r1 = jax.vmap(mb.apply_actions)(banks, acts)
    b2, r2 = mb.apply_actions_batched(banks, acts)
    for x, y in zip(jax.tree.leaves((b1, r1)), jax.tree.leaves((b2, r2))):
        np.testing.assert_array_equal(x, y)
    assert int(r1.applied.sum()) > 0 and r1.applied.shape == (B, T)


def test_sharded_over_8_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "tests.conftest_memory", "64", "8", "24"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["devices"] == 8 and summary["sequences"] == 64 * 8
    assert summary["steps"] > 64 * 8 and "data" in summary["out_sharding"]


# ----------------------------------------------------------------------------- render

def render_reference(bank, indices, mask, prefixes, suffix, display_ids, max_tokens, pad):
    lines = []
    for i, m, d in zip(indices, mask, display_ids):
        if m:
            n = int(bank.lengths[i])
            lines.append(prefixes[d] + [int(t) for t in bank.tokens[i, :n]] + suffix)
    out, count = [], 0
    for line in lines:
        if len(out) + len(line) > max_tokens:
            break
        out += line
        count += 1
    return [pad] * (max_tokens - len(out)) + out, len(out), count


RENDER = jax.jit(mb.render, static_argnames="max_tokens")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 30), max_tokens=st.sampled_from([None, 7, 20]),
       use_rank=st.booleans())
def test_render_matches_reference(seed, max_tokens, use_rank):
    rng = np.random.default_rng(seed)
    vocab = {"[": 101, "]": 102, " ": 103, "\n": 104}
    tokenize = lambda s: [vocab[c] if c in vocab else 200 + int(c) for c in s]  # noqa: E731
    tpl = mb.make_render_template(tokenize, num_ids=S + 3)
    bank = mb.empty_bank(S, L, D, pad_id=0)
    for _ in range(12):
        bank, _ = act(bank, op=int(rng.choice([1, 1, 3])), target=int(rng.integers(S)),
                      tokens=rng.integers(1, 50, L), length=int(rng.integers(1, L + 1)),
                      embedding=rng.normal(size=D))
    r = RETRIEVE(bank, jnp.asarray(rng.normal(size=D), jnp.float32), k=5)
    ids = jnp.arange(5) if use_rank else None
    out = RENDER(bank, r.indices, r.mask, tpl, ids, max_tokens=max_tokens)
    t = max_tokens or 5 * (tpl.prefix.shape[1] + L + tpl.suffix.shape[0])
    prefixes = [tokenize(f"[{i}] ") for i in range(S + 3)]
    disp = list(range(5)) if use_rank else [max(int(i), 0) for i in r.indices]
    want, n, count = render_reference(jax.device_get(bank), np.asarray(r.indices),
                                      np.asarray(r.mask), prefixes, tokenize("\n"), disp, t, 0)
    assert out.tokens.tolist() == want
    assert int(out.length) == n and int(out.count) == count
    assert out.mask.tolist() == [False] * (t - n) + [True] * n


def test_render_example_line():
    tokenize = lambda s: [ord(c) for c in s]  # noqa: E731
    tpl = mb.make_render_template(tokenize, num_ids=S)
    bank = mb.empty_bank(S, L, D)
    bank, _ = act(bank, op=1, tokens=tokenize("ab"), embedding=[1, 0, 0, 0])
    bank, _ = act(bank, op=1, tokens=tokenize("xyz"), embedding=[0, 1, 0, 0])
    out = mb.render(bank, jnp.array([1, 0, -1]), jnp.array([True, True, False]), tpl,
                    max_tokens=20)
    text = "".join(chr(t) for t in out.tokens.tolist()[20 - int(out.length):])
    assert text == "[1] xyz\n[0] ab\n" and int(out.count) == 2


# ----------------------------------------------------------------------------- orbax

def test_orbax_roundtrip(tmp_path):
    import orbax.checkpoint as ocp
    rng = np.random.default_rng(3)
    bank = mb.empty_bank(S, L, D, pad_id=3, full_policy="evict_lru")
    for _ in range(10):
        bank, _ = act(bank, op=1, tokens=rng.integers(1, 50, L),
                      embedding=rng.normal(size=D), speaker=int(rng.integers(2)))
    bank, _ = act(bank, op=3, target=2)
    ckpt = ocp.StandardCheckpointer()
    path = (tmp_path / "bank").absolute()
    ckpt.save(path, bank)
    ckpt.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), bank)
    restored = ckpt.restore(path, abstract)
    assert isinstance(restored, mb.MemoryBank) and restored.pad_id == 3
    assert restored.full_policy == "evict_lru"
    for n in array_fields(bank):
        a, b = getattr(bank, n), getattr(restored, n)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert int(restored.step) == 11 and not bool(restored.valid[2])
