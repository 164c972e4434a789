"""Every KV hand-off of one server (or of one vLLM worker), both directions, over one transport and one port.

``Handoff`` owns the transport's registered staging memory and the live ``SendTransfer`` / ``RecvTransfer``
state machines (``transfer.send_transfer``, ``transfer.recv_transfer``: their docstrings hold the transition
tables), and routes the transport's notifications to them: a ``KVDest`` or ``KVCancel`` to the send of its
transfer id (made PENDING if the prompt has not arrived yet), a ``KVLayers`` to the receive. It counts bytes, descriptors,
transfers and failures once (``HandoffStats``) and keeps bounded per-request traces.

Who calls it: one thread, the owner's loop (the native server's loop; in a vLLM worker, the mover thread,
with the runner thread's ``begin_packing`` / ``gather_layer`` under the owner's lock). Between steps the
owner calls ``advance(now)``, which applies notifications (scattering arrived layers into the cache), moves
every transfer and returns those that ended. Inside a forward pass only ``pack_layer`` / ``gather_layer`` and
``progress`` may run: they gather, post WRITEs and take in destinations, but never scatter, never free memory
and never end a transfer; commands are not handled there.

    p = Handoff(transport, StagingPool(64 << 20, device), runner)        # prefill side
    p.expect_send("t1", "r1"); p.reserve_send("t1", num_blocks=3)
    p.begin_packing([("t1", block_ids, 0)])                             # the step that completes the prompt
    for layer in range(num_layers): <compute layer>; p.pack_layer(layer); p.progress()
    p.end_packing(); p.first_token("t1", token, None, None)
    while not p.advance(time.monotonic()).sends: ...                    # DONE or FAILED

A pull (a server asks another for KV blocks that one caches already) is the same send and receive: the owner
reserves the slab, ``begin_pull`` / ``pull_packed`` stand for the packing step (every layer at once), and the
puller's receive (``expect_recv(..., pull=True)``) completes without a first token.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field, fields

import torch

from duet.transfer.kv_port import KVPort
from duet.transfer.messages import KVCancel, KVDest, KVLayers
from duet.transfer.recv_transfer import RecvTransfer
from duet.transfer.send_transfer import SendState, SendTransfer
from duet.transfer.staging import StagingPool
from duet.transfer.transport import KVTransport, TransferError
from duet.transfer.wire import ProtocolError, decode, encode

logger = logging.getLogger(__name__)

MAX_TRACES = 1024


@dataclass
class HandoffFaults:
    """Fault injection for tests (the server reads them from ``DUET_FAULT_*``; zero in production)."""

    fail_write_p: float = 0.0
    """Probability that posting a layer's WRITE fails on the prefill side."""
    drop_notif_p: float = 0.0
    """Probability that an arrived notification is dropped on the receiving side."""


@dataclass
class HandoffStats:
    bytes_sent: int = 0
    descriptors_sent: int = 0
    layer_sends: int = 0
    transfers_sent: int = 0
    transfers_failed_send: int = 0
    bytes_received: int = 0
    layers_received: int = 0
    transfers_received: int = 0
    transfers_failed: int = 0
    transfers_cancelled: int = 0
    duplicate_notifications: int = 0
    """Notifications for a layer already received, a destination already known, or a transfer in a state that
    does not take them: dropped."""
    late_notifications: int = 0
    """Notifications for a transfer this side no longer (or never) had."""
    transfer_seconds_sum: float = 0.0
    """A receive's admission to all its KV in place, summed over completed receives."""
    transfer_seconds_max: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Ended:
    """Transfers that reached a final state in one ``advance``."""

    sends: list[SendTransfer] = field(default_factory=list)
    recvs: list[RecvTransfer] = field(default_factory=list)


