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
from typing import Mapping, Sequence

import ml_collections
import numpy as np

from mr1.agents.answer import AnswerAgent, parse_answer
from mr1.agents.pipeline import MemoryBuilder, PipelineConfig, build_all
from mr1.data.select import select_locomo
from mr1.eval import metrics as M
from mr1.rl.rewards import combined_reward
from mr1.rl.rollout import greedy_texts, sample_and_score, sampling_metrics  # noqa: F401
from mr1.sampling import SamplingConfig, encode_prompts, left_pad

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

    def score(self, idx, texts, group: int) -> tuple[np.ndarray, dict]:
        """Rewards of ``texts`` (``group`` consecutive answers per question of ``idx``) and
        their EM / F1 / answer-line rates."""
        golds = [self.train_set.golds[i] for i in idx for _ in range(group)]
        scores = score_answers(texts, golds, self.reward_weights)
        return scores["reward"], {"em_mean": float(scores["em"].mean()),
                                  "f1_mean": float(scores["f1"].mean()),
                                  "answer_line_frac": float(scores["answer_line"].mean())}

    def rollout(self, policy, params, idx, key, cfg: SamplingConfig) -> tuple[dict, dict]:
        """:func:`mr1.rl.rollout.sample_and_score` on the training questions ``idx``."""
        ts = self.train_set
        return sample_and_score(policy, params, ts.ids[idx], ts.mask[idx], key, cfg,
                                lambda texts: self.score(idx, texts, cfg.num_samples))

    def validate(self, policy, params, cfg: SamplingConfig) -> dict:
        """Greedy answers on the validation prompts: F1 / BLEU-1 / EM in percent."""
        vs = self.val_set
        texts = greedy_texts(policy, params, vs.ids, vs.mask, cfg, self.eval_batch_size)
        return {f"val_{k}": v for k, v in answer_metrics(texts, vs.golds).items()}
