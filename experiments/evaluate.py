"""Evaluates an answering method on LoCoMo, LongMemEval or MSC: per-question JSONL and a
per-category table.

    python experiments/evaluate.py --config=experiments/configs/evaluate_locomo_subset.py \
        --workdir=/tmp/mr1_eval

``config.benchmark`` (absent = "locomo") picks the data (mr1.agents.pipeline.BENCHMARKS):
``locomo`` (``config.split`` of Memory-R1's 1:1:8 split), ``longmemeval``
(``config.longmemeval_variant`` "oracle" | "s"; one haystack per question, table rows by
question type, and results.json's ``abstention`` block scores the ``_abs`` questions apart) or
``msc`` (MSC-Self-Instruct). The paper evaluates LongMemEval and MSC zero-shot with the
LoCoMo-trained agents: pass the LoCoMo runs' ``checkpoint`` / ``memory.manager_checkpoint``
to ``evaluate_longmemeval_smollm2.py`` / ``evaluate_msc_smollm2.py``. ``f1_locomo`` applies
LoCoMo's per-category rules on LoCoMo only (plain stemmed F1 elsewhere).

Methods (``config.method``): ``memory`` (per-speaker banks built by mr1.agents.pipeline --
resumed from ``<workdir>/memory`` or ``config.memory.dir`` -- then the Answer Agent with
distillation), ``rag`` (top-k raw turns by embedding), ``full_context`` (newest turns that fit).
``--config.answer.distill=False`` (absent = True) drops the memory method's distillation step:
the Answer Agent's prompt asks for the ``**Answer:**`` line only (the paper's "without memory
distillation" ablation; ``num_distilled`` is then 0 for compliant outputs); results.json
records it as ``distill``. Evaluate an Answer Agent RL run with the setting it was trained with.
``config.checkpoint`` (a trainer's ``<workdir>/checkpoints`` or ``<workdir>/best``) gives the
Answer Agent the trained params of that run instead of the loaded model's, and
``config.memory.manager_checkpoint`` gives them to the memory builder (Memory Manager and "llm"
fact extraction); "" = the loaded model. A LoRA run's adapters (``lora`` in the run's
``config.json`` beside ``checkpoints/``) are merged into the loaded model, its base. The
Memory-R1 ablation grid (base/RL manager x base/RL answer agent) is one command per cell, each
with its own workdir, e.g. the RL/RL cell::

    python experiments/evaluate.py --config=experiments/configs/evaluate_locomo_rl.py \
        --config.memory.manager=llm --config.memory.manager_checkpoint=runs/grpo_memory/best \
        --config.checkpoint=runs/grpo_answer/best --workdir=runs/eval_rl_rl

The memory dir records who built its banks under which budget (``manager.json``: manager
mode, manager checkpoint, model, facts, ``num_slots``, ``full_policy``, ``max_len``,
``max_sessions``); resuming it with another identity raises ValueError (pick another
``--config.memory.dir`` or workdir). Banks are shared across answer checkpoints by pointing
``--config.memory.dir`` at one dir.
Writes ``predictions.jsonl`` (question, gold, prediction, category, f1, bleu1, em, f1_locomo, j,
answer_line_missing, num_invalid_ops, ...), ``results.md`` and ``results.json`` (with
``memory_ops``: the manager's ADD/UPDATE/DELETE/NOOP, invalid outputs and bank refusals summed
over the evaluated conversations, plus the budget's events -- ``bank_full`` ADDs refused,
memories ``evicted``, texts ``truncated`` -- and the budget itself) under the workdir; the
memory dir's ``manifest.json`` holds the same counts per conversation. With observations as
facts, ``evidence_coverage`` counts the questions with a fact of one of their evidence turns
in the banks (what the budget kept, whatever the Answer Agent makes of it). J comes from
mr1.eval.judge when ``MR1_JUDGE_BASE_URL``/``MR1_JUDGE_MODEL`` are set, else it is "not
computed" (n/a in the table).

Answering is resumable: each answered conversation's rows go to
``<workdir>/answers/<conv_id>.jsonl`` (beside ``config.json``, the run's config), so a run
killed mid-way, started again with the same command, answers only the conversations it had
not finished; the folder is removed once the results are written. Another config's folder
raises ValueError rather than mixing answers (remove it or pick another workdir). With
several processes answers are not resumed (the processes must answer the same batches).

The workdir is one evaluation's: its ``run_identity.json`` (:mod:`mr1.run_identity`, written
with the results) makes a rerun with another config refuse with one line naming the fields that
differ (a new ``--workdir``, or ``MR1_ALLOW_CONFIG_CHANGE=1`` to replace the results). Every
output is written to a temporary file and renamed into place (:mod:`mr1.fileio`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from mr1.agents.answer import AnswerAgent, full_context_prompts, rag_prompts
from mr1.agents.pipeline import (
    MemoryBuilder,
    PipelineConfig,
    build_all,
    claim_memory_dir,
    manager_identity,
)
from mr1 import run_identity as RI
from mr1.memory.store import evidence_coverage, sum_stats
from mr1.data.longmemeval import is_abstention
from mr1.data.select import benchmark_categories, benchmark_name, select_conversations
from mr1.eval import metrics as M
from mr1.eval.judge import judge_scores, load_judge
from mr1.fileio import write_jsonl_atomic, write_text_atomic
from mr1.entry import run_main
from mr1.memory.embedder import load_embedder
from mr1.models.trained import load_policy_from_config, load_trained_params, lora_rank, run_config
from mr1.parallel import is_main_process, maybe_initialize_distributed, process_zero_first

_CONFIG = config_flags.DEFINE_config_file("config", None, "evaluation config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mr1_evaluate", "output directory")

METHODS = ("memory", "rag", "full_context")
ROW_KEYS = ("question_id", "conv_id", "question", "gold", "prediction", "category", "f1",
            "bleu1", "em", "f1_locomo", "j", "answer_line_missing", "num_invalid_ops",
            "num_distilled", "output")   # + "abstention" (bool) on LongMemEval


def memory_dir(config, workdir) -> pathlib.Path:
    return pathlib.Path(config.memory.dir or pathlib.Path(workdir) / "memory")


def _trained_policy(policy, checkpoint, log=print):
    """``policy`` with the params of an RL run's ``checkpoint`` (``""``: ``policy`` as it is)."""
    if not checkpoint:
        return policy
    run_cfg = run_config(checkpoint)  # the RL run's config.json, {} if absent
    trained = load_trained_params(checkpoint, policy.params, run=run_cfg)
    rank = lora_rank(run_cfg)
    log(f"policy params from {checkpoint}"
        + (f" (LoRA rank {rank} merged into the loaded model)" if rank else ""))
    return dataclasses.replace(policy, params=trained)


