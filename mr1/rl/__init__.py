"""RL pieces: advantages (GRPO groups, GAE), losses (GRPO, PPO actor/critic), rewards."""

from mr1.rl.advantages import gae, group_advantages
from mr1.rl.losses import (LOSSES, aggregate, entropy_from_logits, get_loss, grpo_loss,
                           kl_penalty, ppo_actor_loss, ppo_value_loss, register_loss,
                           token_logprobs)
from mr1.rl.rewards import REWARDS, combined_reward, get_reward, register_reward

__all__ = ["gae", "group_advantages", "LOSSES", "aggregate", "entropy_from_logits", "get_loss",
           "grpo_loss", "kl_penalty", "ppo_actor_loss", "ppo_value_loss", "register_loss",
           "token_logprobs", "REWARDS", "combined_reward", "get_reward", "register_reward"]