class Handoff:
    def __init__(self, transport: KVTransport, staging: StagingPool, port: KVPort, *, timeout_s: float = 30.0,
                 faults: HandoffFaults | None = None):
        """Registers ``staging.buffer`` with ``transport`` (peers write into it). ``timeout_s``: every transfer's
        deadline from its creation (a hand-off that takes longer fails, and its owner falls back)."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.transport = transport
        self.staging = staging
        self.port = port
        self.timeout_s = timeout_s
        self.faults = faults or HandoffFaults()
        self.staging_handle = transport.register(staging.buffer)
        self.region = transport.describe(self.staging_handle)
        self.stats = HandoffStats()
        self.sends: dict[str, SendTransfer] = {}
        self.recvs: dict[str, RecvTransfer] = {}
        self.traces: dict[str, dict[str, float]] = {}
        self._packing: list[SendTransfer] = []  # this step's sends, in plan_gather order
        self._arrived: list[KVLayers] = []  # notifications taken mid-step, applied by the next advance
        self._ended: dict[str, float] = {}  # transfer id -> until when a late notice for it is ignored

    # ---- prefill side -----------------------------------------------------------------------------------
    def expect_send(self, transfer_id: str, request_id: str = "", timeout_s: float | None = None,
                    local_id: str = "") -> SendTransfer:
        """The send of ``transfer_id`` (made PENDING if new; a ``KVDest`` may have made it already).
        ``request_id``: the router's id (traces); ``local_id``: the owner's id for the prompt it computes."""
        t = self.sends.get(transfer_id)
        if t is None:
            t = self.sends[transfer_id] = SendTransfer(self, transfer_id, time.monotonic(), timeout_s or self.timeout_s)
        t.request_id = request_id or t.request_id
        t.local_id = local_id or t.local_id
        return t

    def reserve_send(self, transfer_id: str, num_blocks: int) -> str | None:
        """The prompt was admitted: reserve its slab. Returns why not (the transfer then fails), or None."""
        t = self.expect_send(transfer_id)
        t.reserve(num_blocks, time.monotonic())
        return t.error

    def begin_packing(self, items: list[tuple[str, torch.Tensor, int]]) -> int:
        """The step about to run completes these prompts: ``(transfer id, block ids, cached tokens)``, block ids
        ``[num_blocks]`` int64 on the port's device. Returns how many will be packed (0: no layer hook needed)."""
        self._packing = []
        for transfer_id, block_ids, num_cached_tokens in items:
            t = self.sends.get(transfer_id)
            if t is None or t.state is not SendState.ADMITTED or t.error is not None:
                continue
            t.begin_packing(block_ids, num_cached_tokens)
            if t.state is SendState.PACKING:
                self._packing.append(t)
        if self._packing:
            self.port.plan_gather([t.block_ids for t in self._packing])
        return len(self._packing)

    def gather_layer(self, layer: int) -> list[str]:
        """Layer ``layer`` was computed: gather it into every packing slab. Returns their transfer ids (the
        caller then marks them ``packed``, on the owner's thread)."""
        for i, t in enumerate(self._packing):
            self.port.gather_layer(layer, i, out=t.slab[layer:layer + 1])
        self.port.sync()
        return [t.transfer_id for t in self._packing]

    def packed(self, transfer_id: str, num_layers: int) -> None:
        t = self.sends.get(transfer_id)
        if t is not None:
            t.packed(num_layers)
            self.trace(t.request_id or transfer_id, f"layer_{num_layers - 1}_computed")

    def pack_layer(self, layer: int) -> None:
        """``gather_layer`` + ``packed`` on one thread (the native server's layer hook)."""
        for transfer_id in self.gather_layer(layer):
            self.packed(transfer_id, layer + 1)

    def end_packing(self) -> None:
        """The packing step ended (its forward pass no longer writes any slab)."""
        for t in self._packing:
            t.end_step()
        self._packing = []

    def first_token(self, transfer_id: str, token: int, logprobs: dict[int, float] | None,
                    generator_state: bytes | None) -> None:
        t = self.sends.get(transfer_id)
        if t is not None:
            t.set_first_token(token, logprobs, generator_state, time.monotonic())

    def begin_pull(self, transfer_id: str) -> torch.Tensor | None:
        """A pull's blocks are cached here: the owner copies every layer of them into the returned slab (it may do
        so off the loop thread) and then calls ``pull_packed``. None when the send is not ADMITTED (it fails).

        slab  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], a view of the staging
        """
        t = self.sends.get(transfer_id)
        if t is None:
            return None
        t.begin_pull()
        return t.slab if t.state is SendState.PACKING and t.error is None else None

    def pull_packed(self, transfer_id: str, error: str | None = None) -> None:
        """The copy ``begin_pull`` asked for ended (``error``: it failed); the layers go out from the next advance."""
        t = self.sends.get(transfer_id)
        if t is not None:
            t.pull_packed(error)
            if error is None:
                self.trace(t.request_id or transfer_id, "pull_packed")

    def abort_send(self, transfer_id: str, reason: str = "aborted") -> None:
        t = self.sends.get(transfer_id)
        if t is not None:
            t.fail(reason)

    # ---- decode side ------------------------------------------------------------------------------------
    def expect_recv(self, transfer_id: str, timeout_s: float | None = None, pull: bool = False) -> RecvTransfer:
        """The receive of ``transfer_id`` (made if new). ``pull``: cached blocks another server sends, no first token."""
        t = self.recvs.get(transfer_id)
        if t is None:
            t = self.recvs[transfer_id] = RecvTransfer(self, transfer_id, time.monotonic(), timeout_s or self.timeout_s,
                                                       pull=pull)
        return t

    def recv_blocks(self, transfer_id: str, request_id: str, block_ids: torch.Tensor, num_skip_blocks: int) -> None:
        """The request's uncached prompt blocks (``[num_blocks]`` int64 on the port's device) take the KV."""
        self.expect_recv(transfer_id).set_blocks(request_id, block_ids, num_skip_blocks)

    def peer_ready(self, transfer_id: str, peer_transport_name: str) -> None:
        """The prefill side of ``transfer_id`` is reachable on the transport under this name."""
        self.expect_recv(transfer_id).set_peer(peer_transport_name)

    def fail_recv(self, transfer_id: str, reason: str) -> None:
        t = self.recvs.get(transfer_id)
        if t is not None:
            t.fail(reason)

    def cancel_recv(self, transfer_id: str) -> None:
        t = self.recvs.get(transfer_id)
        if t is not None:
            t.cancel()

    def decline(self, transfer_id: str, peer_transport_name: str, reason: str) -> None:
        """Tell the prefill side of a transfer this side never started (no room) not to send it."""
        try:
            self.transport.send_notif(peer_transport_name, encode(KVCancel(transfer_id, reason)))
        except TransferError as e:
            logger.warning("cannot tell %s to drop transfer %s: %s", peer_transport_name, transfer_id, e)

    # ---- both ---------------------------------------------------------------------------------------------
    def progress(self) -> None:
        """Mid-step: take in destinations, post what is packed, drive posted WRITEs. Ends nothing."""
        self._take_notifications()
        for t in self._packing:
            t.advance_posting()
        for t in self.sends.values():
            t.poll_handles()

    def advance(self, now: float | None = None) -> Ended:
        """Between steps: apply notifications, move every transfer; the ones that ended, resources freed."""
        now = time.monotonic() if now is None else now
        self._take_notifications()
        arrived, self._arrived = self._arrived, []
        for msg in arrived:
            t = self.recvs.get(msg.transfer_id)
            if t is None:
                self.stats.late_notifications += 1
            else:
                t.on_layers(msg)
        ended = Ended()
        for tid, t in list(self.sends.items()):
            if t.advance(now):
                del self.sends[tid]
                self._ended[tid] = now + self.timeout_s
                ended.sends.append(t)
                if t.error:
                    logger.warning("KV send %s failed: %s", tid, t.error)
        for tid, t in list(self.recvs.items()):
            if t.advance(now):
                del self.recvs[tid]
                ended.recvs.append(t)
                if t.error and not t.cancelled:
                    logger.warning("KV receive %s failed: %s", tid, t.error)
        while self._ended and next(iter(self._ended.values())) < now:  # insertion order is expiry order
            self._ended.pop(next(iter(self._ended)))
        return ended

    @property
    def busy(self) -> bool:
        """Transfers are open: they progress only when the owner polls, so it should not sleep long."""
        return bool(self.sends or self.recvs)

    def trace(self, request_id: str, stage: str) -> None:
        self.traces.setdefault(request_id, {}).setdefault(stage, time.time())
        while len(self.traces) > MAX_TRACES:
            self.traces.pop(next(iter(self.traces)))

    def close(self) -> None:
        """Release every open transfer's memory and the transport (owner shutting down)."""
        for t in list(self.sends.values()):
            t.fail("shutting down")
            t.end_step()
        for t in list(self.recvs.values()):
            t.cancel()
        self.advance()
        self.transport.close()

    # ---- internals ----------------------------------------------------------------------------------------
    def _take_notifications(self) -> None:
        for peer, raw in self.transport.notifications():
            if self.faults.drop_notif_p and random.random() < self.faults.drop_notif_p:
                logger.warning("dropping a notification from %s (drop_notif_p)", peer)
                continue
            try:
                msg = decode(raw)
            except ProtocolError as e:
                logger.warning("bad notification from %s: %s", peer, e)
                continue
            if isinstance(msg, KVLayers):
                self._arrived.append(msg)
            elif isinstance(msg, (KVDest, KVCancel)) and msg.transfer_id in self._ended:
                self.stats.late_notifications += 1  # a send that ended already: do not start a new one
            elif isinstance(msg, KVDest):
                self.expect_send(msg.transfer_id).set_dest(msg)
            elif isinstance(msg, KVCancel):
                t = self.expect_send(msg.transfer_id)
                t.peer_cancelled = True
                t.fail(f"the decode side cancelled it: {msg.reason or 'no reason given'}")
            else:
                logger.warning("unexpected %s notification from %s", type(msg).__name__, peer)