def _check_distill(checkpoint, distill: bool, log=print) -> None:
    """Logs a note when the Answer Agent RL run behind ``checkpoint`` was trained with another
    ``answer.distill`` than this evaluation uses (a legitimate cross-check, so not an error)."""
    if not checkpoint:
        return
    trained = (run_config(checkpoint).get("answer") or {}).get("distill", True)
    if bool(trained) != distill:
        log(f"note: {checkpoint} was trained with answer.distill={bool(trained)}, "
            f"evaluating with answer.distill={distill}")


def build_memories(config, workdir, selected, base, answer_policy, embedder, generate_fn,
                   log=print) -> dict:
    """Builds or resumes the banks with the manager policy (``memory.manager_checkpoint``)."""
    directory = memory_dir(config, workdir)
    identity = manager_identity(config)
    if not claim_memory_dir(directory, identity) and any(directory.glob("*/DONE")):
        log(f"{directory}: banks without manager.json, assumed built by {identity}")
    ckpt = config.memory.get("manager_checkpoint", "")
    policy = (answer_policy if ckpt == config.get("checkpoint", "")
              else _trained_policy(base, ckpt, log))
    builder = MemoryBuilder(PipelineConfig.from_mapping(config.memory), embedder, policy,
                            generate_fn=generate_fn)
    return build_all(builder, [c for c, _ in selected], directory, progress=config.progress,
                     log=log)


