"""The jitted sampler on a tiny random model: determinism, logprobs, EOS, groups, buckets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mr1 import sampling
from mr1.models import load_policy
from mr1.sampling import bucket_length, generate, left_pad

pytestmark = pytest.mark.device  # all of it: the accelerator selection (conftest.py)


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny", seed=1)


def _prompts(n=3, lo=3, hi=30, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def test_greedy_matches_argmax_of_full_forward(tiny):
    prompts = _prompts(2)
    out = generate(tiny, prompts, max_new_tokens=5, temperature=0.0, chat=False, ignore_eos=True)
    for i, p in enumerate(prompts):
        seq = list(p)
        for j in range(5):
            logits = tiny.logits(np.asarray([seq]))[0, -1]
            assert out.tokens[i, j] == int(np.argmax(logits))
            seq.append(int(out.tokens[i, j]))


def test_logprobs_are_model_logprobs_of_sampled_tokens(tiny):
    prompts = _prompts(4)
    out = generate(tiny, prompts, max_new_tokens=10, temperature=1.0, seed=3, chat=False,
                   ignore_eos=True)
    for i, p in enumerate(prompts):
        seq = np.asarray([p + out.tokens[i].tolist()])
        logp = jax.nn.log_softmax(tiny.logits(seq)[0], axis=-1)
        want = np.asarray([logp[len(p) - 1 + j, out.tokens[i, j]] for j in range(10)])
        np.testing.assert_allclose(out.logprobs[i], want, atol=1e-4)


def test_seeded_sampling_is_reproducible_and_varies(tiny):
    prompts = _prompts(2)
    a = generate(tiny, prompts, max_new_tokens=12, temperature=1.0, seed=7, chat=False)
    b = generate(tiny, prompts, max_new_tokens=12, temperature=1.0, seed=7, chat=False)
    c = generate(tiny, prompts, max_new_tokens=12, temperature=1.0, seed=8, chat=False)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_top_k_one_and_tiny_top_p_are_greedy(tiny):
    prompts = _prompts(3)
    greedy = generate(tiny, prompts, max_new_tokens=6, chat=False, ignore_eos=True)
    k1 = generate(tiny, prompts, max_new_tokens=6, temperature=1.0, top_k=1, chat=False,
                  ignore_eos=True)
    p0 = generate(tiny, prompts, max_new_tokens=6, temperature=1.0, top_p=1e-6, chat=False,
                  ignore_eos=True)
    np.testing.assert_array_equal(greedy.tokens, k1.tokens)
    np.testing.assert_array_equal(greedy.tokens, p0.tokens)


def test_top_k_restricts_support(tiny):
    p = _prompts(1)[0]
    out = generate(tiny, [p], max_new_tokens=1, temperature=1.0, top_k=3, chat=False,
                   num_samples=64, seed=0)
    top3 = set(np.argsort(tiny.logits(np.asarray([p]))[0, -1])[-3:].tolist())
    assert set(out.tokens[:, 0].tolist()) <= top3
    assert len(set(out.tokens[:, 0].tolist())) > 1


def test_eos_stops_each_row_and_pads(tiny):
    # make token 2 (EOS) the greedy choice after token 9 by editing the tied embedding row
    emb = np.asarray(tiny.params["embed"]).copy()
    params = jax.tree.map(lambda x: x, tiny.params)
    prompts = _prompts(3)
    free = generate(tiny, prompts, max_new_tokens=10, chat=False, ignore_eos=True)
    first = free.tokens[0, 0]
    emb[2] = emb[first] * 3.0  # EOS now out-scores row 0's first token
    params["embed"] = jnp.asarray(emb)
    import dataclasses

    policy = dataclasses.replace(tiny, params=params)
    out = generate(policy, prompts, max_new_tokens=10, chat=False)
    assert out.tokens[0, 0] == 2 and out.lengths[0] == 1
    assert (out.tokens[0, 1:] == policy.pad_token_id).all()
    assert (out.logprobs[0, 1:] == 0).all()
    assert out.completion_mask[0].sum() == 1
    assert (out.lengths <= 10).all()


def test_group_samples_share_prefill(tiny):
    prompts = _prompts(2)
    grouped = generate(tiny, prompts, max_new_tokens=6, chat=False, num_samples=3,
                       ignore_eos=True)
    single = generate(tiny, prompts, max_new_tokens=6, chat=False, ignore_eos=True)
    assert grouped.tokens.shape == (6, 6)
    np.testing.assert_array_equal(grouped.tokens, np.repeat(single.tokens, 3, axis=0))
    np.testing.assert_array_equal(grouped.prompt_tokens[::3], single.prompt_tokens[:2])
    sampled = generate(tiny, prompts, max_new_tokens=6, temperature=1.0, chat=False,
                       num_samples=4, seed=1)
    assert len({tuple(r) for r in sampled.tokens[:4]}) > 1, "group members must differ"


def test_padding_invariance(tiny):
    p = _prompts(1)[0]
    alone = generate(tiny, [p], max_new_tokens=8, chat=False, ignore_eos=True)
    batched = generate(tiny, [p, list(range(3, 60))], max_new_tokens=8, chat=False,
                       ignore_eos=True)
    np.testing.assert_array_equal(alone.tokens[0], batched.tokens[0])
    np.testing.assert_allclose(alone.logprobs[0], batched.logprobs[0], atol=1e-4)


def test_prompt_lengths_are_bucketed_without_recompiling(tiny):
    assert bucket_length(5) == 16 and bucket_length(17) == 32 and bucket_length(300) == 384
    generate(tiny, [[5] * 20], max_new_tokens=4, chat=False)
    fn = sampling._compiled_sampler(tiny.config, sampling.SamplingConfig(max_new_tokens=4),
                                    tiny.eos_token_ids, tiny.pad_token_id)
    before = fn._cache_size()
    for n in (18, 23, 31):
        generate(tiny, [[5] * n], max_new_tokens=4, chat=False)
    assert fn._cache_size() == before


def test_left_pad():
    ids, mask = left_pad([[1, 2], [3]], pad_id=0, length=4, batch=3)
    np.testing.assert_array_equal(ids, [[0, 0, 1, 2], [0, 0, 0, 3], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])


def test_sampled_frequencies_follow_the_distribution():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1, 0.0]]))
    cfg = sampling.SamplingConfig(temperature=1.0)
    draw = jax.jit(jax.vmap(lambda k: sampling.sample_token(k, logits, cfg)[0][0]))
    toks = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 20000)))
    freq = np.bincount(toks, minlength=5) / toks.size
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.1, 0.0], atol=0.012)
    half = sampling.SamplingConfig(temperature=0.5)  # p^2, renormalised
    draw = jax.jit(jax.vmap(lambda k: sampling.sample_token(k, logits, half)[0][0]))
    freq = np.bincount(np.asarray(draw(jax.random.split(jax.random.PRNGKey(1), 20000))),
                       minlength=5) / 20000
    p2 = np.asarray([0.25, 0.0625, 0.0225, 0.01, 0.0])
    np.testing.assert_allclose(freq, p2 / p2.sum(), atol=0.012)


def test_group_logprobs_match_full_forward(tiny):
    """Samples of a group attend one shared prompt prefix; their logprobs must equal a plain
    full-sequence forward of prompt + completion."""
    prompts = _prompts(2, lo=10, hi=20, seed=5)
    out = generate(tiny, prompts, max_new_tokens=6, temperature=1.0, seed=2, chat=False,
                   num_samples=3, ignore_eos=True)
    for row in range(6):
        p = prompts[row // 3]
        seq = np.asarray([p + out.tokens[row].tolist()])
        logp = jax.nn.log_softmax(tiny.logits(seq)[0], axis=-1)
        want = [logp[len(p) - 1 + j, out.tokens[row, j]] for j in range(6)]
        np.testing.assert_allclose(out.logprobs[row], want, atol=1e-4)


# ----------------------------------------------------------------------------- shared prefix

def _shared(n=4, prefix_len=150, seed=5):
    """Rows sharing ``prefix_len`` tokens, then suffixes of different lengths (1 .. 25)."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, 256, size=prefix_len).tolist()
    return [prefix + rng.integers(3, 256, size=int(k)).tolist()
            for k in np.linspace(1, 25, n).astype(int)]


