"""Model-parallel tests start worker processes: keep each rank to one thread on small CI machines."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_worker():
    """Spawned workers inherit the environment; without this each would use every core."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield
    if old is None:
        os.environ.pop("OMP_NUM_THREADS", None)
