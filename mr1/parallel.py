"""Mesh, shardings and multi-host set-up shared by the trainers and entry points.

One named axis, ``"data"``: the update's batch is split over it; params are either replicated
(``"replicated"``, plain data parallelism) or FSDP-sharded (``"fsdp"``: each weight split over
``"data"`` on its largest divisible axis; XLA all-gathers it where used and reduce-scatters its
gradient). The same functions serve 1 device, N local devices and several processes (after
:func:`maybe_initialize_distributed`): host data that every process holds in full becomes a
global array with :func:`to_global`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

DATA = "data"
PARAM_SHARDINGS = ("replicated", "fsdp")


def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when launched on several hosts.

    Launchers set ``MR1_DISTRIBUTED=1`` (with JAX's own coordinator variables, or on a TPU
    pod where JAX finds them itself); a single-process run skips it. Logs the devices seen.
    """
    if os.environ.get("MR1_DISTRIBUTED"):
        jax.distributed.initialize()
    logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
                 jax.devices())


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D ``("data",)`` mesh over all devices (or the first ``num_devices``)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, only {len(devices)} present")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PS())


def batch_sharding(mesh: Mesh, microbatched: bool = False) -> NamedSharding:
    """Split the batch axis over ``"data"`` (axis 1 when a micro-batch axis leads)."""
    return NamedSharding(mesh, PS(None, DATA) if microbatched else PS(DATA))


def _fsdp_spec(shape: tuple[int, ...], n: int) -> PS:
    """Shard the largest axis divisible by ``n``; replicate small or indivisible leaves."""
    if n == 1 or not shape or int(np.prod(shape)) < 4096:
        return PS()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % n == 0:
            spec = [None] * len(shape)
            spec[i] = DATA
            return PS(*spec)
    return PS()


def param_shardings(tree: Any, mesh: Mesh, mode: str = "replicated") -> Any:
    """A pytree of :class:`NamedSharding` for ``tree`` (arrays or ShapeDtypeStructs)."""
    if mode not in PARAM_SHARDINGS:
        raise ValueError(f"param sharding must be one of {PARAM_SHARDINGS}, got {mode!r}")
    n = mesh.shape[DATA]
    if mode == "replicated":
        return jax.tree.map(lambda _: replicated(mesh), tree)
    return jax.tree.map(lambda x: NamedSharding(mesh, _fsdp_spec(tuple(np.shape(x)), n)), tree)


def to_global(tree: Any, shardings: Any) -> Any:
    """Host arrays that every process holds in full → global arrays with ``shardings``.

    Each process fills only its addressable shards, so this works unchanged across hosts.
    """
    def put(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    if isinstance(shardings, NamedSharding):
        return jax.tree.map(lambda x: put(x, shardings), tree)
    return jax.tree.map(put, tree, shardings)


def local_copy(tree: Any) -> Any:
    """A single-device (this process's first device) copy of possibly sharded arrays.

    Replicated arrays reuse their local shard without copying; sharded ones are gathered.
    Rollouts run on this copy (every process samples the whole batch the same way).
    """
    dev = jax.local_devices()[0]

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_replicated:
            return x.addressable_data(0)
        if x.is_fully_addressable:
            return jax.device_put(x, dev)
        from jax.experimental import multihost_utils
        return jax.device_put(multihost_utils.process_allgather(x, tiled=True), dev)

    return jax.tree.map(one, tree)
