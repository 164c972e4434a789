"""``KVFetch``: one request's prompt blocks on their way from a KV tier into its device blocks.

A request admitted with more of its prompt cached outside the device pool than in it does not prefill those
blocks: the scheduler claims its device hits, allocates device blocks for the rest of the cached run, and
fetches them, in up to two parts that cover consecutive blocks of its block table::

    [0, num_device_blocks)                 device prefix-cache hits (claimed, nothing to move)
    [num_device_blocks, host_end)          part "host": copied from this server's host tier
    [host_end, pull_end)                   part "peer": pulled from another server over the KV transport

Each part ends DONE or FAILED, in any order. When none is pending, the request resumes (back to the waiting
queue) with every token up to the first block that is not in place counted as computed, and prefills from
there: a failed part costs recomputation, never correctness. Until then the request holds all its blocks and
is not scheduled (``RequestStatus.WAITING_FOR_KV``)::

    part state  leaves when                          to
    PENDING     its copy / its receive completed     DONE
                its copy / its receive failed        FAILED

No CUDA here (the scheduler owns these records).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from duet.engine.request import Request


class PartState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


PART_TRANSITIONS = {
    PartState.PENDING: frozenset({PartState.DONE, PartState.FAILED}),
    PartState.DONE: frozenset(),
    PartState.FAILED: frozenset(),
}

SOURCES = ("host", "peer")


@dataclass
class FetchPart:
    source: str
    """``host`` (this server's host tier) or ``peer`` (pulled from another server)."""
    start_block: int
    end_block: int
    state: PartState = PartState.PENDING
    transfer_id: str = ""
    """The pull's transfer id (``peer`` parts)."""

    @property
    def num_blocks(self) -> int:
        return self.end_block - self.start_block


@dataclass(eq=False)
class KVFetch:
    request: Request
    num_device_blocks: int
    """Leading blocks that were device prefix-cache hits at admission."""
    parts: list[FetchPart]
    started_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        start = self.num_device_blocks
        for part in self.parts:
            if part.source not in SOURCES or part.start_block != start or part.end_block <= start:
                raise ValueError(f"fetch parts must cover consecutive blocks from {self.num_device_blocks}: {self.parts}")
            start = part.end_block

    def part(self, source: str) -> FetchPart | None:
        return next((p for p in self.parts if p.source == source), None)

    def finish(self, source: str, ok: bool) -> None:
        """The ``source`` part's copy or receive ended."""
        part = self.part(source)
        if part is None:
            raise ValueError(f"{self.request.request_id}: no {source} part to finish")
        state = PartState.DONE if ok else PartState.FAILED
        if state not in PART_TRANSITIONS[part.state]:
            raise AssertionError(f"{self.request.request_id}: {source} part {part.state.value} -> {state.value}")
        part.state = state

    @property
    def ended(self) -> bool:
        return all(p.state is not PartState.PENDING for p in self.parts)

    @property
    def num_valid_blocks(self) -> int:
        """Leading blocks whose KV is in place: the device hits, then every part up to the first failed one."""
        n = self.num_device_blocks
        for part in self.parts:
            if part.state is not PartState.DONE:
                break
            n = part.end_block
        return n

    def num_fetched_blocks(self, source: str) -> int:
        """Blocks of the ``source`` part in place and used (a part after a failed one is not)."""
        part = self.part(source)
        return part.num_blocks if part is not None and self.num_valid_blocks >= part.end_block else 0
