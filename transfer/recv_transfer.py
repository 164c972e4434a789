"""Decode side of one KV hand-off: offer a staging slab, scatter each arrived layer, hand over the first token.

Two facts must be known before anything moves, and they arrive in either order: the request's blocks
(``set_blocks``: the engine allocated them at admission; prefix hits shrink what is sent) and the prefill
peer (``set_peer``: the handshake with it is done and the transport can reach it). Then ``advance(now)``
reserves a slab and sends the prefill side a ``KVDest`` over the transport. Each ``KVLayers`` notification
means those layers' bytes have landed; they are scattered into the request's blocks between steps::

    state          leaves when                                                   to
    AWAITING_PEER  blocks and peer known, slab reserved, KVDest sent             AWAITING_KV
                   no slab room / KVDest cannot be sent / fail() / deadline      FAILED
    AWAITING_KV    every layer and the first token arrived                       COMPLETE
                   pull: every layer arrived (a pull carries no token)           COMPLETE
                   an error notification / fail() / deadline                     FAILED

A *pull* (``pull=True``) receives blocks another server caches already, for a prompt this side then computes
the rest of itself: it completes on its layers alone, with no first token.

A failure that comes before the blocks (the peer was refused while the engine had not admitted the request
yet) waits for them, so it still reaches the request; one whose blocks never come ends at the deadline.

A layer that arrives twice is counted and ignored (so is one for a layer outside the model); layers may
arrive in any order. On FAILED the slab is quarantined rather than freed (a late WRITE from the prefill side
must not land in a slab that serves a newer transfer) and the prefill side is told to stop (``KVCancel``).
"""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import torch

from duet.transfer.messages import KVCancel, KVDest, KVLayers
from duet.transfer.transfer_machine import TransferMachine, chain_table
from duet.transfer.transport import TransferError
from duet.transfer.wire import encode

if TYPE_CHECKING:
    from duet.transfer.handoff import Handoff


class RecvState(enum.Enum):
    AWAITING_PEER = "awaiting_peer"
    AWAITING_KV = "awaiting_kv"
    COMPLETE = "complete"
    FAILED = "failed"


RECV_TRANSITIONS = chain_table([RecvState.AWAITING_PEER, RecvState.AWAITING_KV, RecvState.COMPLETE], RecvState.FAILED)


# The stage each state is traced as (``Stats.traces``; stable names, tools read them).
RECV_TRACE = {RecvState.AWAITING_KV: "kv_dest_sent", RecvState.COMPLETE: "kv_complete", RecvState.FAILED: "kv_failed"}


