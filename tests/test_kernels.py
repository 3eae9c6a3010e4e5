"""The Pallas decode-attention kernel (Pallas interpret mode on CPU) against the XLA path: the
segment outputs and log-sum-exps for GQA groups, ragged and empty rows, bfloat16; the merged
softmax of several segments against one softmax over their union; the sampler with
``attention_impl="pallas"`` against ``"xla"``; and ``decode_unroll``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mr1.models import load_policy
from mr1.models.config import get_config
from mr1.models.kernels import (
    DECODE_ATTENTION,
    decode_attention_pallas,
    decode_attention_xla,
    merge_segments,
)
from mr1.sampling import generate

pytestmark = pytest.mark.device


def _inputs(b, k, q, s, hd, lengths, dtype=jnp.float32, seed=0, left=True):
    rng = np.random.default_rng(seed)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    idx = np.arange(s)[None]
    lengths = np.asarray(lengths)[:, None]
    valid = idx >= s - lengths if left else idx < lengths  # left padding / right ragged
    return arr(b, k, q, hd), arr(b, k, s, hd), arr(b, k, s, hd), jnp.asarray(valid)


@pytest.mark.parametrize("b,k,q,s,hd,lengths,left", [
    (2, 2, 2, 24, 16, [24, 24], True),              # GQA group of 2, full rows
    (3, 2, 7, 300, 64, [300, 51, 1], True),        # group of 7 (Qwen2.5-7B), ragged, 3 blocks
    (4, 1, 16, 130, 32, [130, 129, 128, 2], False),  # right-ragged over a block edge
    (2, 4, 1, 9, 16, [0, 9], True),                # an empty row and a one-block segment
    (1, 2, 24, 512, 64, [400], True),              # a prefix: n * G = 3 x 8 query rows
])
def test_pallas_matches_xla(b, k, q, s, hd, lengths, left):
    qa, ka, va, valid = _inputs(b, k, q, s, hd, lengths, left=left)
    want_o, want_lse = decode_attention_xla(qa, ka, va, valid)
    got_o, got_lse = decode_attention_pallas(qa, ka, va, valid, interpret=True)
    assert got_o.shape == (b, k, q, hd) and got_lse.shape == (b, k, q)
    np.testing.assert_allclose(np.asarray(got_o), np.asarray(want_o), atol=2e-6, rtol=1e-5)
    np.testing.assert_array_equal(np.isfinite(got_lse), np.isfinite(want_lse))
    np.testing.assert_allclose(np.asarray(got_lse), np.asarray(want_lse), atol=2e-6, rtol=1e-6)
    empty = np.asarray(lengths) == 0
    assert np.all(np.isneginf(np.asarray(got_lse)[empty]))
    assert np.all(np.asarray(got_o)[empty] == 0)


def test_pallas_matches_xla_in_bfloat16():
    qa, ka, va, valid = _inputs(2, 2, 4, 200, 64, [200, 77], dtype=jnp.bfloat16, seed=3)
    want_o, want_lse = decode_attention_xla(qa, ka, va, valid)
    got_o, got_lse = decode_attention_pallas(qa, ka, va, valid, block_k=64, interpret=True)
    np.testing.assert_allclose(np.asarray(got_o), np.asarray(want_o), atol=2e-2)
    np.testing.assert_allclose(np.asarray(got_lse), np.asarray(want_lse), atol=2e-2)


def test_xla_path_is_a_masked_softmax():
    """The reference itself: a plain softmax over the valid keys, computed in numpy."""
    qa, ka, va, valid = _inputs(2, 1, 3, 10, 16, [10, 4])
    out, lse = decode_attention_xla(qa, ka, va, valid)
    q, k, v, ok = (np.asarray(x, np.float64) for x in (qa, ka, va, valid))
    sc = np.einsum("bkqd,bksd->bkqs", q, k) / 4.0
    sc = np.where(ok[:, None, None, :] > 0, sc, -np.inf)
    want_lse = np.log(np.exp(sc).sum(-1))
    want = np.einsum("bkqs,bksd->bkqd", np.exp(sc - want_lse[..., None]), v)
    np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5)


@pytest.mark.parametrize("impl", sorted(DECODE_ATTENTION))
def test_merged_segments_equal_one_softmax_over_their_union(impl):
    qa, ka, va, valid = _inputs(3, 2, 4, 60, 16, [60, 33, 5])
    whole = decode_attention_xla(qa, ka, va, valid)[0]
    cuts = [(0, 17), (17, 40), (40, 60)]  # the middle segment of row 2 has no valid key
    parts = [DECODE_ATTENTION[impl](qa, ka[:, :, a:z], va[:, :, a:z], valid[:, a:z])
             for a, z in cuts]
    np.testing.assert_allclose(np.asarray(merge_segments(parts)), np.asarray(whole), atol=2e-6)


@pytest.fixture(scope="module")
def tiny_pair():
    xla = load_policy("tiny", seed=2)
    cfg = xla.config.replace(attention_impl="pallas")
    return xla, dataclasses.replace(xla, config=cfg)


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, size=int(rng.integers(3, 40))).tolist() for _ in range(n)]


@pytest.mark.parametrize("num_samples,temperature", [(1, 0.0), (3, 1.0)])
def test_sampler_with_pallas_equals_xla(tiny_pair, num_samples, temperature):
    """Greedy rows and seeded group samples (prefix shared by 3 samples, ragged prompts)."""
    xla, pallas = tiny_pair
    kw = dict(max_new_tokens=6, temperature=temperature, seed=4, chat=False, ignore_eos=True,
              num_samples=num_samples)
    prompts = _prompts(3)
    a, b = generate(xla, prompts, **kw), generate(pallas, prompts, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_shared_prefix_sampler_with_pallas_equals_xla(tiny_pair):
    """The suffix sampler: a batch-1 prefix, a per-row cache pre-filled with the suffixes."""
    xla, pallas = tiny_pair
    head = list(range(3, 67))
    prompts = [head + p for p in _prompts(2, seed=5)]
    kw = dict(max_new_tokens=5, chat=False, ignore_eos=True, share_prefix=True)
    a, b = generate(xla, prompts, **kw), generate(pallas, prompts, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_unknown_attention_impl_is_rejected():
    with pytest.raises(ValueError, match="attention_impl"):
        get_config("tiny").replace(attention_impl="flash")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_on_this_backend_matches_xla(dtype):
    """``interpret=None``: the compiled (Triton) kernel on a GPU, interpret mode elsewhere; both
    sides jitted, at the suite's matmul precision (tests/conftest.py)."""
    qa, ka, va, valid = _inputs(4, 4, 7, 768, 128, [768, 600, 129, 3], dtype=dtype, seed=7)
    want_o, want_lse = jax.jit(decode_attention_xla)(qa, ka, va, valid)
    got_o, got_lse = jax.jit(decode_attention_pallas)(qa, ka, va, valid)
    atol = 2e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got_o), np.asarray(want_o), atol=atol, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_lse), np.asarray(want_lse), atol=atol, rtol=1e-5)


def test_decode_unroll_changes_nothing_but_the_program(tiny_pair):
    """``decode_unroll=2`` (both layers of the tiny model in one loop iteration)."""
    xla, _ = tiny_pair
    unrolled = dataclasses.replace(xla, config=xla.config.replace(decode_unroll=2))
    kw = dict(max_new_tokens=5, temperature=1.0, seed=2, chat=False, ignore_eos=True,
              num_samples=2)
    prompts = _prompts(2, seed=9)
    a, b = generate(xla, prompts, **kw), generate(unrolled, prompts, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
    with pytest.raises(ValueError, match="decode_unroll"):
        xla.config.replace(decode_unroll=3)
