"""The "without memory distillation" ablation switch (``answer.distill``).

The direct prompt keeps the memories layout of the distillation prompt and asks for the
``**Answer:**`` line only; :class:`AnswerAgent`, ``experiments/evaluate.py``, the Answer Agent's
RL prompts and the Memory Manager task's frozen Answer Agent all follow the switch, and configs
without the field keep distilling. Stand-in ``generate`` / answer functions: no model runs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mr1.agents import prompts as P
from mr1.agents.answer import AnswerAgent, parse_answer
from mr1.agents.pipeline import MemoryBuilder, PipelineConfig
from mr1.data.records import QA
from tests.rl_driver import HashEmbedder
from tests.test_agents import conversation, fake_generate
from tests.test_evaluate import _config, _module

ANSWER_LINE = "**Answer:** <answer in under 6 words>"
LIST_STEP = "First list the memories that are relevant to the question."
MEMS_A, MEMS_B = [("1 May", "Ann adopted a cat."), ("", "Ann likes jazz.")], []


def _split(prompt):
    """(everything up to and including the question line, the instruction after it)."""
    head, _, tail = prompt.partition("\nQuestion: ")
    question, _, instruction = tail.partition("\n")
    return head + "\nQuestion: " + question, instruction


# ----------------------------------------------------------------------------- prompts

def test_direct_prompt_asks_for_the_answer_line_only():
    direct = P.answer_prompt("Where does Bob live?", "Ann", "Bob", MEMS_A, MEMS_B, form="direct")
    distill = P.answer_prompt("Where does Bob live?", "Ann", "Bob", MEMS_A, MEMS_B)
    assert distill == P.answer_prompt("Where does Bob live?", "Ann", "Bob", MEMS_A, MEMS_B,
                                      form="distill")          # the default form is the paper's
    assert LIST_STEP in distill and distill.endswith(ANSWER_LINE)
    # the direct form: no listing step, ends with the answer line instruction
    assert direct.endswith("\n" + ANSWER_LINE)
    assert "list" not in direct.lower() and "relevant" not in direct.lower()
    # the same memories layout: identical up to the question line, only the instruction differs
    head_direct, instr_direct = _split(direct)
    head_distill, instr_distill = _split(distill)
    assert head_direct == head_distill
    assert "- [1 May] Ann adopted a cat.\n- Ann likes jazz." in head_direct
    assert "Memories of Bob:\n(none)" in head_direct
    assert instr_direct == "Reply with one line only:\n" + ANSWER_LINE
    assert instr_distill == LIST_STEP + " Then write one final line:\n" + ANSWER_LINE


def test_answer_prompt_forms_registry_and_unknown_form():
    assert P.ANSWER_PROMPTS == {"distill": P.ANSWER_AGENT, "direct": P.ANSWER_AGENT_DIRECT}
    assert (P.answer_form(True), P.answer_form(False)) == ("distill", "direct")
    for bad in ("json", "", "Direct", None):
        with pytest.raises(ValueError, match=r"answer prompt form must be one of "
                                             r"\['direct', 'distill'\], got"):
            P.answer_prompt("Q?", "Ann", "Bob", MEMS_A, MEMS_B, form=bad)


@pytest.mark.parametrize("text,answer,missing", [
    ("**Answer:** Rome", "Rome", False),
    ("**Answer:** 7 May 2023\n", "7 May 2023", False),
    ("Answer: Rome", "Rome", False),
    ("Rome", "Rome", True),                   # no marker: the line is still the answer
])
def test_answer_only_outputs_distil_nothing(text, answer, missing):
    p = parse_answer(text)
    assert (p.answer, p.distilled, p.answer_line_missing) == (answer, (), missing)


# ----------------------------------------------------------------------------- AnswerAgent

def _agent_prompts(distill):
    conv = conversation()
    mem = MemoryBuilder(PipelineConfig(num_slots=8, max_len=16), HashEmbedder()).build(conv)
    gen = fake_generate(lambda p: "- Bob moved to Rome\n**Answer:** Rome" if LIST_STEP in p
                        else "**Answer:** Rome")
    kw = {} if distill is None else {"distill": distill}
    agent = AnswerAgent(None, HashEmbedder(), top_k=1, batch_size=8, generate_fn=gen, **kw)
    qas = [conv.qas[0], QA("What is the cat called?", "Tom", (), 4, "c1")]
    return agent, agent.answer(conv, mem, qas), gen.calls


def test_answer_agent_without_distillation_builds_the_direct_prompt():
    agent, results, calls = _agent_prompts(False)
    assert (agent.distill, agent.prompt_form) == (False, "direct")
    assert len(calls) == 1 and len(calls[0]) == 2
    for prompt in calls[0]:
        assert prompt.endswith("\n" + ANSWER_LINE) and LIST_STEP not in prompt
        assert prompt.count("\n- [") == 2                      # still 1 memory per speaker
    assert [r.answer for r in results] == ["Rome", "Rome"]
    assert all(r.distilled == () and not r.answer_line_missing for r in results)

    base, base_results, base_calls = _agent_prompts(None)     # default: distillation (paper)
    assert (base.distill, base.prompt_form) == (True, "distill")
    assert all(LIST_STEP in p for p in base_calls[0])
    assert [r.distilled for r in base_results] == [("Bob moved to Rome",)] * 2
    # same retrieval either way: the prompts differ only in the instruction
    assert [_split(p)[0] for p in calls[0]] == [_split(p)[0] for p in base_calls[0]]


# ----------------------------------------------------------------------------- evaluate.py

@pytest.fixture(scope="module")
def tiny_policy():
    from mr1.models import load_policy

    return load_policy("tiny", seed=0)


def _eval(tmp_path, tiny_policy, config):
    ev = _module("evaluate")
    gen = fake_generate(lambda p: "- Caroline went to a group\n**Answer:** Oslo"
                        if LIST_STEP in p else "**Answer:** Oslo")
    out = ev.run(config, tmp_path, policy=tiny_policy, embedder=HashEmbedder(),
                 generate_fn=gen, log=lambda s: None)
    return out, json.loads(out["paths"]["json"].read_text()), [p for c in gen.calls for p in c]


def test_evaluate_without_distillation_records_the_flag(tmp_path, locomo_available,
                                                        tiny_policy):
    config = _config()
    config.answer.distill = False
    out, saved, prompts = _eval(tmp_path / "direct", tiny_policy, config)
    assert saved["distill"] is False and saved["config"]["answer"]["distill"] is False
    assert len(prompts) == 2 == saved["num_questions"]
    assert all(p.endswith("\n" + ANSWER_LINE) and LIST_STEP not in p for p in prompts)
    rows = [json.loads(x) for x in out["paths"]["jsonl"].read_text().splitlines()]
    assert [r["num_distilled"] for r in rows] == [0, 0]
    assert [r["prediction"] for r in rows] == ["Oslo", "Oslo"]
    assert "method memory (no distillation)" in out["paths"]["markdown"].read_text()

    # the default distils; a config from before the switch (no answer.distill) too
    out, saved, prompts = _eval(tmp_path / "distill", tiny_policy, _config())
    assert saved["distill"] is True and saved["config"]["answer"]["distill"] is True
    assert all(LIST_STEP in p for p in prompts) and [r["num_distilled"] for r in out["rows"]] \
        == [1, 1]
    old = _config()
    del old.answer["distill"]
    out, saved, prompts = _eval(tmp_path / "old", tiny_policy, old)
    assert saved["distill"] is True and "distill" not in saved["config"]["answer"]
    assert all(LIST_STEP in p for p in prompts)
    assert "no distillation" not in out["paths"]["markdown"].read_text()


def test_evaluate_notes_a_checkpoint_trained_with_the_other_setting(tmp_path):
    ev = _module("evaluate")
    run = tmp_path / "grpo_answer_nodistill"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"answer": {"top_k": 5, "distill": False}}))
    logs = []
    ev._check_distill(str(run / "checkpoints"), True, logs.append)
    assert logs == [(f"note: {run / 'checkpoints'} was trained with answer.distill=False, "
                     "evaluating with answer.distill=True")]
    logs.clear()
    ev._check_distill(str(run / "checkpoints"), False, logs.append)    # same setting: quiet
    ev._check_distill("", False, logs.append)                          # base model: quiet
    assert logs == []


# ----------------------------------------------------------------------------- RL tasks

@pytest.fixture(scope="module")
def smollm2_tiny(embedded_gguf):
    from mr1.models import load_policy
    from mr1.models.policy import load_tokenizer_from_gguf

    return load_policy("tiny-smollm2", tokenizer=load_tokenizer_from_gguf(embedded_gguf), seed=0)


def test_answer_rl_prompts_follow_the_switch(tmp_path, locomo_available, smollm2_tiny):
    import runpy

    from mr1.rl.answer_task import build_prompt_set
    from tests.test_evaluate import CONFIGS

    def first_prompt(distill):
        config = runpy.run_path(str(CONFIGS / "locomo_tiny_rl.py"))["get_config"]()
        if distill is None:
            del config.answer["distill"]                         # a run config from before
        else:
            assert config.answer.distill is True                 # inherited default
            config.answer.distill = distill
        ps = build_prompt_set(config, "validation", smollm2_tiny, HashEmbedder(),
                              tmp_path / "memory", max_questions=2, log=lambda s: None)
        assert len(ps) == 2
        row = ps.ids[0][ps.mask[0].astype(bool)]
        return smollm2_tiny.tokenizer.decode(row.tolist()), ps.length

    direct, len_direct = first_prompt(False)
    distill, len_distill = first_prompt(True)
    assert ANSWER_LINE in direct and "Reply with one line only:" in direct
    assert LIST_STEP not in direct and LIST_STEP in distill
    assert first_prompt(None)[0] == distill
    assert len_direct <= len_distill


def test_manager_task_frozen_answer_agent_follows_the_switch(smollm2_tiny):
    from tests import test_memory_task as TMT

    conv = TMT.make_conv()
    data = TMT.MT.build_manager_data([(conv, conv.qas)], TMT.CFG, TMT.EMB,
                                     TMT.make_tokenize(smollm2_tiny),
                                     pad_id=smollm2_tiny.pad_token_id)
    outputs = [TMT.op_json("ADD", "0", TMT.TOM_FACT), TMT.op_json("NONE")]
    rewards = {}
    for distill in (False, True):
        agent = TMT.CatAgent()
        task = TMT.MT.ManagerTask(data, data, smollm2_tiny, TMT.EMB, TMT.CFG, {"em": 1.0}, 0.0,
                                  reply_max_new_tokens=8, answer_top_k=8, answer_fn=agent,
                                  answer_distill=distill)
        out = task.score_outputs(data, [TMT.TOM], outputs, group=2)
        rewards[distill] = out["reward"]
        prompts = [p for c in agent.calls for p in c]
        assert len(prompts) == 2 and all(p.endswith(ANSWER_LINE) for p in prompts)
        assert all((LIST_STEP in p) == distill for p in prompts)
        assert all(("Reply with one line only:" in p) != distill for p in prompts)
    # CatAgent answers from the memories shown, so the ops earn the same either way
    np.testing.assert_array_equal(rewards[False], [1.0, 0.0])
    np.testing.assert_array_equal(rewards[True], rewards[False])
