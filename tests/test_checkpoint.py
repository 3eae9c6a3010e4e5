"""mr1.checkpoint: bit-exact round trips (typed and raw keys), save cadence, sharded restore on 8
fake CPU devices (subprocess), incomplete checkpoints ignored, params-only restore, SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from mr1.checkpoint import (
    Checkpointer,
    StopSignal,
    abstract_tree,
    install_sigterm_handler,
    restore_params,
)

REPO = Path(__file__).resolve().parents[1]


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


def make_state(seed: int = 0, typed_key: bool = True, tx=None, rows: int = 4) -> TrainState:
    """A tiny state after one optimizer update (so the Adam moments are non-zero)."""
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {"dense": {"w": jax.random.normal(k[0], (rows, 3)),
                        "b": jax.random.normal(k[1], (3,)).astype(jnp.bfloat16)},
              "scale": jnp.float32(seed + 1.5)}
    tx = tx or optax.adamw(1e-2, weight_decay=0.1)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.3, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    rng = jax.random.key(seed + 7) if typed_key else jax.random.PRNGKey(seed + 7)
    return TrainState(step=jnp.asarray(seed + 1, jnp.int32), params=params, opt_state=opt_state,
                      rng=rng)


def _raw(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x)), str(jax.random.key_impl(x))
    return np.asarray(x), None


def assert_tree_equal(a, b):
    """Same tree structure, and per leaf the same dtype (typed keys included) and bits."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape, (x, y)
        (xa, ximpl), (ya, yimpl) = _raw(x), _raw(y)
        assert ximpl == yimpl
        assert xa.tobytes() == ya.tobytes(), (x, y)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("typed_key", [True, False], ids=["typed_key", "raw_key"])
def test_round_trip_bit_exact(tmp_path, typed_key):
    state = make_state(1, typed_key)
    meta = {"config": {"lr": 0.01, "name": "grpo"}, "data_position": 17}
    with Checkpointer(tmp_path, save_every=5) as ckpt:
        assert ckpt.save(5, state, metadata=meta)
        ckpt.wait()
        # Concrete target (another state's values) and abstract target both get the saved bits.
        restored, got_meta = ckpt.restore(make_state(2, typed_key))
        assert_tree_equal(restored, state)
        assert got_meta == meta
        restored, _ = ckpt.restore(jax.eval_shape(lambda: make_state(3, typed_key)))
        assert_tree_equal(restored, state)
        assert isinstance(restored, TrainState)


def test_key_type_follows_the_target(tmp_path):
    typed, raw = make_state(1, typed_key=True), make_state(1, typed_key=False)
    with Checkpointer(tmp_path / "typed", save_every=1) as ckpt:
        ckpt.save(1, typed, force=True)
        assert_tree_equal(ckpt.restore(raw)[0], raw)  # typed-key checkpoint, raw target
    with Checkpointer(tmp_path / "raw", save_every=1) as ckpt:
        ckpt.save(1, raw, force=True)
        assert_tree_equal(ckpt.restore(typed)[0], typed)
        assert_tree_equal(ckpt.restore(jax.eval_shape(lambda: typed))[0], typed)


def test_round_trip_stateless_optimizer_and_no_metadata(tmp_path):
    # optax.sgd's state has no leaves (orbax refuses empty items): it comes from the target.
    state = make_state(0, tx=optax.sgd(0.1))
    assert not jax.tree.leaves(state.opt_state)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.save(1, state, force=True)
        restored, meta = ckpt.restore(make_state(4, tx=optax.sgd(0.1)))
    assert_tree_equal(restored, state)
    assert meta == {}


def test_resume_in_a_new_checkpointer_reproduces_the_run(tmp_path):
    tx = optax.adamw(1e-2)

    def step_fn(s: TrainState) -> TrainState:
        rng, sub = jax.random.split(s.rng)
        grads = jax.tree.map(lambda p: jax.random.normal(sub, p.shape, p.dtype), s.params)
        updates, opt_state = tx.update(grads, s.opt_state, s.params)
        return s.replace(step=s.step + 1, params=optax.apply_updates(s.params, updates),
                         opt_state=opt_state, rng=rng)

    def run(state, steps, ckpt):
        for _ in range(steps):
            state = step_fn(state)
            ckpt.save(int(state.step), state)
        return state

    init = make_state(0, tx=tx).replace(step=jnp.asarray(0, jnp.int32))
    with Checkpointer(tmp_path / "a", save_every=4) as ckpt:
        straight = run(init, 10, ckpt)
    with Checkpointer(tmp_path / "b", save_every=4) as ckpt:
        run(init, 6, ckpt)  # "killed" after step 6; step 4 is the last checkpoint
    with Checkpointer(tmp_path / "b", save_every=4) as ckpt:
        state, _ = ckpt.restore(init)
        assert int(state.step) == 4
        resumed = run(state, 6, ckpt)
    assert_tree_equal(resumed, straight)


# ----------------------------------------------------------------------------- cadence

