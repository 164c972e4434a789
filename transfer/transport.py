"""The KV transport interface: one-sided WRITEs of registered memory, plus small notifications.

A prefill server (P) writes packed KV slabs straight into a decode server's (D) registered memory; D learns
that bytes have landed from a notification that the transport delivers only after them. Everything else
(who writes where, ids, deadlines) travels on the ZMQ control plane as :mod:`transfer.wire` messages; the
transport only moves bytes and notifications. Implementations: NIXL/UCX (:mod:`transfer.nixl_transport`)
and a ZeroMQ TCP fallback (:mod:`transfer.zmq_transport`).
"""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

TransferState = Literal["PENDING", "DONE", "ERROR"]
PENDING: TransferState = "PENDING"
DONE: TransferState = "DONE"
ERROR: TransferState = "ERROR"

# (local_offset, remote_offset, nbytes) per descriptor; a list of triples or an int64 array [num_descs, 3].
Ranges = Sequence[tuple[int, int, int]] | np.ndarray


class TransferError(RuntimeError):
    """A transfer or notification could not be posted (the peer is unknown, gone, or refused it)."""


class PeerNotConnected(TransferError):
    """The named peer was never connected (or was disconnected) on this transport."""


@dataclass(frozen=True)
class RemoteRegion:
    """A peer's registered region, as the peer's ``describe()`` returned it. Sent over the control plane.

    Plain fields only, so it nests in any :mod:`transfer.wire` message.
    """

    agent: str
    """Transport name of the owner (its ``KVTransport.name``)."""
    region_id: int
    """The owner's id for the region (unique within that transport instance)."""
    nbytes: int
    """Region size; remote offsets + sizes must stay within it."""
    addr: int = 0
    """Virtual address in the owner's process (NIXL; 0 for transports that address by region id)."""
    mem_type: str = "DRAM"
    """``DRAM`` or ``VRAM``."""
    device_id: int = 0
    """CUDA device index for VRAM, 0 for DRAM."""


@dataclass(eq=False)
class RegionHandle:
    """A local registered region. Holds a reference to the tensor so its memory outlives the registration."""

    region_id: int
    tensor: object = field(repr=False)  # the registered contiguous torch.Tensor, any shape and dtype
    addr: int
    nbytes: int
    mem_type: str  # DRAM | VRAM
    device_id: int
    native: object = field(default=None, repr=False)  # backend bookkeeping (NIXL registration list)


@dataclass(eq=False)
class TransferHandle:
    """One posted WRITE (one or many descriptors, one notification). Poll it, then release it."""

    peer: str
    nbytes: int
    num_descs: int
    state: TransferState = PENDING
    error: str | None = None
    native: object = field(default=None, repr=False)  # backend request handle / transfer id
    released: bool = False


