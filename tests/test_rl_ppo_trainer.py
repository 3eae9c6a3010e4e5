"""The PPO trainer end to end on the tiny config (in process): rollout -> one jitted step (value
pass, GAE, update), twice, with the critic and actor learning; the host sends the rollout and
its rewards only."""

import jax
import numpy as np
import pytest

from mr1.rl import rewards
from mr1.rl.answer_task import AnswerTask
from mr1.models.trained import load_policy_from_config
from mr1.rl.trainer import Trainer, prepare_workdir
from tests.rl_driver import HashEmbedder, make_config, toy_reward


@pytest.fixture(scope="module")
def ppo_trainer(tmp_path_factory):
    if "toy" not in rewards.REWARDS:
        rewards.register_reward("toy")(toy_reward)
    config = make_config({"algo": "ppo", "num_steps": 2, "eval.every": 0})
    workdir = prepare_workdir(config, tmp_path_factory.mktemp("ppo"))
    policy = load_policy_from_config(config)
    try:
        task = AnswerTask.from_config(config, policy, HashEmbedder(), workdir, lambda s: None)
    except FileNotFoundError as e:
        pytest.skip(f"LoCoMo data unavailable: {e}")
    return Trainer(config, workdir, policy, task, log=lambda s: None)


def test_ppo_step_is_one_device_program(ppo_trainer):
    """The PPO trainer's runner holds the critic; its step sends the rollout and the rewards
    and reads back scalar metrics only (GAE, values and advantages stay on the devices; their
    equality with the host GAE of before is tests/test_rl_runner.py's)."""
    t = ppo_trainer
    assert t.step_fn.sc.estimator == "gae" and "value_head" in t.state.params
    arrays, _ = t.rollout(0)
    batch, rewards = t.step_fn.device_batch(arrays)
    assert batch.advantages is None and batch.returns is None and batch.old_values is None
    np.testing.assert_array_equal(np.asarray(rewards).ravel(), arrays["rewards"])
    assert np.std(arrays["rewards"]) > 0  # the toy reward varies: a real advantage signal


def test_ppo_runs_and_learns(ppo_trainer):
    t = ppo_trainer
    before = jax.device_get(t.state.params)
    summary = t.run()
    assert int(jax.device_get(t.state.step)) == 2
    after = jax.device_get(t.state.params)
    for part in ("policy", "value_head"):   # the actor and the critic both moved
        moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[part]),
                                                          jax.tree.leaves(after[part]))]
        assert any(moved), part
    rows = (t.workdir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 3 and "vf_loss" in header
    last = dict(zip(header, rows[-1].split(",")))
    assert np.isfinite(float(last["loss"])) and float(last["skipped"]) == 0
    assert summary is not None