class RecvTransfer(TransferMachine):
    TRANSITIONS = RECV_TRANSITIONS
    TRACE = RECV_TRACE

    def __init__(self, owner: Handoff, transfer_id: str, now: float, timeout_s: float, pull: bool = False):
        super().__init__(owner, transfer_id, RecvState.AWAITING_PEER, now, timeout_s)
        self.pull = pull
        """Cached blocks pulled from another server: complete without a first token."""
        self.block_ids: torch.Tensor | None = None  # [num_blocks] int64: destination blocks in the local cache
        self.num_skip_blocks = 0
        self.peer: str | None = None
        """The prefill side's transport name."""
        self.layers_received: set[int] = set()
        self.first: KVLayers | None = None
        """The notification that carried the first token (token, logprobs, generator state)."""
        self.cancelled = False
        """Failed because its request went away (not a transfer fault)."""
        self.peer_failed = False
        """The prefill side reported the failure (so it need not be told to stop)."""

    # ---- inputs -----------------------------------------------------------------------------------------
    def set_blocks(self, request_id: str, block_ids: torch.Tensor, num_skip_blocks: int) -> None:
        """block_ids  # [num_blocks] int64 on the port's device: where the uncached prompt blocks go"""
        if self.block_ids is not None:
            self.fail(f"transfer {self.transfer_id} admitted twice")
            return
        self.request_id, self.block_ids, self.num_skip_blocks = request_id, block_ids, num_skip_blocks

    def set_peer(self, transport_name: str) -> None:
        if self.peer is None:
            self.peer = transport_name

    def on_layers(self, msg: KVLayers) -> None:
        """A notification for this transfer (between steps: it scatters into the cache)."""
        owner = self.owner
        if msg.error:
            self.peer_failed = True
            self.fail(msg.error)
            return
        if self.state is not RecvState.AWAITING_KV:
            owner.stats.duplicate_notifications += 1  # nothing was asked for yet, or it is over
            return
        if self.error is not None:
            return  # failing or cancelled: its blocks may belong to someone else by now, never scatter into them
        layers = range(msg.layer_start, msg.layer_end)
        if msg.layer_end > owner.port.num_layers or any(layer in self.layers_received for layer in layers):
            owner.stats.duplicate_notifications += 1
            return
        if layers:
            if self.block_ids.numel():
                owner.port.scatter_layers(self.slab[msg.layer_start:msg.layer_end], self.block_ids, msg.layer_start,
                                          msg.layer_end)
            self.layers_received.update(layers)
            owner.stats.layers_received += len(layers)
            owner.stats.bytes_received += self.nbytes * len(layers) // owner.port.num_layers
            owner.trace(self.request_id, f"kv_layer_{msg.layer_start}_received")
        if msg.first_token is not None and self.first is None:
            self.first = msg

    def cancel(self) -> None:
        """The request no longer wants this KV (aborted, finished, or fell back another way)."""
        if self.error is None and not self.final:
            self.cancelled = True
            self.error = "cancelled"

    # ---- the machine --------------------------------------------------------------------------------------
    def advance(self, now: float) -> bool:
        """Apply what arrived; True once the transfer reached COMPLETE or FAILED and released its slab."""
        if self.released:
            return True
        if self.state is RecvState.AWAITING_PEER and self.error is None and self.block_ids is not None \
                and self.peer is not None:
            self._offer()
        if self.state is RecvState.AWAITING_KV and self.error is None and (self.first is not None or self.pull) \
                and len(self.layers_received) == self.owner.port.num_layers:
            self.owner.port.sync()
            self._to(RecvState.COMPLETE)
        if self.error is None and now > self.deadline and self.state is not RecvState.COMPLETE:
            self.fail(f"KV for {self.transfer_id} did not arrive within the deadline ({self.state.value})")
        if self.error is not None and self.block_ids is None and now <= self.deadline:
            return False  # failed before its request was admitted here: wait, so the failure reaches the request
        if self.error is not None and self.state is not RecvState.FAILED:
            self._to(RecvState.FAILED)
        if self.state in (RecvState.COMPLETE, RecvState.FAILED):
            self._release(now)
            return True
        return False

    # ---- internals ----------------------------------------------------------------------------------------
    def _offer(self) -> None:
        owner = self.owner
        n = self.block_ids.numel()
        if not self._reserve_slab(n, "decode"):
            return
        dest = KVDest(self.transfer_id, owner.transport.name, owner.region, self.offset, self.num_skip_blocks, n)
        try:
            owner.transport.send_notif(self.peer, encode(dest))
        except TransferError as e:
            self.fail(f"cannot reach the prefill side {self.peer}: {e}")
            return
        self._to(RecvState.AWAITING_KV)

    def _release(self, now: float) -> None:
        owner = self.owner
        self._free_slab(quarantine=self.state is RecvState.FAILED)
        self.released = True
        if self.state is RecvState.COMPLETE:
            owner.stats.transfers_received += 1
            took = now - self.started_at
            owner.stats.transfer_seconds_sum += took
            owner.stats.transfer_seconds_max = max(owner.stats.transfer_seconds_max, took)
            return
        if self.cancelled:
            owner.stats.transfers_cancelled += 1
        else:
            owner.stats.transfers_failed += 1
        if self.peer is not None and not self.peer_failed:  # the prefill side stops writing now
            try:
                owner.transport.send_notif(self.peer, encode(KVCancel(self.transfer_id, self.error or "")))
            except TransferError:
                pass

    def __repr__(self) -> str:
        return (f"RecvTransfer({self.transfer_id!r}, {self.state.value}, layers={len(self.layers_received)}, "
                f"error={self.error!r})")
