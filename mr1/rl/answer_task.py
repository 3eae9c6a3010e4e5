"""The Answer Agent's RL task: LoCoMo questions as fixed-length token prompts plus gold answers.

Prompts are the evaluation harness's own (:meth:`mr1.agents.answer.AnswerAgent.memory_prompts`:
top-k memories per speaker from banks built by :mod:`mr1.agents.pipeline`), so what RL trains on
is exactly what ``experiments/evaluate.py`` measures. They are tokenized once through the chat
template and left-padded to ONE length for the whole split (the sampler and the update then
compile once). Rewards are computed on the host from the parsed ``**Answer:**`` line.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import ml_collections
import numpy as np

from mr1.agents.answer import AnswerAgent, parse_answer
from mr1.agents.pipeline import MemoryBuilder, PipelineConfig, build_all, select_locomo
from mr1.eval import metrics as M
from mr1.rl.rewards import combined_reward
from mr1.sampling import encode_prompts, left_pad

__all__ = ["PromptSet", "build_prompt_set", "score_answers", "PAD_MULTIPLE"]

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
    ``answer.top_k``, ``seed``); banks are built (or resumed) under ``memory_dir``."""
    sel_cfg = {"data_path": config.get("data_path", ""), "split": split,
               "max_questions_per_conversation": max_questions,
               "question_sampling": "random" if max_questions else "first",
               "seed": config.get("seed", 0)}
    selected = select_locomo(ml_collections.ConfigDict(sel_cfg))
    builder = MemoryBuilder(PipelineConfig.from_mapping(config.memory), embedder, policy)
    memories = build_all(builder, [c for c, _ in selected], memory_dir, progress=False, log=log)
    agent = AnswerAgent(policy, embedder, top_k=config.answer.top_k)
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
