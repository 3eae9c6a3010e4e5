"""Checkpoints for the RL trainers: orbax ``CheckpointManager`` saves, restore, stop on SIGTERM.

Layout: one directory per saved step, written by ``orbax.checkpoint.CheckpointManager`` as a
``Composite`` of separate items::

    <directory>/<step>/params/     StandardSave of state.params
    <directory>/<step>/opt_state/  StandardSave of state.opt_state (optax state)
    <directory>/<step>/train/      StandardSave of the state with params/opt_state set to None:
                                   step, rng key(s) and any other array fields
    <directory>/<step>/metadata/   JsonSave of a small dict (config, data position, ...)

Keeping ``params`` apart makes the evaluation load (:func:`restore_params`) read that item only.
An item whose subtree has no leaves (a stateless optimizer's ``EmptyState()``) is not written
(orbax refuses empty items); on restore it is taken from the target as it is.

``state`` is a ``flax.struct.dataclass`` (any dataclass, or a mapping) with ``params`` and
``opt_state`` fields. Restores are made into *abstract* targets: every array leaf of the given
target (concrete arrays or ``jax.ShapeDtypeStruct``) becomes a ``ShapeDtypeStruct`` with its
shape, dtype and sharding, so arrays come back in the target's dtypes and placed on its mesh
(``NamedSharding``), whatever the topology of the run that saved them. A ``ShapeDtypeStruct``
without a sharding is put on the first device (single process) or replicated (several).
Typed PRNG keys (``jax.random.key``) are stored by orbax as their key data plus the impl name
and come back typed; raw ``uint32`` keys (``jax.random.PRNGKey``) are ordinary arrays. Orbax
returns a key the way it was saved whatever the target says; here it follows the target (a
typed-key checkpoint restores into a raw-key state and the other way round).

Atomicity is orbax's: a step is written under ``<step>.orbax-checkpoint-tmp`` and renamed when
complete (on GCS a ``commit_success.txt`` marks it instead), so a process killed mid-save leaves
only a temporary directory, which ``latest_step``/``restore`` never see and which the next
:class:`Checkpointer` on that directory deletes.

Multi-process: every process calls ``save``/``restore``/``close`` (orbax coordinates the writes
and barriers); there are no ``process_index`` guards here. Saves are asynchronous (with orbax's default
options the device-to-host copy is done before ``save`` returns, so the caller may donate the
arrays afterwards); a ``force=True`` save and :meth:`Checkpointer.close` wait for completion.

Trainer loop::

    stop = install_sigterm_handler()
    with Checkpointer(run_dir / "ckpt", save_every=100) as ckpt:
        meta = {"config": config.to_dict()}
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(state)  # concrete or abstract state, with shardings
        while int(state.step) < total:
            state = train_step(state, next(batches))
            step = int(state.step)
            if stop():
                ckpt.save(step, state, force=True, metadata=meta)
                break
            ckpt.save(step, state, metadata=meta)
    stop.uninstall()
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "ITEMS",
    "METADATA_ITEM",
    "CheckpointNotFoundError",
    "Checkpointer",
    "StopSignal",
    "abstract_tree",
    "install_sigterm_handler",
    "restore_params",
]

# Composite items holding the state; "train" is the state with the other two set to None.
ITEMS = ("params", "opt_state", "train")
METADATA_ITEM = "metadata"
_SPLIT_FIELDS = ("params", "opt_state")


# ---------------------------------------------------------------------------------------------
# State <-> items.


def _field(state: Any, name: str) -> Any:
    if isinstance(state, Mapping):
        return state[name]
    if not hasattr(state, name):
        raise TypeError(f"train state {type(state).__name__} has no {name!r} field")
    return getattr(state, name)


def _replace(state: Any, **fields: Any) -> Any:
    if isinstance(state, Mapping):
        return {**state, **fields}
    if dataclasses.is_dataclass(state):
        return dataclasses.replace(state, **fields)
    raise TypeError(f"train state must be a dataclass or a mapping, got {type(state).__name__}")


def _split(state: Any) -> dict[str, Any]:
    """``{"params", "opt_state", "train"}`` subtrees of ``state``."""
    items = {name: _field(state, name) for name in _SPLIT_FIELDS}
    items["train"] = _replace(state, **{name: None for name in _SPLIT_FIELDS})
    return items


def _join(items: Mapping[str, Any]) -> Any:
    return _replace(items["train"], **{name: items[name] for name in _SPLIT_FIELDS})


def _has_leaves(tree: Any) -> bool:
    return bool(jax.tree_util.tree_leaves(tree))


def _default_sharding() -> jax.sharding.Sharding:
    if jax.process_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("replica",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _abstract_leaf(x: Any) -> Any:
    """A ``ShapeDtypeStruct`` (shape, dtype, sharding) for a jax array leaf; others unchanged."""
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(x, "sharding", None) or _default_sharding()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return x  # numpy arrays and Python scalars: orbax restores them as such


def abstract_tree(tree: Any) -> Any:
    """``tree`` with every jax array leaf replaced by its ``ShapeDtypeStruct`` (with sharding)."""
    return jax.tree.map(_abstract_leaf, tree)


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(target: Any) -> Any:
    if isinstance(target, jax.Array):
        return jax.random.key_impl(target)
    return getattr(target.dtype, "_impl", None)  # a ShapeDtypeStruct; None: JAX's default impl


def _match_key_type(restored: Any, target: Any) -> Any:
    """Orbax restores keys as they were saved; follow the target (typed key or raw uint32)."""
    if _is_key(restored) and not _is_key(target):
        return jax.random.key_data(restored)
    if _is_key(target) and not _is_key(restored):
        return jax.random.wrap_key_data(restored, impl=_key_impl(target))
    return restored


def _restore_args(targets: Mapping[str, Any]) -> dict[str, ocp.args.StandardRestore]:
    return {name: ocp.args.StandardRestore(abstract_tree(t)) for name, t in targets.items()
            if _has_leaves(t)}


def _follow_target(restored: Any, target: Any) -> Any:
    return jax.tree.map(_match_key_type, restored, target)


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint directory, or no complete checkpoint (for the step) in it."""


