"""Mesh, partition rules, shardings and multi-host set-up shared by trainers and tools.

The mesh has three named axes (MaxText's layout, the outermost first):

- ``"data"``: pure data parallelism; params are replicated over it.
- ``"fsdp"``: the batch is split over it too, and params / optimizer state are sharded over it
  (ZeRO-3 style: XLA all-gathers a weight where it is used and reduce-scatters its gradient).
- ``"tp"``: tensor parallelism inside a layer (attention heads, SwiGLU width, the vocabulary).

The batch of an update is split over ``("data", "fsdp")`` together (:data:`BATCH`). Which axis of
which weight goes where is one table, :data:`PARAM_RULES` (a regex over the ``/``-joined pytree
path → one mesh axis per array dimension); optimizer state matches the same rules because its
paths end in the param's path. A rule whose dimension is not divisible by its axis size falls back
to replication on that dimension (and is reported by :func:`sharding_report`). The KV cache and
activations have logical layouts too (:data:`KV_CACHE_SPEC`, :data:`ACTIVATION_SPECS`): the
sampler's cache and the planner (``experiments/plan.py``) use them.

The same functions serve 1 device, N local devices and several processes (after
:func:`maybe_initialize_distributed`): host data that every process holds in full becomes a global
array with :func:`to_global`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

DATA, FSDP, TP = "data", "fsdp", "tp"
MESH_AXES = (DATA, FSDP, TP)
BATCH = (DATA, FSDP)  # the batch dimension is split over both
PARAM_SHARDINGS = ("replicated", "fsdp")
MIN_SHARDED_SIZE = 4096  # smaller leaves (norm scales, biases, scalars) stay replicated

# Parameter layouts (mr1.models.transformer's tree; layers carry a leading [L] axis).
# The first matching regex wins; paths are "/"-joined keys, e.g. "policy/layers/wq".
PARAM_RULES: tuple[tuple[str, tuple], ...] = (
    (r"(^|/)embed$", (TP, FSDP)),                       # [V, D]: vocabulary-parallel
    (r"(^|/)lm_head$", (FSDP, TP)),                     # [D, V]
    (r"layers/w[qkv]$", (None, FSDP, TP)),              # [L, D, heads*hd]: column-parallel
    (r"layers/b[qkv]$", (None, TP)),                    # [L, heads*hd]
    (r"layers/wo$", (None, TP, FSDP)),                  # [L, H*hd, D]: row-parallel
    (r"layers/w_(gate|up)$", (None, FSDP, TP)),         # [L, D, F]
    (r"layers/w_down$", (None, TP, FSDP)),              # [L, F, D]
    (r"norm(/scale)?$", ()),                            # RMSNorm scales
    (r"(^|/)lora/", ()),                                # LoRA adapters: small, replicated
    (r"(^|/)value_head/", ()),                          # PPO's linear critic
)
# KV cache [L, B, K, S, hd] (mr1.models.transformer.KVCache): rows over the batch axes, kv heads
# over tp. Activations: hidden states [B, T, D], attention scores [B, K, G, T, S], logits [B, T, V].
KV_CACHE_SPEC = (None, BATCH, TP, None, None)
ACTIVATION_SPECS = {
    "hidden": (BATCH, None, None),
    "attention_scores": (BATCH, TP, None, None, None),
    "mlp": (BATCH, None, TP),
    "logits": (BATCH, None, TP),
}


def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when launched on several hosts.

    Launchers set ``MR1_DISTRIBUTED=1`` (with JAX's own coordinator variables, or on a TPU
    pod where JAX finds them itself); a single-process run skips it. Logs the devices seen.
    """
    if os.environ.get("MR1_DISTRIBUTED"):
        jax.distributed.initialize()
    logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
                 jax.devices())


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Sizes of the ``(data, fsdp, tp)`` axes; their product is the device count."""

    data: int = 1
    fsdp: int = 1
    tp: int = 1

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tp

    @property
    def batch(self) -> int:
        """Devices the batch is split over (``data * fsdp``)."""
        return self.data * self.fsdp

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tp)

    def __str__(self) -> str:
        return f"data={self.data} fsdp={self.fsdp} tp={self.tp}"

    @classmethod
    def resolve(cls, num_devices: int, data: int = -1, fsdp: int = 1, tp: int = 1
                ) -> "MeshShape":
        """Fills one ``-1`` axis so the product is ``num_devices``; checks the product."""
        sizes = [int(data), int(fsdp), int(tp)]
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices do not split into mesh {sizes}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh (data, fsdp, tp) = {tuple(sizes)} needs "
                             f"{math.prod(sizes)} devices, {num_devices} present")
        return cls(*sizes)


def mesh_shape_from_config(parallel_cfg, num_devices: int) -> MeshShape:
    """The config's mesh: ``parallel.mesh`` ``(data, fsdp, tp)`` (one may be -1), or, when absent
    or all -1/0, the legacy 1-D layouts: ``param_sharding="replicated"`` → all devices on
    ``data``; ``"fsdp"`` → all on ``fsdp`` (the batch is split over all devices either way)."""
    mesh = tuple(parallel_cfg.get("mesh", ()) or ())
    if mesh:
        return MeshShape.resolve(num_devices, *mesh)
    mode = parallel_cfg.get("param_sharding", "replicated")
    if mode not in PARAM_SHARDINGS:
        raise ValueError(f"param sharding must be one of {PARAM_SHARDINGS}, got {mode!r}")
    return MeshShape(fsdp=num_devices) if mode == "fsdp" else MeshShape(data=num_devices)


def make_mesh(num_devices: int = 0, shape: MeshShape | Sequence[int] | None = None,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A ``("data", "fsdp", "tp")`` mesh over all devices (or the first ``num_devices``).

    ``shape`` defaults to all devices on ``data``. ``devices`` overrides ``jax.devices()``
    (e.g. fake CPU devices when planning for a pod).
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, only {len(devices)} present")
        devices = devices[:num_devices]
    if shape is None:
        shape = MeshShape(data=len(devices))
    elif not isinstance(shape, MeshShape):
        shape = MeshShape.resolve(len(devices), *shape)
    if shape.size != len(devices):
        raise ValueError(f"mesh {shape} needs {shape.size} devices, {len(devices)} given")
    grid = np.asarray(devices, dtype=object).reshape(shape.as_tuple())
    if devices[0].platform in ("tpu", "gpu") and len(devices) == len(jax.devices()):
        from jax.experimental import mesh_utils  # ICI-aware order: tp innermost, on-chip links
        grid = mesh_utils.create_device_mesh(shape.as_tuple(), devices=devices)
    return Mesh(grid, MESH_AXES)


def mesh_shape(mesh: Mesh) -> MeshShape:
    return MeshShape(*(mesh.shape.get(a, 1) for a in MESH_AXES))


def batch_devices(mesh: Mesh) -> int:
    """How many ways the batch is split (``data * fsdp``)."""
    return mesh_shape(mesh).batch


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PS())


def batch_sharding(mesh: Mesh, microbatched: bool = False) -> NamedSharding:
    """Split the batch axis over ``("data", "fsdp")`` (axis 1 when a micro-batch axis leads)."""
    return NamedSharding(mesh, PS(None, BATCH) if microbatched else PS(BATCH))


def path_str(path) -> str:
    """``/``-joined keys of a pytree path (``tree_flatten_with_path``)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _axis_size(mesh_sizes: dict, axis) -> int:
    if axis is None:
        return 1
    axes = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh_sizes.get(a, 1) for a in axes)


