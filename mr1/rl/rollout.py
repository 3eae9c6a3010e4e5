"""The rollout every RL task shares: prompts in, completions, rewards and metrics out.

A task (:class:`mr1.rl.trainer.RLTask`) only says which token prompts a step's indices stand
for and how texts score; :func:`sample_and_score` does the rest the same way for the Answer
Agent and the Memory Manager: ``G`` samples per prompt from the jitted sampler (one shared
prefill per prompt), the texts decoded, the task's rewards (the one host step of an RL step),
the completion mask, and the sampling metrics. :func:`greedy_texts` is the validation side.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

from mr1.sampling import SamplingConfig, decode, sample_padded

__all__ = ["sample_and_score", "greedy_texts", "sampling_metrics"]

# texts -> (rewards [n], metrics); n = len(texts) = prompts x samples, group-contiguous
ScoreFn = Callable[[list], tuple[np.ndarray, dict]]


def sample_and_score(policy, params, ids: np.ndarray, mask: np.ndarray, key,
                     cfg: SamplingConfig, score: ScoreFn) -> tuple[dict, dict]:
    """``cfg.num_samples`` completions of each left-padded prompt (``ids``, ``mask``
    ``[P, T]``), scored by ``score(texts)``.

    Returns host arrays (``prompt_ids``, ``prompt_mask`` ``[P, T]``; ``tokens``,
    ``completion_mask``, ``old_logp`` ``[P * G, N]``; ``rewards [P * G]``) and metrics:
    ``reward_mean`` / ``reward_std``, the task's own, ``reward_s`` (scoring time) and
    :func:`sampling_metrics`.
    """
    t0 = time.time()
    tokens, logp, lengths = sample_padded(policy, ids, mask, key, cfg, params=params)
    rollout_s = time.time() - t0
    texts = decode(policy, tokens, lengths)
    t1 = time.time()
    rewards, task_metrics = score(texts)
    reward_s = time.time() - t1
    rewards = np.asarray(rewards, np.float32)
    cmask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.float32)
    arrays = {"prompt_ids": ids, "prompt_mask": mask, "tokens": tokens,
              "completion_mask": cmask, "old_logp": logp, "rewards": rewards}
    metrics = {"reward_mean": float(np.mean(rewards)), "reward_std": float(np.std(rewards)),
               **task_metrics, "reward_s": reward_s,
               **sampling_metrics(lengths, tokens.shape[1], int(mask.sum()), rollout_s)}
    return arrays, metrics


def greedy_texts(policy, params, ids: np.ndarray, mask: np.ndarray, cfg: SamplingConfig,
                 batch_size: int) -> list[str]:
    """Greedy completions of left-padded prompts ``[N, T]`` in batches of ``batch_size``; the
    last batch wraps around so one compiled shape serves every call."""
    texts: list[str] = []
    n = len(ids)
    for s in range(0, n, batch_size):
        idx = np.arange(s, s + batch_size) % n
        tok, _, lens = sample_padded(policy, ids[idx], mask[idx], jax.random.PRNGKey(0), cfg,
                                     params=params)
        texts += decode(policy, tok, lens)[: min(batch_size, n - s)]
    return texts


def sampling_metrics(lengths: np.ndarray, budget: int, prompt_tokens: int,
                     seconds: float) -> dict[str, float]:
    """Completion length, truncation rate and sampler throughput of one rollout."""
    n_new = int(lengths.sum())
    return {"completion_len": float(lengths.mean()),
            "truncated_frac": float(np.mean(lengths >= budget)),
            "rollout_s": seconds, "rollout_tok_s": (n_new + prompt_tokens) / seconds,
            "rollout_new_tok_s": n_new / seconds}