def test_shared_prefix_length():
    from mr1.sampling import shared_prefix_length

    assert shared_prefix_length([[1] * 200, [1] * 150 + [2] * 9]) == 128   # 150 -> block of 64
    assert shared_prefix_length([[1] * 70, [1] * 70]) == 64        # a suffix token stays
    assert shared_prefix_length([[1] * 64, [1] * 64]) == 0         # 63 shareable < one block
    assert shared_prefix_length([[1] * 200, [2] * 200]) == 0
    assert shared_prefix_length([[5] * 100]) == 64
    assert shared_prefix_length([[1] * 40, [1] * 40], block=8) == 32
    assert shared_prefix_length([]) == 0


def test_shared_prefix_generation_equals_full_prompts(tiny):
    """share_prefix=True: the prefix is prefilled once and each row only its suffix; greedy
    tokens equal the plain sampler's and the logprobs agree to float rounding."""
    prompts = _shared()
    plain = generate(tiny, prompts, max_new_tokens=8, chat=False, ignore_eos=True)
    shared = generate(tiny, prompts, max_new_tokens=8, chat=False, ignore_eos=True,
                      share_prefix=True)
    np.testing.assert_array_equal(shared.tokens, plain.tokens)
    np.testing.assert_allclose(shared.logprobs, plain.logprobs, atol=1e-4)
    np.testing.assert_array_equal(shared.lengths, plain.lengths)
    np.testing.assert_array_equal(shared.prompt_tokens, plain.prompt_tokens)


