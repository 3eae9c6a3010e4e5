"""Multi-host set-up shared by every experiment entry point."""

from __future__ import annotations

import os

import jax
from absl import logging


def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when launched on several hosts.

    Launchers set ``MR1_DISTRIBUTED=1`` (with JAX's own coordinator variables, or on a TPU
    pod where JAX finds them itself); a single-process run skips it. Logs the devices seen.
    """
    if os.environ.get("MR1_DISTRIBUTED"):
        jax.distributed.initialize()
    logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
                 jax.devices())