def memory_ops(memories, config=None) -> dict:
    """The build statistics of ``memories`` summed: ops, invalid (by reason), refused (by
    reason), facts, manager calls, the invalid rate ((invalid + refused) / manager calls) and
    the budget's events: ``bank_full`` (ADDs refused by a full bank), ``evicted`` (memories
    an ADD into a full bank overwrote), ``truncated`` (texts cut to ``max_len`` tokens); with
    ``config``, the budget itself (``num_slots``, ``full_policy``, ``max_len``)."""
    total = sum_stats([m.stats for m in memories.values()])
    calls = total.manager_calls
    bad = sum(total.invalid.values()) + sum(total.refused.values())
    out = {"ops": dict(total.ops), "invalid": dict(total.invalid),
           "refused": dict(total.refused), "facts": total.facts, "manager_calls": calls,
           "invalid_rate": bad / calls if calls else None, **total.capacity}
    if config is not None:
        cfg = PipelineConfig.from_mapping(config.memory)
        out.update(manager=cfg.manager, num_slots=cfg.num_slots, full_policy=cfg.full_policy,
                   max_len=cfg.max_len)
    return out


def _ops_note(ops: dict) -> str:
    """One results.md line for :func:`memory_ops`."""
    counts = ", ".join(f"{op} {ops['ops'].get(op, 0)}" for op in ("ADD", "UPDATE", "DELETE",
                                                                   "NOOP"))
    rate = "n/a" if ops["invalid_rate"] is None else f"{ops['invalid_rate']:.3f}"
    budget = (f"; budget {ops['num_slots']} slots per speaker, {ops['full_policy']}"
              if "num_slots" in ops else "")
    return (f"memory ops over {ops['facts']} facts: {counts}; invalid outputs (as NOOP) "
            f"{sum(ops['invalid'].values())}, bank refusals {sum(ops['refused'].values())}, "
            f"{ops['manager_calls']} manager calls (invalid rate {rate}){budget}; full bank: "
            f"{ops.get('bank_full', 0)} ADDs refused, {ops.get('evicted', 0)} memories "
            f"evicted; {ops.get('truncated', 0)} memory texts truncated\n")


def _data_label(config, benchmark: str) -> str:
    """"locomo/test", "longmemeval/oracle", "msc": what was evaluated, for logs and notes."""
    if benchmark == "locomo":
        return f"locomo/{config.split}"
    if benchmark == "longmemeval":
        return f"longmemeval/{config.get('longmemeval_variant') or 'oracle'}"
    return benchmark


def _abstention_note(abstention: dict) -> str:
    """One results.md line: LongMemEval's abstention and other questions, F1 apart."""
    def part(name):
        s = abstention[name]
        return f"{s['n']} {name.replace('_', '-')} (F1 " + (
            "n/a" if s["f1"] is None else f"{s['f1']:.2f}") + ")"
    return f"LongMemEval: {part('abstention')}, {part('non_abstention')}\n"


