"""RL pieces: advantages (GRPO groups, RLOO, GAE; :data:`ESTIMATORS`), losses (GRPO, PPO
actor/critic), rewards (:data:`REWARDS`), the train step (:mod:`mr1.rl.runner`: one
``RunnerState``, :func:`make_train_step`) and the loop (:mod:`mr1.rl.trainer`)."""

from mr1.rl.advantages import ESTIMATORS, gae, group_advantages, register_estimator
from mr1.rl.losses import (aggregate, entropy_from_logits, grpo_loss, kl_penalty, ppo_actor_loss,
                           ppo_value_loss, token_logprobs)
from mr1.rl.rewards import REWARDS, combined_reward, get_reward, register_reward

__all__ = ["ESTIMATORS", "gae", "group_advantages", "register_estimator", "aggregate",
           "entropy_from_logits", "grpo_loss", "kl_penalty", "ppo_actor_loss", "ppo_value_loss",
           "token_logprobs", "REWARDS", "combined_reward", "get_reward", "register_reward"]
