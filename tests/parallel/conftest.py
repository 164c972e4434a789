"""Model-parallel tests start worker processes: keep each rank to one thread on small CI machines."""
from __future__ import annotations

import pytest

from tests.parallel.helpers import one_omp_thread


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_worker():
    with one_omp_thread():
        yield
