"""Suite-wide set-up: CPU-only machines run Triton kernels through the interpreter."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is created.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: ``tiny_model(arch, **kwargs) -> path`` of a random HF checkpoint, cached per arguments."""
    from duet.engine.tools.make_tiny_model import make_tiny_model

    cache: dict = {}

    def make(arch: str = "llama", **kwargs) -> str:
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny_{arch}")
            cache[key] = str(make_tiny_model(arch, out, **kwargs))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llama_dir(tiny_model) -> str:
    return tiny_model("llama")


def pytest_report_header(config):
    """Say up front whether the multi-host tests run here, and if not, why (they skip themselves)."""
    from duet.engine.tools.virtual_hosts import unavailable

    why = unavailable()
    return "multi-host tests (tests/multihost): " + ("network namespaces available" if why is None
                                                     else f"skipped: {why}")