class AnswerCheckpoint:
    """``<workdir>/answers``: the rows of every conversation answered so far by this config."""

    def __init__(self, workdir: pathlib.Path, config, log=print):
        self.directory = workdir / "answers"
        self.enabled = jax.process_count() == 1
        self.done: dict[str, list[dict]] = {}
        if not self.enabled:
            return
        fields = RI.identity_fields(config)
        stamp = self.directory / "config.json"   # the answering config (its identity fields)
        if stamp.is_file():
            found = RI.identity_fields(json.loads(stamp.read_text()))
            if found != fields:
                raise RI.RunIdentityError(
                    f"{self.directory} holds the answers of an unfinished run with another "
                    f"config ({RI.describe_diff(found, fields)}); remove it to start over, or "
                    "pick another --workdir")
        self.directory.mkdir(parents=True, exist_ok=True)
        RI.record(self.directory, config)   # config.json + run_identity.json (fingerprint)
        self.done = {p.stem: [json.loads(x) for x in p.read_text().splitlines()]
                     for p in sorted(self.directory.glob("*.jsonl"))}
        if self.done:
            log(f"{self.directory}: resuming, {len(self.done)} conversations already answered "
                f"({sum(len(r) for r in self.done.values())} questions)")

    def put(self, conv_id: str, rows: list[dict]) -> None:
        if not self.enabled:
            return
        write_jsonl_atomic(self.directory / f"{conv_id}.jsonl", rows)  # never half-written

    def remove(self) -> None:
        if self.enabled:
            shutil.rmtree(self.directory, ignore_errors=True)


