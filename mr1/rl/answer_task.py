"""The Answer Agent's RL task: LoCoMo questions as fixed-length token prompts plus gold answers.

Prompts are the evaluation harness's own (:meth:`mr1.agents.answer.AnswerAgent.memory_prompts`:
top-k memories per speaker from banks built by :mod:`mr1.agents.pipeline`), so what RL trains on
is exactly what ``experiments/evaluate.py`` measures (``answer.distill=False``: the prompt
without the distillation step, for the "without memory distillation" ablation). They are
tokenized once through the chat template and left-padded to ONE length for the whole split (the
sampler and the update then compile once). Rewards are computed on the host from the parsed ``**Answer:**`` line.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Mapping, Sequence

import jax
import ml_collections
import numpy as np

from mr1.agents.answer import AnswerAgent, parse_answer
from mr1.agents.pipeline import MemoryBuilder, PipelineConfig, build_all, select_locomo
from mr1.eval import metrics as M
from mr1.rl.rewards import combined_reward
from mr1.sampling import SamplingConfig, decode, encode_prompts, left_pad, sample_padded

__all__ = ["PromptSet", "build_prompt_set", "score_answers", "AnswerTask", "greedy_texts",
           "PAD_MULTIPLE"]

# All prompts of a split share one length, rounded up to this (sampler/update compile once).
PAD_MULTIPLE = 32


@dataclasses.dataclass
class PromptSet:
    """A split's prompts: ``ids [N, T]`` / ``mask [N, T]`` (left-padded) and their QAs."""

    ids: np.ndarray
    mask: np.ndarray
    golds: list[str]
    questions: list[str]
    categories: list[int]
    question_ids: list[str]

    def __len__(self) -> int:
        return len(self.golds)

    @property
    def length(self) -> int:
        return self.ids.shape[1]


