"""Evaluates an answering method on LoCoMo: per-question JSONL and a per-category table.

    python experiments/evaluate.py --config=experiments/configs/evaluate_locomo_subset.py \
        --workdir=/tmp/mr1_eval

Methods (``config.method``): ``memory`` (per-speaker banks built by mr1.agents.pipeline --
resumed from ``<workdir>/memory`` or ``config.memory.dir`` -- then the Answer Agent with
distillation), ``rag`` (top-k raw turns by embedding), ``full_context`` (newest turns that fit).
``config.checkpoint`` (a trainer's ``<workdir>/checkpoints``) evaluates the trained params of
the latest step instead of the loaded model's; a LoRA run's adapters (``lora`` in the run's
``config.json`` beside ``checkpoints/``) are merged into the loaded model, its base.
Writes ``predictions.jsonl`` (question, gold, prediction, category, f1, bleu1, em, f1_locomo, j,
answer_line_missing, num_invalid_ops, ...), ``results.md`` and ``results.json`` under the
workdir. J comes from mr1.eval.judge when ``MR1_JUDGE_BASE_URL``/``MR1_JUDGE_MODEL`` are set,
else it is "not computed" (n/a in the table).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

from absl import app, flags
from ml_collections import config_flags

from mr1.agents.answer import AnswerAgent, full_context_prompts, rag_prompts
from mr1.agents.pipeline import MemoryBuilder, PipelineConfig, build_all, select_locomo
from mr1.eval import metrics as M
from mr1.eval.judge import judge_scores, load_judge
from mr1.memory.embedder import load_embedder
from mr1.models import load_policy
from mr1.parallel import maybe_initialize_distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "evaluation config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mr1_evaluate", "output directory")

METHODS = ("memory", "rag", "full_context")
ROW_KEYS = ("question_id", "conv_id", "question", "gold", "prediction", "category", "f1",
            "bleu1", "em", "f1_locomo", "j", "answer_line_missing", "num_invalid_ops",
            "num_distilled", "output")


def memory_dir(config, workdir) -> pathlib.Path:
    return pathlib.Path(config.memory.dir or pathlib.Path(workdir) / "memory")


def run(config, workdir, *, policy=None, embedder=None, generate_fn=None, log=print) -> dict:
    """Runs one evaluation; returns ``{"rows", "table", "markdown", "paths", "wall_s"}``."""
    t0 = time.time()
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {config.method!r}")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    selected = select_locomo(config)
    n_q = sum(len(q) for _, q in selected)
    log(f"{config.split}: {len(selected)} conversations, {n_q} questions, method {config.method}")
    embedder = embedder or load_embedder()
    policy = policy or load_policy(config.model)
    if config.get("checkpoint", ""):  # a trained policy: params from an RL run's checkpoints
        from mr1.rl.trainer import load_trained_params, lora_rank, run_config
        run_cfg = run_config(config.checkpoint)  # the RL run's config.json, {} if absent
        trained = load_trained_params(config.checkpoint, policy.params, run=run_cfg)
        policy = dataclasses.replace(policy, params=trained)
        rank = lora_rank(run_cfg)
        log(f"policy params from {config.checkpoint}"
            + (f" (LoRA rank {rank} merged into {config.model})" if rank else ""))
    agent = AnswerAgent(policy, embedder, top_k=config.answer.top_k,
                        max_new_tokens=config.answer.max_new_tokens,
                        batch_size=config.answer.batch_size,
                        temperature=config.answer.temperature, seed=config.seed,
                        generate_fn=generate_fn)
    memories = {}
    if config.method == "memory":
        builder = MemoryBuilder(PipelineConfig.from_mapping(config.memory), embedder, policy,
                                generate_fn=generate_fn)
        memories = build_all(builder, [c for c, _ in selected], memory_dir(config, workdir),
                             progress=config.progress, log=log)
    window = policy.config.max_position_embeddings
    budget = config.full_context_tokens or (window - config.answer.max_new_tokens - 512)
    count = (lambda s: len(policy.tokenizer(s, add_special_tokens=False)["input_ids"]))  # noqa: E731

    rows = []
    t_answer = time.time()
    for conv, qas in selected:
        questions = [qa.question for qa in qas]
        if config.method == "memory":
            prompts = agent.memory_prompts(conv, memories[conv.sample_id], questions)
            invalid = memories[conv.sample_id].stats.num_invalid
        elif config.method == "rag":
            prompts = rag_prompts(conv, questions, embedder, config.rag_top_k)
            invalid = 0
        else:
            prompts = full_context_prompts(conv, questions, count, budget)
            invalid = 0
        results = agent.answer_prompts(prompts, questions)
        for qa, res in zip(qas, results):
            s = M.score_all(res.answer, qa.answer, ("em", "f1", "bleu1"))
            rows.append({"question_id": qa.question_id, "conv_id": qa.conv_id,
                         "question": qa.question, "gold": qa.answer, "prediction": res.answer,
                         "category": qa.category, "f1": s["f1"], "bleu1": s["bleu1"],
                         "em": s["em"],
                         "f1_locomo": M.locomo_score(res.answer, qa.answer, qa.category),
                         "j": None, "answer_line_missing": res.answer_line_missing,
                         "num_invalid_ops": invalid, "num_distilled": len(res.distilled),
                         "output": res.output})
        log(f"{conv.sample_id}: {len(qas)} answered ({time.time() - t_answer:.0f} s so far)")

    judge = load_judge() if config.judge else None
    js = judge_scores(judge, [(r["question"], r["gold"], r["prediction"]) for r in rows])
    for r, j in zip(rows, js):
        r["j"] = j

    table = M.aggregate_by_category(rows, metrics=("f1", "bleu1", "j"))
    markdown = M.format_markdown(table)
    missing = sum(r["answer_line_missing"] for r in rows)
    wall = time.time() - t0
    notes = (f"\nmethod {config.method}, model {config.model}, split {config.split}, "
             f"{len(rows)} questions; answer line missing: {missing}/{len(rows)}; "
             f"J: {'judge' if judge else 'not computed (no judge configured)'}; "
             f"wall time {wall:.1f} s\n")
    paths = {"jsonl": workdir / "predictions.jsonl", "markdown": workdir / "results.md",
             "json": workdir / "results.json"}
    with open(paths["jsonl"], "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    paths["markdown"].write_text(markdown + notes)
    paths["json"].write_text(json.dumps(
        {"table": table, "method": config.method, "model": config.model,
         "checkpoint": config.get("checkpoint", ""), "split": config.split,
         "num_questions": len(rows), "answer_line_missing": missing,
         "j_computed": judge is not None, "wall_s": wall,
         "config": json.loads(config.to_json())}, indent=2))
    log(markdown + notes)
    return {"rows": rows, "table": table, "markdown": markdown, "paths": paths, "wall_s": wall}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    maybe_initialize_distributed()
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