class KVTransport(abc.ABC):
    """Moves bytes between registered regions of two processes, with notifications.

    Who calls it: the engine loop of a prefill or decode server (and benchmarks/tests), in the process that
    owns the registered tensors. Threads: an instance is NOT thread-safe; every call must come from one
    thread (the one that created it). There is no background progress thread: transfers and incoming
    notifications advance only inside ``poll``, ``notifications``, ``wait`` and ``wait_notifications``, so the
    owner must call one of them regularly (each engine step), also on the receiving side.

    Blocking: ``register``/``deregister``/``connect``/``disconnect`` may block briefly (memory pinning,
    a socket connect bounded by the backend's timeout); ``write``/``write_many``/``send_notif`` only post;
    ``poll``/``notifications`` never block; ``wait``/``wait_notifications`` block up to their deadline.

    Memory ownership: the caller owns registered tensors. A tensor must stay registered (and unfreed)
    while any transfer reads or writes it; the transport keeps a reference until ``deregister``. Between a
    ``write`` and its handle reaching DONE or ERROR the writer must not modify the source bytes; the receiver
    must not read the destination bytes before the write's notification arrives. A handle in ERROR means
    the destination bytes are undefined (possibly partly written).

    Naming: ``name`` is unique per instance (a random suffix is appended), so a restarted server never
    collides with stale metadata of its previous life held by peers.
    """

    name: str
    backend: str

    # ---- memory
    @abc.abstractmethod
    def register(self, tensor) -> RegionHandle:
        """Register a contiguous tensor (DRAM on CPU, VRAM on CUDA) for local or remote access."""

    @abc.abstractmethod
    def deregister(self, handle: RegionHandle) -> None:
        """Undo ``register``; no transfer may be in flight on the region."""

    @abc.abstractmethod
    def describe(self, handle: RegionHandle) -> RemoteRegion:
        """What a peer needs to write into ``handle``'s region (send it over the control plane)."""

    # ---- peers
    @abc.abstractmethod
    def metadata(self) -> bytes:
        """Opaque bytes a peer passes to ``connect`` to reach this instance.

        NIXL's metadata embeds the regions registered so far: register first, then publish metadata (after
        registering more, peers must ``connect`` again with fresh metadata)."""

    @abc.abstractmethod
    def connect(self, peer_name: str, peer_metadata: bytes) -> None:
        """Make ``peer_name`` writable. Only the writer needs to connect; the receiver need not."""

    @abc.abstractmethod
    def disconnect(self, peer_name: str) -> None:
        """Forget a peer; its pending transfers end in ERROR."""

    def connected(self, peer_name: str) -> bool:
        """Whether ``peer_name`` is connected and its connection not known to be lost (it dropped after a network
        partition, say). False means: ``connect`` again (with the same metadata) before the next transfer."""
        return True

    # ---- data
    def write(self, local: RegionHandle, local_offset: int, nbytes: int, remote: RemoteRegion, remote_offset: int,
              notif: bytes = b"") -> TransferHandle:
        """Post one asynchronous WRITE of ``nbytes``; ``notif`` (if non-empty) reaches the peer after the data."""
        return self.write_many(local, remote, [(local_offset, remote_offset, nbytes)], notif)

    @abc.abstractmethod
    def write_many(self, local: RegionHandle, remote: RemoteRegion, ranges: Ranges,
                   notif: bytes = b"") -> TransferHandle:
        """Post one WRITE made of many descriptors ``(local_offset, remote_offset, nbytes)``; one notification
        after all of them landed. Raises PeerNotConnected for an unknown peer, ValueError for bad ranges;
        a peer that is gone gives a handle in ERROR (now or at a later ``poll``)."""

    @abc.abstractmethod
    def poll(self, handle: TransferHandle) -> TransferState:
        """Current state of a transfer; drives progress. Never blocks."""

    @abc.abstractmethod
    def release(self, handle: TransferHandle) -> None:
        """Free the transfer's resources (cancels it if still pending). Idempotent."""

    # ---- notifications
    @abc.abstractmethod
    def notifications(self) -> list[tuple[str, bytes]]:
        """(peer name, notif) received since the last call; drives progress. Never blocks.

        Per peer, notifications come in the order the peer posted them; across peers no order is promised.
        """

    @abc.abstractmethod
    def send_notif(self, peer_name: str, notif: bytes) -> None:
        """Send a notification carrying no data. Not ordered with respect to the peer's pending writes."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release handles, deregister memory, drop peers. The instance is unusable afterwards."""

    # ---- helpers shared by every backend
    def wait(self, handle: TransferHandle, deadline_s: float, poll_interval_s: float = 50e-6) -> None:
        """Poll until DONE; TransferError on ERROR, TimeoutError after ``deadline_s`` seconds from now."""
        give_up = time.monotonic() + deadline_s
        sleep_s = 0.0
        while True:
            state = self.poll(handle)
            if state == DONE:
                return
            if state == ERROR:
                raise TransferError(f"transfer to {handle.peer} failed: {handle.error or 'unknown error'}")
            if time.monotonic() >= give_up:
                raise TimeoutError(f"transfer to {handle.peer} ({handle.nbytes} bytes) not done after {deadline_s}s")
            # Back off from a tight spin to ~1 ms: cores are shared with the engine's own work.
            time.sleep(sleep_s)
            sleep_s = min(1e-3, max(poll_interval_s, sleep_s * 2))

    def wait_notifications(self, count: int, deadline_s: float) -> list[tuple[str, bytes]]:
        """Collect at least ``count`` notifications; TimeoutError (listing what arrived) after ``deadline_s``."""
        give_up = time.monotonic() + deadline_s
        got: list[tuple[str, bytes]] = []
        sleep_s = 0.0
        while True:
            new = self.notifications()
            got.extend(new)
            if len(got) >= count:
                return got
            if time.monotonic() >= give_up:
                raise TimeoutError(f"{len(got)}/{count} notifications after {deadline_s}s: {got[:8]!r}")
            sleep_s = 0.0 if new else min(1e-3, max(50e-6, sleep_s * 2))
            time.sleep(sleep_s)

    def __enter__(self) -> "KVTransport":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- validation shared by backends
    @staticmethod
    def _check_ranges(local: RegionHandle, remote: RemoteRegion, ranges: Ranges) -> np.ndarray:
        """``ranges`` as int64 [num_descs, 3] (local_offset, remote_offset, nbytes), checked against both regions."""
        arr = np.asarray(ranges, dtype=np.int64).reshape(-1, 3) if len(ranges) else np.zeros((0, 3), np.int64)
        if arr.shape[0] == 0:
            raise ValueError("a write needs at least one range")
        local_off, remote_off, sizes = arr[:, 0], arr[:, 1], arr[:, 2]
        if (sizes <= 0).any() or (local_off < 0).any() or (remote_off < 0).any():
            raise ValueError("offsets must be >= 0 and sizes > 0")
        if int((local_off + sizes).max()) > local.nbytes:
            raise ValueError(f"a range ends past the local region ({local.nbytes} bytes)")
        if int((remote_off + sizes).max()) > remote.nbytes:
            raise ValueError(
                f"a range ends past the remote region {remote.agent}/{remote.region_id} ({remote.nbytes} bytes)")
        return arr