def test_shared_prefix_is_cached_and_samples_groups(tiny):
    """A second call with the same prefix reuses its keys/values; with num_samples=G the
    sampled tokens' logprobs are the model's own under the full prompt."""
    prompts = _shared(n=2, seed=9)
    generate(tiny, prompts, max_new_tokens=2, chat=False, share_prefix=True)
    cached = sampling._PREFIX_CACHE["last"][2][0]
    out = generate(tiny, prompts, max_new_tokens=6, temperature=1.0, seed=4, chat=False,
                   ignore_eos=True, share_prefix=True, num_samples=3)
    assert sampling._PREFIX_CACHE["last"][2][0] is cached
    assert out.tokens.shape == (6, 6)
    for r in range(6):
        p = prompts[r // 3]
        seq = np.asarray([p + out.tokens[r].tolist()])
        logp = jax.nn.log_softmax(tiny.logits(seq)[0], axis=-1)
        want = np.asarray([logp[len(p) - 1 + j, out.tokens[r, j]] for j in range(6)])
        np.testing.assert_allclose(out.logprobs[r], want, atol=1e-4)
    shared = sampling.shared_prefix_length(prompts)
    moved = jax.tree.map(lambda x: x + 0, tiny.params)   # new params (an RL update): a miss
    kv, _ = sampling.cached_prefix_kv(tiny, prompts[0][:shared], params=moved)
    assert kv is not cached
    np.testing.assert_allclose(np.asarray(kv.k), np.asarray(cached.k), atol=1e-6)
    other = _shared(n=2, seed=10)
    generate(tiny, other, max_new_tokens=2, chat=False, share_prefix=True)
    assert sampling._PREFIX_CACHE["last"][2][0] is not kv


def test_share_prefix_without_a_common_block_uses_the_plain_sampler(tiny):
    prompts = _prompts(3)   # random rows: no common prefix
    a = generate(tiny, prompts, max_new_tokens=5, chat=False, ignore_eos=True)
    b = generate(tiny, prompts, max_new_tokens=5, chat=False, ignore_eos=True, share_prefix=True)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
