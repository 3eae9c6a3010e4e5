"""mr1.agents: answer-line parsing, the memory pipeline on a hand-made conversation, prompts.

No LLM runs here: the manager's generate is a stand-in returning fixed JSON, and the embedder is
a deterministic hash embedding, so the file takes seconds.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from mr1.agents import prompts as P
from mr1.agents.answer import AnswerAgent, parse_answer
from mr1.agents.pipeline import (MemoryBuilder, PipelineConfig, is_done, load_memory,
                                 parse_facts, save_memory)
from mr1.data.records import QA, Conversation, Observation, Session, Turn
from tests.rl_driver import HashEmbedder  # the shared bag-of-words test embedder




def fake_generate(replies):
    """A generate stand-in: returns ``replies(prompt)`` for each prompt; records the calls."""
    calls, kwargs = [], []

    def gen(policy, prompts, max_new_tokens=32, temperature=0.0, **kw):
        calls.append(list(prompts))
        kwargs.append(kw)
        return types.SimpleNamespace(texts=[replies(p) for p in prompts])

    gen.calls, gen.kwargs = calls, kwargs
    return gen


def conversation():
    s1 = Session(1, "1 May 2023", (Turn("Ann", "I adopted a cat.", "D1:1", 1, "1 May 2023"),
                                  Turn("Bob", "I live in Oslo.", "D1:2", 1, "1 May 2023")))
    s2 = Session(2, "9 May 2023", (Turn("Ann", "My cat is named Tom.", "D2:1", 2, "9 May 2023"),
                                  Turn("Bob", "I moved to Rome.", "D2:2", 2, "9 May 2023")))
    obs = (Observation(1, "Ann", "Ann adopted a cat."), Observation(1, "Bob", "Bob lives in Oslo."),
           Observation(2, "Ann", "Ann's cat is named Tom."),
           Observation(2, "Bob", "Bob moved to Rome."), Observation(2, "Zed", "Not a speaker."))
    qa = QA("Where does Bob live?", "Rome", ("D2:2",), 4, "c1", question_id="c1/q0")
    return Conversation("c1", "Ann", "Bob", (s1, s2), (qa,), obs)


# ----------------------------------------------------------------------------- parse_answer

@pytest.mark.parametrize("text,answer,distilled,missing", [
    ("- Bob lives in Rome\n**Answer:** Rome", "Rome", ("Bob lives in Rome",), False),
    ("**Answer:** 7 May 2023.", "7 May 2023.", (), False),
    ("Answer: Rome", "Rome", (), False),
    ("**Answer**: \"Rome\"", "Rome", (), False),
    ("mem\n**Answer:**\n\n Rome \n", "Rome", ("mem",), False),
    ("**Answer:** Oslo\n**Answer:** Rome", "Rome", ("Oslo",), False),   # last marker wins
    ("1. a memory\n2. another\nRome", "Rome", ("a memory", "another"), True),
    ("Rome", "Rome", (), True),
    ("", "", (), True),
    ("  \n \n", "", (), True),
    (None, "", (), True),
])
def test_parse_answer(text, answer, distilled, missing):
    p = parse_answer(text)
    assert (p.answer, p.distilled, p.answer_line_missing) == (answer, distilled, missing)


def test_parse_facts():
    assert parse_facts("Facts:\n- Ann has a cat.\n2) Ann likes Tom\nNONE\n\n", 4) == [
        "Ann has a cat.", "Ann likes Tom"]
    assert parse_facts("a\nb\nc", 2) == ["a", "b"]
    assert parse_facts("", 3) == []


def test_prompts_contain_pieces():
    p = P.answer_prompt("Q?", "Ann", "Bob", [("1 May", "m1")], [])
    assert "**Answer:**" in p and "- [1 May] m1" in p and "(none)" in p and "Q?" in p
    m = P.memory_manager_prompt("Ann", "fact", [(0, "old")])
    assert '"memory"' in m and "[0] old" in m and "fact" in m


# ----------------------------------------------------------------------------- pipeline

def test_observations_add_all_builds_per_speaker_banks():
    b = MemoryBuilder(PipelineConfig(num_slots=8, max_len=16), HashEmbedder())
    mem = b.build(conversation())
    ann, bob = mem.by_name("Ann"), mem.by_name("Bob")
    assert [t for _, t, _ in ann.items()] == ["Ann adopted a cat.", "Ann's cat is named Tom."]
    assert [(t, ts) for _, t, ts in bob.items()] == [("Bob lives in Oslo.", "1 May 2023"),
                                                     ("Bob moved to Rome.", "9 May 2023")]
    assert mem.stats.facts == 4 and mem.stats.skipped_facts == 1
    assert mem.stats.ops["ADD"] == 4 and mem.stats.num_invalid == 0
    assert np.asarray(bob.bank.speaker)[:2].tolist() == [1, 1]
    # bank tokens are UTF-8 bytes without a policy, truncated to max_len
    row = np.asarray(ann.bank.tokens[0])[: int(ann.bank.lengths[0])]
    assert bytes(row.tolist()).decode() == "Ann adopted a cat."[:16]


def test_llm_manager_applies_update_delete_and_counts_invalid():
    def replies(prompt):
        if "New fact: Bob moved to Rome." in prompt:     # memory [0] is "Bob lives in Oslo."
            assert "[0] Bob lives in Oslo." in prompt
            return ('{"memory": [{"id": "0", "text": "Bob moved from Oslo to Rome.", '
                    '"event": "UPDATE", "old_memory": "Bob lives in Oslo."}]}')
        if "New fact: Ann's cat is named Tom." in prompt:
            return '{"memory": [{"id": "7", "event": "DELETE"}]}'   # id not shown -> invalid
        if "New fact: Ann adopted a cat." in prompt:
            return "garbage"                                      # no operation -> invalid
        return '{"memory": [{"id": "0", "text": "' + prompt.split("New fact: ")[1].split(
            "\n")[0] + '", "event": "ADD"}]}'

    gen = fake_generate(replies)
    cfg = PipelineConfig(facts="observations", manager="llm", num_slots=8, max_len=16)
    mem = MemoryBuilder(cfg, HashEmbedder(), policy=types.SimpleNamespace(tokenizer=None,
                                                                          pad_token_id=0),
                        generate_fn=gen).build(conversation())
    assert len(gen.calls) == 2 and [len(c) for c in gen.calls] == [2, 2]   # one call/session
    assert [t for _, t, _ in mem.by_name("Bob").items()] == ["Bob moved from Oslo to Rome."]
    assert mem.by_name("Bob").items()[0][2] == "9 May 2023"
    assert mem.by_name("Ann").items() == []
    assert mem.stats.ops == {"ADD": 1, "UPDATE": 1, "NOOP": 2}
    assert mem.stats.invalid == {"unknown_id": 1, "no_operation": 1}
    assert mem.stats.num_invalid == 2


def test_delete_then_update_same_slot_is_refused_not_raised():
    def replies(prompt):
        if "Bob moved to Rome." in prompt:
            return ('{"memory": [{"id": "0", "event": "DELETE"}, '
                    '{"id": "0", "text": "x", "event": "UPDATE"}]}')
        fact = prompt.split("New fact: ")[1].split("\n")[0]
        return '{"memory": [{"id": "0", "text": "' + fact + '", "event": "ADD"}]}'

    cfg = PipelineConfig(manager="llm", num_slots=8, max_len=16)
    mem = MemoryBuilder(cfg, HashEmbedder(), policy=types.SimpleNamespace(tokenizer=None),
                        generate_fn=fake_generate(replies)).build(conversation())
    assert mem.by_name("Bob").items() == []
    assert mem.stats.refused == {"bad_target": 1}


def _renamed(conv, sample_id, sessions=None):
    """``conv`` under another id (optionally only its first ``sessions`` sessions)."""
    return Conversation(sample_id, conv.speaker_a, conv.speaker_b,
                        conv.sessions[:sessions] if sessions else conv.sessions, conv.qas,
                        conv.observations)


def _echo_manager(prompt):
    """UPDATE memory 0 when a fact names Rome and a memory is shown, else ADD the fact; facts
    extracted by echoing the turn."""
    if "New fact: " not in prompt:                     # fact extraction: echo the turn
        return "- " + prompt.split("\n\nFacts:")[0].rsplit("\n", 1)[-1]
    fact = prompt.split("New fact: ")[1].split("\n")[0]
    if "Rome" in fact and "[0]" in prompt:
        return '{"memory": [{"id": "0", "text": "' + fact + '", "event": "UPDATE"}]}'
    return '{"memory": [{"id": "0", "text": "' + fact + '", "event": "ADD"}]}'


@pytest.mark.parametrize("facts", ["observations", "llm"])
def test_lockstep_build_equals_one_at_a_time(facts, tmp_path):
    """build_many over 3 conversations (one shorter) makes the banks build() makes alone,
    with one generate call per lockstep stage instead of one per conversation and stage."""
    from mr1.agents.pipeline import build_all

    conv = conversation()
    convs = [_renamed(conv, "a"), _renamed(conv, "b", sessions=1), _renamed(conv, "c")]
    cfg = PipelineConfig(facts=facts, manager="llm", num_slots=8, max_len=16)
    policy = types.SimpleNamespace(tokenizer=None, pad_token_id=0)
    alone_gen = fake_generate(_echo_manager)
    alone = [MemoryBuilder(cfg, HashEmbedder(), policy=policy, generate_fn=alone_gen).build(c)
             for c in convs]
    gen = fake_generate(_echo_manager)
    together = MemoryBuilder(cfg, HashEmbedder(), policy=policy, generate_fn=gen).build_many(
        convs)
    stages = 2 if facts == "llm" else 1                # extraction + manager per session
    assert len(alone_gen.calls) == stages * (2 + 1 + 2)
    assert len(gen.calls) == stages * 2                # one per stage of the 2 lockstep steps
    for a, t in zip(alone, together):
        assert a.sample_id == t.sample_id
        assert [s.items() for s in a.speakers] == [s.items() for s in t.speakers]
        assert a.stats.to_dict() == t.stats.to_dict()
        for sa, st in zip(a.speakers, t.speakers):
            np.testing.assert_array_equal(sa.bank.tokens, st.bank.tokens)
    assert together[0].stats.ops["UPDATE"] == 1        # Bob moved to Rome: memory rewritten
    assert together[1].stats.ops.get("UPDATE", 0) == 0  # "b" stops after session 1

    # build_all with conversations_per_batch=2: groups [a, b], [c]; all saved, same banks
    cfg2 = PipelineConfig(facts=facts, manager="llm", num_slots=8, max_len=16,
                          conversations_per_batch=2)
    gen2 = fake_generate(_echo_manager)
    out = build_all(MemoryBuilder(cfg2, HashEmbedder(), policy=policy, generate_fn=gen2),
                    convs, tmp_path, progress=False, log=lambda s: None)
    assert list(out) == ["a", "b", "c"] and len(gen2.calls) == stages * (2 + 2)
    for a in alone:
        assert is_done(tmp_path, a.sample_id)
        assert [s.items() for s in load_memory(tmp_path, a.sample_id).speakers] == \
            [s.items() for s in a.speakers]


def test_lockstep_saves_a_short_conversation_before_the_group_ends(tmp_path):
    """on_done fires when a conversation's last session is applied: an interruption in a
    later session of the group keeps the shorter conversation's banks."""
    from mr1.agents.pipeline import build_all

    conv = conversation()
    convs = [_renamed(conv, "long"), _renamed(conv, "short", sessions=1)]

    def interrupting(prompt):
        if "Rome" in prompt:                            # session 2 of "long" only
            raise KeyboardInterrupt("simulated interruption")
        return _echo_manager(prompt)

    cfg = PipelineConfig(manager="llm", num_slots=8, max_len=16)
    builder = MemoryBuilder(cfg, HashEmbedder(), policy=types.SimpleNamespace(
        tokenizer=None, pad_token_id=0), generate_fn=fake_generate(interrupting))
    with pytest.raises(KeyboardInterrupt):
        build_all(builder, convs, tmp_path, progress=False, log=lambda s: None)
    assert is_done(tmp_path, "short") and not is_done(tmp_path, "long")


