"""mr1: Memory-R1 in JAX/Flax.

``from mr1 import Memory`` gives :class:`mr1.memory.api.Memory`, imported on first use so that
``import mr1`` stays light (no JAX, no transformers).
"""

__all__ = ["Memory"]


def __getattr__(name):
    if name == "Memory":
        from mr1.memory.api import Memory
        return Memory
    raise AttributeError(f"module 'mr1' has no attribute {name!r}")
