"""Matmul precision: ``Policy.logits`` traces every matmul at "highest" (true float32 on every
backend, whatever the ambient default), ``ModelConfig.matmul_precision`` sets it for the model's
other paths, and None leaves the backend's default. Checked on the traced programs, so the
check means the same on CPU as on a GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from mr1.models import load_policy, policy as policy_mod, transformer

pytestmark = pytest.mark.device


def _dot_precisions(jaxpr) -> set:
    """The precision of every dot_general in a jaxpr, sub-jaxprs (scan, while, pjit) included."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.add(eqn.params["precision"])
        for sub in jaxprs_in_params(eqn.params):
            found |= _dot_precisions(sub)
    return found


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny", seed=0)


def _ids():
    ids = np.random.default_rng(0).integers(3, 256, (2, 12)).astype(np.int32)
    return jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids))


HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


@pytest.mark.matmul_precision("default")
def test_policy_logits_run_at_highest_under_the_backend_default(tiny):
    fn = policy_mod._logits_fn(tiny.config)  # noqa: SLF001
    got = _dot_precisions(jax.make_jaxpr(fn)(tiny.params, *_ids()).jaxpr)
    assert got == {HIGHEST}


@pytest.mark.matmul_precision("default")
@pytest.mark.parametrize("setting,want", [(None, {None}), ("highest", {HIGHEST}),
                                          ("default", {(jax.lax.Precision.DEFAULT,) * 2})])
def test_config_sets_the_forward_precision(tiny, setting, want):
    cfg = tiny.config.replace(matmul_precision=setting)
    ids, mask = _ids()

    def fwd(params):
        hidden, _ = transformer.forward(params, cfg, ids, transformer.padding_positions(mask),
                                        transformer.causal_mask(mask))
        return transformer.logits_from_hidden(params, cfg, hidden)

    assert _dot_precisions(jax.make_jaxpr(fwd)(tiny.params).jaxpr) == want


def test_the_suite_runs_at_highest_unless_a_test_says_otherwise(tiny):
    """tests/conftest.py's default: a model with no setting traces at "highest" here."""
    ids, mask = _ids()
    cfg = tiny.config
    jaxpr = jax.make_jaxpr(lambda p: transformer.forward(
        p, cfg, ids, transformer.padding_positions(mask), transformer.causal_mask(mask))[0])(
        tiny.params).jaxpr
    assert _dot_precisions(jaxpr) == {HIGHEST}


def test_unknown_precision_is_rejected(tiny):
    with pytest.raises(ValueError, match="matmul_precision"):
        tiny.config.replace(matmul_precision="tf32")
