"""The trainer keeps the params of the best validation F1 (``<workdir>/best``, ``best.json``)
and ``evaluate.py``'s loader reads them: RL on 152 questions over-fits, so the last step is not
the one to evaluate."""

import json

import jax
import numpy as np
import pytest

from mr1.rl import rewards
from mr1.rl.trainer import Trainer, load_trained_params, run_config, train
from mr1.run_identity import config_fingerprint
from tests.rl_driver import HashEmbedder, make_config, restore_policy_params, toy_reward


def test_best_validation_checkpoint(tmp_path, monkeypatch):
    if "toy" not in rewards.REWARDS:
        rewards.register_reward("toy")(toy_reward)
    config = make_config({"num_steps": 4, "eval.every": 1, "checkpoint_every": 1,
                          "checkpoint_keep": 10})
    scores = iter([1.0, 2.0, 5.0, 3.0, 4.0])  # steps 0..4: step 2 is the best
    monkeypatch.setattr(Trainer, "validate", lambda self: {"val_f1": next(scores)})
    try:
        train(config, tmp_path, embedder=HashEmbedder(), log=lambda s: None)
    except FileNotFoundError as e:
        pytest.skip(f"LoCoMo data unavailable: {e}")
    best = json.loads((tmp_path / "best.json").read_text())
    assert best.pop("run_identity") == config_fingerprint(config)  # whose best it is
    assert best == {"step": 2, "val_f1": 5.0}
    want = restore_policy_params(tmp_path, step=2)["policy"]
    later = restore_policy_params(tmp_path, step=4)["policy"]
    got = load_trained_params(tmp_path / "best", later, run=run_config(tmp_path / "best"))
    leaves = list(zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(later)))
    for g, w, _ in leaves:
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert any(not np.array_equal(np.asarray(w), np.asarray(x)) for _, w, x in leaves)
