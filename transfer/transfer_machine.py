"""What both ends of a KV hand-off share: an owner, a transfer id, a deadline, and a checked state change.

``SendTransfer`` and ``RecvTransfer`` subclass it with their own state enum, transition table (``TRANSITIONS``:
state -> the states it may move to; a state with no exit is final) and the stage name each state is traced
as (``TRACE``, stable names that tools read from ``Stats.traces``).
"""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from duet.transfer.handoff import Handoff


def chain_table(states: list[enum.Enum], failed: enum.Enum) -> dict[enum.Enum, frozenset[enum.Enum]]:
    """The table of a machine that moves along ``states`` in order and may fail from any state before the last."""
    table = {state: frozenset({following, failed}) for state, following in zip(states, states[1:])}
    return {**table, states[-1]: frozenset(), failed: frozenset()}


class TransferMachine:
    TRANSITIONS: ClassVar[dict]
    TRACE: ClassVar[dict]

    def __init__(self, owner: Handoff, transfer_id: str, initial: enum.Enum, now: float, timeout_s: float):
        self.owner = owner
        self.transfer_id = transfer_id
        self.request_id = ""
        """The router's request id, for traces ('' until the owner says it)."""
        self.state = initial
        self.started_at = now
        self.deadline = now + timeout_s
        self.error: str | None = None
        """Why it failed; set by ``fail``, applied (the state moves to FAILED) by the next ``advance``."""
        self.released = False
        """Every resource was given back (a final state was reached and acted on, once)."""
        self.offset = -1
        self.nbytes = 0
        self.slab = None  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]: a view of the staging

    @property
    def final(self) -> bool:
        return not self.TRANSITIONS[self.state]

    def fail(self, reason: str) -> None:
        if not self.final and self.error is None:
            self.error = reason

    def _reserve_slab(self, num_blocks: int, side: str) -> bool:
        """Take a staging slab for ``num_blocks`` blocks; False (and failed) when the staging has no room."""
        owner = self.owner
        nbytes = owner.port.slab_bytes(num_blocks)
        offset = owner.staging.alloc(nbytes)
        if offset is None:
            self.fail(f"{side} staging full ({owner.staging.free_bytes} bytes free, {nbytes} needed)")
            return False
        self.offset, self.nbytes = offset, nbytes
        self.slab = owner.staging.view(offset, nbytes, owner.port.kv_dtype, owner.port.slab_shape(num_blocks))
        return True

    def _free_slab(self, quarantine: bool) -> None:
        if self.offset >= 0:
            self.owner.staging.free(self.offset, self.nbytes, quarantine=quarantine)

    def _to(self, state: enum.Enum) -> None:
        if state not in self.TRANSITIONS[self.state]:
            raise AssertionError(f"{self.transfer_id}: {self.state.value} -> {state.value} is not a transition")
        self.state = state
        self.owner.trace(self.request_id or self.transfer_id, self.TRACE[state])