def build_prompt_set(config, split: str, policy, embedder, memory_dir, *, max_questions: int = 0,
                     log=print) -> PromptSet:
    """Answer prompts for ``split`` of LoCoMo under ``config`` (``data_path``, ``memory``,
    ``answer.top_k``, ``answer.distill`` (absent = True), ``seed``); banks are built (or
    resumed) under ``memory_dir``."""
    sel_cfg = {"data_path": config.get("data_path", ""), "split": split,
               "max_questions_per_conversation": max_questions,
               "question_sampling": "random" if max_questions else "first",
               "seed": config.get("seed", 0)}
    selected = select_locomo(ml_collections.ConfigDict(sel_cfg))
    builder = MemoryBuilder(PipelineConfig.from_mapping(config.memory), embedder, policy)
    memories = build_all(builder, [c for c, _ in selected], memory_dir, progress=False, log=log)
    agent = AnswerAgent(policy, embedder, top_k=config.answer.top_k,
                        distill=config.answer.get("distill", True))
    prompts, qas = [], []
    for conv, conv_qas in selected:
        prompts += agent.memory_prompts(conv, memories[conv.sample_id],
                                        [qa.question for qa in conv_qas])
        qas += list(conv_qas)
    ids = encode_prompts(policy, prompts, chat=True)
    length = -(-max(map(len, ids)) // PAD_MULTIPLE) * PAD_MULTIPLE
    limit = policy.config.max_position_embeddings - config.answer.max_new_tokens
    if length > limit:
        raise ValueError(f"{split} prompts need {length} tokens, more than the {limit} the model "
                         "window leaves; lower answer.top_k")
    arr, mask = left_pad(ids, policy.pad_token_id, length)
    log(f"{split}: {len(qas)} prompts, padded to {length} tokens "
        f"(longest {max(map(len, ids))}, mean {np.mean([len(i) for i in ids]):.0f})")
    return PromptSet(arr, mask, [qa.answer for qa in qas], [qa.question for qa in qas],
                     [qa.category for qa in qas], [qa.question_id for qa in qas])


def score_answers(texts: Sequence[str], golds: Sequence[str],
                  reward_weights: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Per-completion ``reward`` (weighted terms) and the raw ``em``, ``f1``, ``format``."""
    out = {k: np.zeros(len(texts), np.float32) for k in ("reward", "em", "f1", "answer_line")}
    for i, (text, gold) in enumerate(zip(texts, golds)):
        parsed = parse_answer(text)
        out["reward"][i] = combined_reward(reward_weights, parsed.answer, gold, text)
        out["em"][i] = M.exact_match(parsed.answer, gold)
        out["f1"][i] = M.f1(parsed.answer, gold)
        out["answer_line"][i] = 0.0 if parsed.answer_line_missing else 1.0
    return out


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


def answer_metrics(texts: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """F1 / BLEU-1 / EM in percent and the answer-line rate of answer-agent outputs."""
    parsed = [parse_answer(t) for t in texts]
    f1 = [M.f1(p.answer, g) for p, g in zip(parsed, golds)]
    bleu = [M.bleu1(p.answer, g) for p, g in zip(parsed, golds)]
    em = [M.exact_match(p.answer, g) for p, g in zip(parsed, golds)]
    line = [not p.answer_line_missing for p in parsed]
    return {"f1": 100 * float(np.mean(f1)), "bleu1": 100 * float(np.mean(bleu)),
            "em": 100 * float(np.mean(em)), "answer_line": float(np.mean(line))}


ANSWER_PANELS = (("rollout reward (train samples)", ["reward_mean"]),
                 ("validation F1 / BLEU-1 / EM (greedy, conv-30)",
                  ["val_f1", "val_bleu1", "val_em"]),
                 ("answer length (tokens)", ["completion_len"]),
                 ("F1 / EM of the train samples", ["f1_mean", "em_mean"]))


@dataclasses.dataclass
class AnswerTask:
    """The Answer Agent's RL task (:class:`mr1.rl.trainer.RLTask`): train / validation
    :class:`PromptSet` s, rewards from the parsed answer line (``reward_weights``)."""

    train_set: PromptSet
    val_set: PromptSet
    reward_weights: Mapping[str, float]
    max_new_tokens: int
    eval_batch_size: int = 20
    name = "Answer Agent"
    best_metric = "val_f1"
    curve_panels = ANSWER_PANELS

    @classmethod
    def from_config(cls, config, policy, embedder, workdir, log=print) -> "AnswerTask":
        """Prompt sets of the train and validation splits; banks under ``config.memory.dir``
        (default ``<workdir>/memory``)."""
        mem_dir = pathlib.Path(config.memory.get("dir", "") or pathlib.Path(workdir) / "memory")
        train = build_prompt_set(config, "train", policy, embedder, mem_dir,
                                 max_questions=config.data.max_train_questions, log=log)
        val = build_prompt_set(config, "validation", policy, embedder, mem_dir,
                               max_questions=config.eval.num_questions, log=log)
        return cls(train, val, dict(config.reward), config.answer.max_new_tokens,
                   config.eval.batch_size)

    def __len__(self) -> int:
        return len(self.train_set)

    def rollout(self, policy, params, idx, key, cfg: SamplingConfig) -> tuple[dict, dict]:
        ts, g = self.train_set, cfg.num_samples
        t0 = time.time()
        tokens, logp, lengths = sample_padded(policy, ts.ids[idx], ts.mask[idx], key, cfg,
                                              params=params)
        rollout_s = time.time() - t0
        texts = decode(policy, tokens, lengths)
        golds = [ts.golds[i] for i in idx for _ in range(g)]
        scores = score_answers(texts, golds, self.reward_weights)
        cmask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.float32)
        arrays = {"prompt_ids": ts.ids[idx], "prompt_mask": ts.mask[idx], "tokens": tokens,
                  "completion_mask": cmask, "old_logp": logp, "rewards": scores["reward"]}
        prompt_tok = int(ts.mask[idx].sum())
        metrics = {"reward_mean": float(np.mean(scores["reward"])),
                   "reward_std": float(np.std(scores["reward"])),
                   "em_mean": float(scores["em"].mean()), "f1_mean": float(scores["f1"].mean()),
                   "answer_line_frac": float(scores["answer_line"].mean()),
                   **sampling_metrics(lengths, tokens.shape[1], prompt_tok, rollout_s)}
        return arrays, metrics

    def validate(self, policy, params, cfg: SamplingConfig) -> dict:
        """Greedy answers on the validation prompts: F1 / BLEU-1 / EM in percent."""
        vs = self.val_set
        texts = greedy_texts(policy, params, vs.ids, vs.mask, cfg, self.eval_batch_size)
        return {f"val_{k}": v for k, v in answer_metrics(texts, vs.golds).items()}


def sampling_metrics(lengths: np.ndarray, budget: int, prompt_tokens: int,
                     seconds: float) -> dict[str, float]:
    """Completion length, truncation rate and sampler throughput of one rollout."""
    n_new = int(lengths.sum())
    return {"completion_len": float(lengths.mean()),
            "truncated_frac": float(np.mean(lengths >= budget)),
            "rollout_s": seconds, "rollout_tok_s": (n_new + prompt_tokens) / seconds,
            "rollout_new_tok_s": n_new / seconds}
