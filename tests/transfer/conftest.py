"""Fixtures shared by the hand-off tests (``test_handoff``, ``test_pull``): a pair of connected ``Handoff`` sides
over each KV transport."""
from __future__ import annotations

import pytest

from tests.transfer.test_handoff import BACKENDS, make_side
from duet.transfer.handoff import Handoff


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def sides(backend):
    """(prefill side, decode side), each connected to the other; closed (and checked clean) afterwards."""
    made: list[Handoff] = []

    def make(**kwargs) -> tuple[Handoff, Handoff]:
        p = make_side(backend, "p", 1, **kwargs.pop("p", {}))
        d = make_side(backend, "d", 2, **kwargs.pop("d", {}))
        p.transport.connect(d.transport.name, d.transport.metadata())
        d.transport.connect(p.transport.name, p.transport.metadata())
        made.extend((p, d))
        return p, d

    yield make
    for h in made:
        h.close()