def run(config, workdir, *, policy=None, embedder=None, generate_fn=None, log=print) -> dict:
    """Runs one evaluation; returns ``{"rows", "table", "markdown", "paths", "wall_s"}``."""
    t0 = time.time()
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {config.method!r}")
    workdir = pathlib.Path(workdir)
    RI.check_workdir(workdir, config, log=log, what="an evaluation")  # before any write
    benchmark = benchmark_name(config)
    selected = select_conversations(config)
    n_q = sum(len(q) for _, q in selected)
    log(f"{_data_label(config, benchmark)}: {len(selected)} conversations, {n_q} questions, "
        f"method {config.method}")
    if (config.method == "memory" and config.memory.facts == "observations" and selected
            and not any(c.observations for c, _ in selected)):
        raise ValueError(f"memory.facts='observations' but the selected {benchmark} "
                         "conversations have no observations (only LoCoMo and MSC ship them); "
                         "set --config.memory.facts=llm")
    workdir.mkdir(parents=True, exist_ok=True)
    embedder = embedder or load_embedder()
    base = policy or load_policy_from_config(config)  # model, dtypes, attention chunk
    policy = _trained_policy(base, config.get("checkpoint", ""), log)  # the Answer Agent's
    distill = bool(config.answer.get("distill", True))  # absent in configs before the switch
    _check_distill(config.get("checkpoint", ""), distill, log)
    agent = AnswerAgent(policy, embedder, top_k=config.answer.top_k,
                        max_new_tokens=config.answer.max_new_tokens,
                        batch_size=config.answer.batch_size,
                        temperature=config.answer.temperature, seed=config.seed,
                        generate_fn=generate_fn, distill=distill,
                        share_prefix=config.method == "full_context")  # one context a batch
    memories = {}
    if config.method == "memory":
        memories = process_zero_first(  # several hosts: process 0 builds, the rest load
            lambda: build_memories(config, workdir, selected, base, policy, embedder,
                                   generate_fn, log), "evaluate: memories built")
    ops = memory_ops(memories, config) if memories else None
    coverage = None
    if memories and any(c.observations for c, _ in selected):
        pairs = [evidence_coverage(memories[c.sample_id], c.observations, q) for c, q in selected]
        coverage = {"covered": sum(a for a, _ in pairs), "questions": sum(n for _, n in pairs)}
    window = policy.config.max_position_embeddings
    budget = config.full_context_tokens or (window - config.answer.max_new_tokens - 512)
    count = (lambda s: len(policy.tokenizer(s, add_special_tokens=False)["input_ids"]))

    rows = []
    t_answer = time.time()
    checkpoint = AnswerCheckpoint(workdir, config, log)
    for conv, qas in selected:
        if (done := checkpoint.done.get(conv.sample_id)) is not None and len(done) == len(qas):
            rows.extend(done)
            continue
        questions = [qa.question for qa in qas]
        conv_rows = []
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
            conv_rows.append({"question_id": qa.question_id, "conv_id": qa.conv_id,
                              "question": qa.question, "gold": qa.answer, "prediction": res.answer,
                              "category": qa.category, "f1": s["f1"], "bleu1": s["bleu1"],
                              "em": s["em"],
                              "f1_locomo": (M.locomo_score(res.answer, qa.answer, qa.category)
                                            if benchmark == "locomo"
                                            else M.f1_locomo(res.answer, qa.answer)),
                              "j": None, "answer_line_missing": res.answer_line_missing,
                              "num_invalid_ops": invalid, "num_distilled": len(res.distilled),
                              "output": res.output})
            if benchmark == "longmemeval":
                conv_rows[-1]["abstention"] = is_abstention(qa)
        checkpoint.put(conv.sample_id, conv_rows)
        rows.extend(conv_rows)
        log(f"{conv.sample_id}: {len(qas)} answered ({time.time() - t_answer:.0f} s so far)")

    judge = load_judge() if config.judge else None
    js = judge_scores(judge, [(r["question"], r["gold"], r["prediction"]) for r in rows])
    for r, j in zip(rows, js):
        r["j"] = j

    names = benchmark_categories(benchmark)
    table = M.aggregate_by_category(rows, metrics=("f1", "bleu1", "j"), names=names)
    markdown = M.format_markdown(table)
    abstention = None
    if benchmark == "longmemeval":   # LongMemEval reports abstention apart from the types
        abstention = {k: M.aggregate_by_category(
            [r for r in rows if r["abstention"] == want], metrics=("f1", "bleu1", "j"),
            names=names)["overall"] for k, want in (("abstention", True),
                                                    ("non_abstention", False))}
    missing = sum(r["answer_line_missing"] for r in rows)
    wall = time.time() - t0
    no_distill = " (no distillation)" if config.method == "memory" and not distill else ""
    notes = (f"\nbenchmark {_data_label(config, benchmark)}, method {config.method}{no_distill}, "
             f"model {config.model}, {len(rows)} questions; answer line missing: "
             f"{missing}/{len(rows)}; "
             f"J: {'judge' if judge else 'not computed (no judge configured)'}; "
             f"wall time {wall:.1f} s\n") + (_ops_note(ops) if ops else "") + (
        f"questions with an evidence fact in the banks: {coverage['covered']}/"
        f"{coverage['questions']}\n" if coverage else "") + (
        _abstention_note(abstention) if abstention else "")
    paths = {"jsonl": workdir / "predictions.jsonl", "markdown": workdir / "results.md",
             "json": workdir / "results.json"}
    if not is_main_process():  # every process computed the same rows; process 0 writes them
        return {"rows": rows, "table": table, "markdown": markdown, "paths": paths,
                "wall_s": wall}
    write_jsonl_atomic(paths["jsonl"], rows)   # temp file + rename: never half a file
    write_text_atomic(paths["markdown"], markdown + notes)
    write_text_atomic(paths["json"], json.dumps(
        {"table": table, "benchmark": benchmark,
         "longmemeval_variant": (config.get("longmemeval_variant") or "oracle"
                                 if benchmark == "longmemeval" else None),
         "abstention": abstention, "method": config.method, "model": config.model,
         "checkpoint": config.get("checkpoint", ""),
         "manager_checkpoint": config.memory.get("manager_checkpoint", ""),
         "split": config.split if benchmark == "locomo" else None, "memory_ops": ops,
         "evidence_coverage": coverage,
         "distill": distill if config.method == "memory" else None,
         "num_questions": len(rows), "answer_line_missing": missing,
         "j_computed": judge is not None, "wall_s": wall,
         "run_identity": RI.config_fingerprint(config),
         "config": json.loads(config.to_json())}, indent=2))
    RI.record(workdir, config, config_file=False)   # run_identity.json: a rerun must match
    checkpoint.remove()   # the results hold every row now
    log(markdown + notes)
    return {"rows": rows, "table": table, "markdown": markdown, "paths": paths, "wall_s": wall}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    maybe_initialize_distributed()
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    run_main(main)  # user errors: one line, exit 2 (mr1.entry)