def _missing_checkpoint(directory: Any, step: int | None, steps: list[int]
                        ) -> CheckpointNotFoundError:
    if step is None:
        return CheckpointNotFoundError(f"no complete checkpoint in {directory}")
    return CheckpointNotFoundError(f"no complete checkpoint for step {step} in {directory} "
                             f"(steps there: {steps})")


def _resolve_step(manager: ocp.CheckpointManager, step: int | None) -> int:
    steps = sorted(manager.all_steps())
    want = steps[-1] if step is None and steps else step
    if want is None or want not in steps:
        raise _missing_checkpoint(manager.directory, step, steps)
    return want


def _as_path(directory: str | os.PathLike) -> epath.Path:
    path = epath.Path(directory)
    return path if "://" in str(directory) else epath.Path(os.path.abspath(path))


# ---------------------------------------------------------------------------------------------
# Checkpointer.


class Checkpointer:
    """Periodic, asynchronous, atomic checkpoints of a train state (see the module docstring).

    Args:
      directory: root directory (created if missing); local path or ``gs://...``.
      save_every: :meth:`save` writes when ``step % save_every == 0`` (or when forced, or at a
        JAX preemption sync point on platforms that have one).
      max_to_keep: the newest ``max_to_keep`` steps are kept, older ones deleted.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, max_to_keep: int = 2):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.save_every = save_every
        policies = ocp.checkpoint_managers
        # An explicit decision policy: the default one also saves the very first step it sees
        # (InitialSavePolicy), whatever the interval.
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(save_every),
                policies.PreemptionCheckpointingPolicy(),
            ]),
            preservation_policy=policies.LatestN(max_to_keep),
            cleanup_tmp_directories=True,  # leftovers of a killed save
            create=True,
        )
        self._manager = ocp.CheckpointManager(_as_path(directory), options=options)

    @property
    def directory(self) -> epath.Path:
        return self._manager.directory

    def all_steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step with a complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, *, force: bool = False,
             metadata: Mapping[str, Any] | None = None) -> bool:
        """Saves ``state`` (and the JSON ``metadata``) as ``step`` if due; True if it did.

        Due means ``step % save_every == 0``, or ``force``. A step that is already saved is
        skipped (False), so a forced save at exit right after a periodic one is harmless. A
        forced save waits until the checkpoint is complete; otherwise it finishes in the
        background (:meth:`wait`). Every process must call this with the same arguments.
        """
        step = int(step)
        if step in self._manager.all_steps():
            if force:
                self.wait()
            return False
        items = {name: ocp.args.StandardSave(tree) for name, tree in _split(state).items()
                 if _has_leaves(tree)}
        items[METADATA_ITEM] = ocp.args.JsonSave(dict(metadata or {}))
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if force:
            self.wait()
        return saved

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores ``step`` (default: the latest) into the structure/dtypes/shardings of ``target``.

        Args:
          target: a train state of concrete arrays or ``jax.ShapeDtypeStruct`` leaves (for
            instance ``jax.eval_shape(init_fn, ...)`` with shardings attached).
          step: which step; None for the latest complete one.

        Returns:
          ``(state, metadata)``.

        Raises:
          FileNotFoundError: no complete checkpoint (for ``step``) in the directory.
        """
        step = _resolve_step(self._manager, step)
        targets = _split(target)
        args = _restore_args(targets)
        args[METADATA_ITEM] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        items = {name: _follow_target(restored[name], targets[name]) if name in args
                 else targets[name] for name in targets}
        return _join(items), dict(restored[METADATA_ITEM] or {})

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources."""
        self.wait()
        self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def restore_params(directory: str | os.PathLike, like_params: Any, step: int | None = None) -> Any:
    """Loads only the ``params`` item of a checkpoint, into the structure/shardings of ``like_params``.

    For evaluating a trained policy: the optimizer state and the rest are not read. The
    directory is opened read-only (nothing is cleaned up or deleted), so this is safe next to a
    running trainer.

    Raises:
      FileNotFoundError: the directory does not exist or holds no complete checkpoint (for
        ``step``).
    """
    path = _as_path(directory)
    if not path.exists():
        raise CheckpointNotFoundError(f"no checkpoint directory {directory}")
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(path, options=options) as manager:
        step = _resolve_step(manager, step)
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_tree(like_params)))
        return _follow_target(manager.restore(step, args=args)["params"], like_params)


# ---------------------------------------------------------------------------------------------
# Stop on SIGTERM.


class StopSignal:
    """A SIGTERM handler that only records the request, so the trainer can save and exit.

    Calling the object (``should_stop()``) reports the request. With several JAX processes it
    is agreed across them (an all-gather of the flags), since a scheduler may signal some
    processes before others and all of them must take the final save together; every process
    must then call it at the same points. Use :meth:`install`/:meth:`uninstall`, or a ``with``
    block; handlers can only be installed from the main thread.
    """

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = signum
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if not self.requested:
            logging.warning("received signal %d: stopping after the current step", signum)
        self.requested = True

    def install(self) -> Self:
        if not self._installed:
            self._previous = signal.signal(self.signum, self._handle)
            self._installed = True
        return self

    def uninstall(self) -> None:
        """Puts back the handler that was in place before :meth:`install`."""
        if self._installed:
            signal.signal(self.signum, self._previous)
            self._installed = False

    def __call__(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.asarray(self.requested))
        return bool(np.any(flags))

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def install_sigterm_handler() -> StopSignal:
    """Installs a :class:`StopSignal` for SIGTERM; the returned object is ``should_stop()``."""
    return StopSignal().install()