def test_save_every_latest_step_and_max_to_keep(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, save_every=3, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        saved = [s for s in range(1, 8) if ckpt.save(s, state)]
        assert saved == [3, 6]  # the first step is not saved just for being first
        ckpt.wait()
        assert ckpt.latest_step() == 6 and ckpt.all_steps() == [3, 6]
        assert ckpt.save(7, state, force=True)
        assert ckpt.latest_step() == 7 and ckpt.all_steps() == [6, 7]
        # A forced save of a step already on disk (periodic save, then exit) is skipped.
        assert not ckpt.save(7, state, force=True)
        assert not ckpt.save(6, state)
        restored, _ = ckpt.restore(make_state(5), step=6)
        assert_tree_equal(restored, state)
        with pytest.raises(FileNotFoundError, match="step 3"):
            ckpt.restore(state, step=3)  # deleted by max_to_keep
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["6", "7"]


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path, save_every=0)


# ----------------------------------------------------------------------------- errors, atomicity

def test_restore_from_empty_directory_names_it(tmp_path):
    with (Checkpointer(tmp_path / "empty", save_every=1) as ckpt,
          pytest.raises(FileNotFoundError, match=str(tmp_path / "empty"))):
        ckpt.restore(make_state())
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        restore_params(tmp_path / "empty", make_state().params)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        restore_params(tmp_path / "missing", make_state().params)
    assert not (tmp_path / "missing").exists()


def test_incomplete_checkpoint_is_ignored(tmp_path):
    good, newer = make_state(1), make_state(2)
    with Checkpointer(tmp_path, save_every=2) as ckpt:
        assert ckpt.save(2, good, force=True)
    # What a save killed before orbax's final rename leaves: "<step>.orbax-checkpoint-tmp" with
    # (here some of) the files and no commit marker.
    tmp = tmp_path / "4.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "2", tmp)
    (tmp / "commit_success.txt").unlink()
    shutil.rmtree(tmp / "opt_state")

    assert_tree_equal(restore_params(tmp_path, newer.params), good.params)  # read-only reader
    assert tmp.exists()
    with Checkpointer(tmp_path, save_every=2) as ckpt:
        assert ckpt.latest_step() == 2
        restored, _ = ckpt.restore(newer)
        assert_tree_equal(restored, good)
        assert ckpt.save(4, newer)  # the step can be written again
    assert not tmp.exists()
    assert_tree_equal(restore_params(tmp_path, good.params), newer.params)


# ----------------------------------------------------------------------------- params only

def test_restore_params_reads_only_params(tmp_path):
    state = make_state(3)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, make_state(9), force=True)
        ckpt.save(2, state, force=True)
    like = make_state(0).params
    assert_tree_equal(restore_params(tmp_path, like), state.params)
    assert_tree_equal(restore_params(str(tmp_path), abstract_tree(like), step=1),
                      make_state(9).params)
    # The other items are not needed at all.
    for item in ("opt_state", "train"):
        shutil.rmtree(tmp_path / "2" / item)
    assert_tree_equal(restore_params(tmp_path, like), state.params)


# ----------------------------------------------------------------------------- SIGTERM

def test_stop_signal_sets_flag_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the process keeps running
        assert stop() and stop.requested
    assert signal.getsignal(signal.SIGTERM) is before

    should_stop = install_sigterm_handler()
    try:
        assert signal.getsignal(signal.SIGTERM) is not before and not should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert should_stop()
    finally:
        should_stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------- 8 devices

_SHARDED = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from mr1.checkpoint import Checkpointer, restore_params
    from tests.test_checkpoint import assert_tree_equal, make_state

    assert jax.device_count() == 8, jax.devices()
    directory = sys.argv[1]

    def place(state, mesh, row_spec):
        def put(path, x):
            name = jax.tree_util.keystr(path)
            spec = row_spec if name.endswith("['w']") else P()
            return jax.device_put(x, NamedSharding(mesh, spec))
        return jax.tree_util.tree_map_with_path(put, state)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    state = place(make_state(1, rows=8), mesh, P("data", None))
    assert len(state.params["dense"]["w"].addressable_shards) == 8
    with Checkpointer(directory, save_every=10) as ckpt:
        assert ckpt.save(10, state, force=True, metadata={"mesh": "8"})

    # Restore onto another layout: a 4x2 mesh, rows over "model", given by abstract targets.
    mesh2 = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          place(make_state(2, rows=8), mesh2, P("model", None)))
    with Checkpointer(directory, save_every=10) as ckpt:
        restored, meta = ckpt.restore(target)
    assert meta == {"mesh": "8"}
    assert_tree_equal(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert got.sharding == want.sharding, (got.sharding, want.sharding)
    assert restored.params["dense"]["w"].sharding.spec == P("model", None)
    w = restored.opt_state[0].mu["dense"]["w"]
    assert w.sharding.mesh.shape == {"data": 4, "model": 2}

    # Params only, onto one device.
    one = jax.sharding.SingleDeviceSharding(jax.devices()[3])
    like = jax.tree.map(lambda x: jax.device_put(x, one), make_state(0, rows=8).params)
    params = restore_params(directory, like)
    assert_tree_equal(params, state.params)
    assert all(x.sharding == one for x in jax.tree.leaves(params))
    print("OK")
""")


def test_sharded_restore_on_8_cpu_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "OK"
    # The 8-device checkpoint restores in this 1-device process too.
    state = make_state(1, rows=8)
    assert_tree_equal(restore_params(tmp_path, make_state(0, rows=8).params), state.params)
    with Checkpointer(tmp_path, save_every=10) as ckpt:
        restored, _ = ckpt.restore(make_state(0, rows=8))
    assert_tree_equal(restored, state)