def fit_spec(spec: tuple, shape: tuple[int, ...], mesh_sizes: dict) -> tuple[PS, list[str]]:
    """``spec`` as a PartitionSpec for ``shape``: dims not divisible by their axes replicate."""
    if len(spec) > len(shape):
        return PS(), [f"rule has {len(spec)} dims, array {len(shape)}"]
    out, dropped = [], []
    for dim, axis in zip(shape, spec):
        n = _axis_size(mesh_sizes, axis)
        if n > 1 and dim % n:
            dropped.append(f"dim {dim} not divisible by {axis}={n}")
            axis = None
        out.append(axis if n > 1 else None)
    return PS(*out), dropped


def _largest_divisible(shape: tuple[int, ...], n: int) -> PS:
    """Fallback for leaves no rule names: shard the largest axis divisible by ``n`` over fsdp."""
    for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[i] % n == 0:
            spec = [None] * len(shape)
            spec[i] = FSDP
            return PS(*spec)
    return PS()


def spec_for(path: str, shape: tuple[int, ...], mesh_sizes: dict, mode: str = "fsdp",
             rules=PARAM_RULES) -> tuple[PS, str]:
    """The PartitionSpec of one leaf and a note (the rule used, or why it replicates).

    ``mode="replicated"`` drops the ``fsdp`` axis from every rule (params whole on each data /
    fsdp shard, still split over ``tp``).
    """
    if not shape or int(np.prod(shape)) < MIN_SHARDED_SIZE:
        return PS(), "small"
    sizes = dict(mesh_sizes)
    if mode == "replicated":
        sizes[FSDP] = 1
    for pattern, spec in rules:
        if re.search(pattern, path):
            ps, dropped = fit_spec(spec, shape, sizes)
            return ps, pattern + (f" ({'; '.join(dropped)})" if dropped else "")
    n = sizes.get(FSDP, 1)
    return (_largest_divisible(shape, n) if n > 1 else PS()), "fallback: largest divisible axis"


