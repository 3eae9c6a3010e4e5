"""evaluate.py for the Memory-R1 ablation grid: the manager and the Answer Agent each get their
own checkpoint, a memory dir is tied to the manager that built it (manager.json), and
results.json sums the manager's ops.

Driven with the random ``tiny`` policy (no tokenizer: banks hold UTF-8 bytes) and a stand-in
``generate`` that records which params each call saw, so no model runs.
"""

from __future__ import annotations

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.rl_driver import HashEmbedder
from tests.test_agents import fake_generate
from tests.test_evaluate import _config, _module

OFFSETS = {"": 0.0, "A": 1.0, "B": 2.0}   # checkpoint name -> params = base + offset


@pytest.fixture(scope="module")
def tiny_policy():
    from mr1.models import load_policy

    return load_policy("tiny", seed=0)


@pytest.fixture(scope="module")
def checkpoints(tiny_policy, tmp_path_factory):
    """Two full fine-tuning runs, ``A`` (base + 1) and ``B`` (base + 2), as trainer checkpoints."""
    from mr1.checkpoint import Checkpointer

    root = tmp_path_factory.mktemp("runs")
    paths = {"": ""}
    for name in ("A", "B"):
        params = jax.tree.map(lambda x, d=OFFSETS[name]: x + d, tiny_policy.params)
        state = {"params": {"policy": params}, "opt_state": {}, "step": jnp.int32(7)}
        with Checkpointer(root / name / "checkpoints", save_every=1) as c:
            c.save(7, state, force=True)
        paths[name] = str(root / name / "checkpoints")
    return paths


def _marker(policy, base):
    """Which offset ``policy``'s params carry relative to ``base`` (0, 1 or 2)."""
    leaf = np.asarray(jax.tree.leaves(policy.params)[0]).ravel()[0]
    return round(float(leaf - np.asarray(jax.tree.leaves(base.params)[0]).ravel()[0]), 3)


def manager_reply(prompt):
    """A deterministic mix of ADD / UPDATE / NOOP / invalid manager outputs, by fact."""
    fact = prompt.split("New fact: ")[1].split("\n")[0].replace('"', "'")
    kind = len(fact) % 4
    if kind == 1:
        return '{"memory": [{"id": "0", "event": "NONE"}]}'
    if kind == 2:
        return "garbage"                                             # invalid: no operation
    if kind == 3 and "[0] " in prompt:
        return '{"memory": [{"id": "0", "text": "' + fact + '", "event": "UPDATE"}]}'
    return '{"memory": [{"id": "0", "text": "' + fact + '", "event": "ADD"}]}'


def recording_generate(base):
    """A generate stand-in replying to manager and answer prompts; ``gen.seen`` holds
    ``(role, params offset)`` per call."""
    seen = []

    def replies(prompt):
        return manager_reply(prompt) if "New fact: " in prompt else "**Answer:** Oslo"

    inner = fake_generate(replies)

    def gen(policy, prompts, **kw):
        seen.append(("manager" if "New fact: " in prompts[0] else "answer", _marker(policy, base)))
        return inner(policy, prompts, **kw)

    gen.seen = seen
    return gen


def _memory_config(manager="llm", manager_checkpoint="", checkpoint="", **overrides):
    c = _config(**overrides)
    c.memory.manager = manager
    c.memory.manager_checkpoint = manager_checkpoint
    c.checkpoint = checkpoint
    return c


@pytest.mark.parametrize("manager_ckpt, answer_ckpt",
                         [("", ""), ("A", ""), ("", "B"), ("A", "B"), ("A", "A")])
