"""The PPO trainer end to end on the tiny config (in process): rollout -> value pass -> GAE ->
update, twice, with the critic and actor learning; and the update batch that reuses the value
pass's device arrays (only advantages / returns / old values are sent again) equals a batch
sent whole."""

import jax
import numpy as np
import pytest

from mr1.rl import rewards
from mr1.rl.answer_task import AnswerTask
from mr1.rl.trainer import Trainer, load_policy_from_config, prepare_workdir
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


def test_update_batch_reuses_the_value_pass_arrays(ppo_trainer):
    t = ppo_trainer
    arrays, _ = t.rollout(0)
    arrays, sent = t.advantages(arrays)
    assert sent is not None and arrays["advantages"].shape == arrays["tokens"].shape
    fields = ("advantages", "returns", "old_values")
    reused = t._to_batch(arrays, sent, fields)
    whole = t._to_batch(arrays)
    for name in whole.__dataclass_fields__:
        np.testing.assert_array_equal(np.asarray(getattr(reused, name)),
                                      np.asarray(getattr(whole, name)), err_msg=name)
        if name not in fields:  # the same device arrays, not a second transfer
            assert getattr(reused, name) is getattr(sent, name)
    assert np.abs(np.asarray(reused.advantages)).sum() > 0


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