def test_conversations_per_batch_must_be_positive():
    with pytest.raises(ValueError, match="conversations_per_batch"):
        PipelineConfig(conversations_per_batch=0)


def test_save_load_roundtrip(tmp_path):
    mem = MemoryBuilder(PipelineConfig(num_slots=8, max_len=16), HashEmbedder()).build(
        conversation())
    save_memory(mem, tmp_path)
    assert is_done(tmp_path, "c1") and not list(tmp_path.glob(".*tmp"))
    back = load_memory(tmp_path, "c1")
    assert back.by_name("Bob").items() == mem.by_name("Bob").items()
    np.testing.assert_array_equal(back.speakers[0].bank.embeddings,
                                  mem.speakers[0].bank.embeddings)
    assert back.stats.to_dict() == mem.stats.to_dict()


def test_answer_agent_one_generate_call_per_batch():
    conv = conversation()
    mem = MemoryBuilder(PipelineConfig(num_slots=8, max_len=16), HashEmbedder()).build(conv)
    gen = fake_generate(lambda p: "- Bob moved to Rome\n**Answer:** Rome" if "Bob live" in p
                        else "no marker here")
    agent = AnswerAgent(None, HashEmbedder(), top_k=1, batch_size=8, generate_fn=gen)
    qas = [conv.qas[0], QA("What is the cat called?", "Tom", (), 4, "c1")]
    res = agent.answer(conv, mem, qas)
    assert len(gen.calls) == 1 and len(gen.calls[0]) == 2
    assert res[0].answer == "Rome" and not res[0].answer_line_missing
    assert res[1].answer_line_missing and res[1].answer == "no marker here"
    # top_k=1 per speaker: exactly one memory line of each speaker
    assert gen.calls[0][0].count("\n- [") == 2