def test_manager_and_answer_checkpoints_go_to_their_component(
        tmp_path, locomo_available, tiny_policy, checkpoints, manager_ckpt, answer_ckpt):
    ev = _module("evaluate")
    gen = recording_generate(tiny_policy)
    config = _memory_config(manager_checkpoint=checkpoints[manager_ckpt],
                            checkpoint=checkpoints[answer_ckpt])
    out = ev.run(config, tmp_path, policy=tiny_policy, embedder=HashEmbedder(),
                 generate_fn=gen, log=lambda s: None)
    roles = collections.defaultdict(set)
    for role, offset in gen.seen:
        roles[role].add(offset)
    assert roles == {"manager": {OFFSETS[manager_ckpt]}, "answer": {OFFSETS[answer_ckpt]}}
    saved = json.loads(out["paths"]["json"].read_text())
    assert saved["manager_checkpoint"] == checkpoints[manager_ckpt]
    assert saved["checkpoint"] == checkpoints[answer_ckpt]
    manager = json.loads((tmp_path / "memory" / "manager.json").read_text())
    budget = {k: manager.pop(k) for k in ("num_slots", "full_policy", "max_len", "max_sessions")}
    assert manager == {"manager": "llm", "manager_checkpoint": checkpoints[manager_ckpt],
                       "model": config.model, "facts": "observations"}
    assert budget == {"num_slots": config.memory.num_slots, "max_len": config.memory.max_len,
                      "full_policy": config.memory.full_policy,
                      "max_sessions": config.memory.max_sessions}


def test_memory_dir_of_another_manager_is_refused(tmp_path, locomo_available, tiny_policy,
                                                  checkpoints, monkeypatch):
    ev = _module("evaluate")
    kw = {"policy": tiny_policy, "embedder": HashEmbedder(),
          "generate_fn": recording_generate(tiny_policy)}
    ev.run(_memory_config(), tmp_path, log=lambda s: None, **kw)          # prompted manager
    done = tmp_path / "memory" / "conv-30" / "memory.json"
    stamp = done.stat().st_mtime_ns

    logs = []
    ev.run(_memory_config(), tmp_path, log=logs.append, **kw)             # same: resumes
    assert "conv-30: done, loading" in logs and done.stat().st_mtime_ns == stamp

    monkeypatch.setenv("MR1_ALLOW_CONFIG_CHANGE", "1")   # past the workdir's run identity
    for other in (_memory_config(manager_checkpoint=checkpoints["A"]),    # the RL manager
                  _memory_config(manager="add_all")):
        with pytest.raises(ValueError, match="pick another --config.memory.dir"):
            ev.run(other, tmp_path, log=lambda s: None, **kw)
    assert done.stat().st_mtime_ns == stamp

    (tmp_path / "memory" / "manager.json").unlink()      # banks from before manager.json
    logs.clear()
    ev.run(_memory_config(manager="add_all"), tmp_path, log=logs.append, **kw)
    assert "conv-30: done, loading" in logs and done.stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "memory" / "manager.json").read_text())["manager"] == "add_all"


def test_results_sum_the_manager_ops(tmp_path, locomo_available, tiny_policy):
    from mr1.agents.pipeline import load_memory
    from mr1.eval.plots import op_counts_from_results

    ev = _module("evaluate")
    config = _memory_config(split="test", max_conversations=2, max_questions=0)
    config.max_questions_per_conversation = 1
    out = ev.run(config, tmp_path, policy=tiny_policy, embedder=HashEmbedder(),
                 generate_fn=recording_generate(tiny_policy), log=lambda s: None)
    convs = sorted({r["conv_id"] for r in out["rows"]})
    assert len(convs) == 2
    stats = [load_memory(tmp_path / "memory", c).stats for c in convs]
    want = {k: dict(sum((getattr(s, k) for s in stats), collections.Counter()))
            for k in ("ops", "invalid", "refused")}
    ops = json.loads(out["paths"]["json"].read_text())["memory_ops"]
    assert {k: ops[k] for k in want} == want
    assert ops["facts"] == sum(s.facts for s in stats) > 0
    assert ops["manager_calls"] == sum(s.manager_calls for s in stats) == ops["facts"]
    n_bad = sum(ops["invalid"].values()) + sum(ops["refused"].values())
    assert ops["invalid_rate"] == pytest.approx(n_bad / ops["manager_calls"])
    assert {"ADD", "NOOP"} <= set(ops["ops"]) and ops["invalid"]["no_operation"] > 0
    assert stats[0].ops != stats[1].ops or stats[0].facts != stats[1].facts  # a real sum
    counts = op_counts_from_results(out["paths"]["json"])
    assert counts["INVALID"] == n_bad and counts["ADD"] == ops["ops"]["ADD"]
    assert counts["NOOP"] == ops["ops"]["NOOP"] - sum(ops["invalid"].values())
    assert f"memory ops over {ops['facts']} facts: ADD {ops['ops']['ADD']}," in (
        out["paths"]["markdown"].read_text())