def _mesh_sizes(mesh) -> dict:
    return {a: int(mesh.shape.get(a, 1)) for a in MESH_AXES}


def param_shardings(tree: Any, mesh: Mesh, mode: str = "replicated", rules=PARAM_RULES) -> Any:
    """A pytree of :class:`NamedSharding` for ``tree`` (arrays or ShapeDtypeStructs).

    ``mode``: ``"fsdp"`` applies :data:`PARAM_RULES` on every axis; ``"replicated"`` keeps params
    whole over ``data`` and ``fsdp`` (split only over ``tp``). On a 1-D ``data`` mesh (the default)
    both mean plain data parallelism with replicated params.
    """
    if mode not in PARAM_SHARDINGS:
        raise ValueError(f"param sharding must be one of {PARAM_SHARDINGS}, got {mode!r}")
    sizes = _mesh_sizes(mesh)

    def one(path, x):
        return NamedSharding(mesh, spec_for(path_str(path), tuple(np.shape(x)), sizes, mode,
                                            rules)[0])

    return jax.tree_util.tree_map_with_path(one, tree)


def sharding_report(tree: Any, mesh_sizes: dict, mode: str = "fsdp",
                    rules=PARAM_RULES) -> list[tuple[str, tuple, PS, str]]:
    """``(path, shape, spec, note)`` per leaf: what :func:`param_shardings` decides and why."""
    rows = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        p, shape = path_str(path), tuple(np.shape(x))
        spec, note = spec_for(p, shape, mesh_sizes, mode, rules)
        rows.append((p, shape, spec, note))
    return rows


def shard_bytes(shape: tuple[int, ...], itemsize: int, spec: PS, mesh_sizes: dict) -> int:
    """Bytes of one device's shard of an array with ``spec`` (ceil division per dim)."""
    n = 1
    dims = list(shape)
    for i, axis in enumerate(tuple(spec)):
        k = _axis_size(mesh_sizes, axis)
        dims[i] = -(-dims[i] // k)
    for d in dims:
        n *= d
    return n * itemsize


def logical_sharding(mesh: Mesh, spec: tuple, shape: tuple[int, ...] | None = None
                     ) -> NamedSharding:
    """A NamedSharding for a logical layout (:data:`KV_CACHE_SPEC`, :data:`ACTIVATION_SPECS`);
    with ``shape``, dims that do not divide by their axes replicate."""
    if shape is None:
        return NamedSharding(mesh, PS(*spec))
    return NamedSharding(mesh, fit_spec(spec, shape, _mesh_sizes(mesh))[0])


_ACTIVATION_MESH: list[Mesh] = []  # the innermost activation_mesh() context


class activation_mesh:  # noqa: N801  (a context manager, used like a function)
    """While tracing inside ``with activation_mesh(mesh):``, :func:`constrain_activation` pins
    activations to their :data:`ACTIVATION_SPECS` layout on ``mesh`` (``None``: no-op).

    Without these constraints XLA's sharding propagation may follow the FSDP-sharded weights
    and replicate the batch (every device computing every row); the jitted update, scoring and
    the sharded sampler trace under it.
    """

    def __init__(self, mesh: Mesh | None):
        self.mesh = mesh

    def __enter__(self):
        _ACTIVATION_MESH.append(self.mesh)
        return self.mesh

    def __exit__(self, *exc):
        _ACTIVATION_MESH.pop()
        return False


def constrain_activation(x, name: str):
    """``x`` pinned to ``ACTIVATION_SPECS[name]`` under :class:`activation_mesh` (else ``x``)."""
    mesh = _ACTIVATION_MESH[-1] if _ACTIVATION_MESH else None
    return constrain(x, mesh, ACTIVATION_SPECS[name])


def constrain(x, mesh: Mesh | None, spec: tuple):
    """``with_sharding_constraint`` to a logical layout inside jit (no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, spec, tuple(x.shape)))


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) jax array as a numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def batch_or_replicated(mesh: Mesh, rows: int) -> NamedSharding:
    """Rows split over the batch axes when they divide evenly, else replicated."""
    return batch_sharding(mesh) if rows % batch_devices(mesh) == 0 else replicated(mesh)


def process_zero_first(fn, what: str = "mr1"):
    """``fn()`` on process 0, then (after a barrier) on the others; returns its result.

    For steps that write shared files (memory banks): on a shared filesystem the others then
    load what process 0 wrote instead of racing it; on per-host disks they redo the work.
    """
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils
    out = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(f"{what}: process 0 done")
    return fn() if jax.process_index() != 0 else out


def is_main_process() -> bool:
    """Process 0 writes the run's files (metrics, results, plots)."""
    return jax.process_index() == 0


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
