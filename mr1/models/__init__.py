"""Models: configs, the Flax decoder, weight loaders and the Policy."""

from mr1.models.config import ModelConfig, RopeScaling, get_config, preset_names
from mr1.models.policy import Policy, load_policy
from mr1.models.weights import WeightLoadError

__all__ = ["ModelConfig", "RopeScaling", "get_config", "preset_names", "Policy", "load_policy",
           "WeightLoadError"]
