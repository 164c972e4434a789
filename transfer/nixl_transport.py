"""KVTransport over NIXL (UCX backend): RDMA, NVLink, CUDA IPC or shared memory, whatever UCX finds.

The agent is created WITHOUT NIXL's progress thread (it busy-polls a whole core): UCX advances only when
we call into it (``check_xfer_state`` / ``get_new_notifs``), which happens in ``poll``/``notifications``.
A WRITE's notification is carried by UCX after the data on the same endpoint, so the receiver sees the
notif only once the bytes are in its memory. Tensors on CUDA register as VRAM, others as DRAM.

A dead peer surfaces as ``nixlRemoteDisconnectError`` from post or status calls (UCX error handling mode
``peer``, NIXL's default); we turn that into a handle in ERROR, never a hang.
"""
from __future__ import annotations

import logging
import secrets

import numpy as np

from duet.transfer.transport import (
    DONE,
    ERROR,
    PENDING,
    KVTransport,
    PeerNotConnected,
    Ranges,
    RegionHandle,
    RemoteRegion,
    TransferError,
    TransferHandle,
    TransferState,
)

logger = logging.getLogger(__name__)

try:  # the CUDA-13 wheel first, then the generic package name
    from nixl_cu13._api import nixl_agent, nixl_agent_config
except ImportError:  # pragma: no cover - depends on the installed wheel
    from nixl._api import nixl_agent, nixl_agent_config  # type: ignore[no-redef]


class NixlTransport(KVTransport):
    """One NIXL agent with a UCX backend and no progress thread. See :class:`KVTransport` for the contract."""

    backend = "nixl"

    def __init__(self, name: str = "duet", *, backends: tuple[str, ...] = ("UCX",), unique: bool = True):
        self.name = f"{name}-{secrets.token_hex(4)}" if unique else name
        config = nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False, backends=list(backends))
        self._agent = nixl_agent(self.name, config)
        self._regions: dict[int, RegionHandle] = {}
        self._next_region_id = 0
        self._peers: set[str] = set()
        self._suspect: set[str] = set()  # peers a post, status or notification failed with: reconnect them
        self._live: set[TransferHandle] = set()  # posted and not released

    # ---- memory
    def register(self, tensor) -> RegionHandle:
        if not tensor.is_contiguous():
            raise ValueError("only contiguous tensors can be registered")
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            raise ValueError("cannot register an empty tensor")
        mem_type = "VRAM" if tensor.is_cuda else "DRAM"
        device_id = (tensor.device.index or 0) if tensor.is_cuda else 0
        addr = tensor.data_ptr()
        reg = self._agent.register_memory([(addr, nbytes, device_id, "")], mem_type)
        handle = RegionHandle(self._next_region_id, tensor, addr, nbytes, mem_type, device_id, native=reg)
        self._regions[handle.region_id] = handle
        self._next_region_id += 1
        return handle

    def deregister(self, handle: RegionHandle) -> None:
        if self._regions.pop(handle.region_id, None) is None:
            return
        self._agent.deregister_memory(handle.native)
        handle.native = None

    def describe(self, handle: RegionHandle) -> RemoteRegion:
        return RemoteRegion(agent=self.name, region_id=handle.region_id, nbytes=handle.nbytes, addr=handle.addr,
                            mem_type=handle.mem_type, device_id=handle.device_id)

    # ---- peers
    def metadata(self) -> bytes:
        # Full agent metadata: connection info plus every registered region's remote keys. Registering
        # after this call means the peer needs fresh metadata (call connect() again with it).
        return self._agent.get_agent_metadata()

    def connect(self, peer_name: str, peer_metadata: bytes) -> None:
        if peer_name in self._peers:  # fresh metadata (new regions) replaces the old
            self._agent.remove_remote_agent(peer_name)
            self._peers.discard(peer_name)
        try:  # UCX creates the endpoint here: a peer that is already gone fails now
            loaded = self._agent.add_remote_agent(peer_metadata)
        except Exception as exc:  # noqa: BLE001 - nixlBackendError, nixlInvalidParamError, ...
            raise TransferError(
                f"{self.name}: cannot load metadata of {peer_name}: {type(exc).__name__}: {exc}") from exc
        loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
        if loaded != peer_name:
            self._agent.remove_remote_agent(loaded)
            raise ValueError(f"metadata is for agent {loaded!r}, not {peer_name!r}")
        self._peers.add(peer_name)
        self._suspect.discard(peer_name)

    def connected(self, peer_name: str) -> bool:
        # UCX's endpoint to a peer that errored (a partition, a reset connection) stays failed; loading the
        # metadata again makes a new one.
        return peer_name in self._peers and peer_name not in self._suspect

    def disconnect(self, peer_name: str) -> None:
        if peer_name not in self._peers:
            return
        for handle in [h for h in self._live if h.peer == peer_name]:
            self.release(handle)
        self._peers.discard(peer_name)
        self._suspect.discard(peer_name)
        try:
            self._agent.remove_remote_agent(peer_name)
        except Exception as exc:  # noqa: BLE001 - NIXL raises its own exception types
            logger.warning("removing NIXL peer %s: %s", peer_name, exc)

    # ---- data
    def write_many(self, local: RegionHandle, remote: RemoteRegion, ranges: Ranges,
                   notif: bytes = b"") -> TransferHandle:
        if remote.agent not in self._peers:
            raise PeerNotConnected(f"{self.name}: peer {remote.agent!r} is not connected")
        if local.region_id not in self._regions:
            raise ValueError(f"local region {local.region_id} is not registered")
        arr = self._check_ranges(local, remote, ranges)
        num_descs = arr.shape[0]
        local_descs = np.empty((num_descs, 3), dtype=np.uint64)
        local_descs[:, 0] = local.addr + arr[:, 0]
        local_descs[:, 1] = arr[:, 2]
        local_descs[:, 2] = local.device_id
        remote_descs = np.empty((num_descs, 3), dtype=np.uint64)
        remote_descs[:, 0] = remote.addr + arr[:, 1]
        remote_descs[:, 1] = arr[:, 2]
        remote_descs[:, 2] = remote.device_id
        handle = TransferHandle(peer=remote.agent, nbytes=int(arr[:, 2].sum()), num_descs=num_descs)
        try:
            handle.native = self._agent.initialize_xfer(
                "WRITE",
                self._agent.get_xfer_descs(local_descs, local.mem_type),
                self._agent.get_xfer_descs(remote_descs, remote.mem_type),
                remote.agent,
                notif,
            )
            self._live.add(handle)
            status = self._agent.transfer(handle.native)
        except Exception as exc:  # noqa: BLE001 - nixlRemoteDisconnectError, nixlBackendError, ...
            self._fail(handle, f"post failed: {type(exc).__name__}: {exc}")
            return handle
        if status == "DONE":
            handle.state = DONE
        elif status == "ERR":
            self._fail(handle, "post returned ERR")
        return handle

    def poll(self, handle: TransferHandle) -> TransferState:
        if handle.state != PENDING or handle.released:
            return handle.state
        try:
            status = self._agent.check_xfer_state(handle.native)
        except Exception as exc:  # noqa: BLE001
            self._fail(handle, f"{type(exc).__name__}: {exc}")
            return handle.state
        if status == "DONE":
            handle.state = DONE
        elif status == "ERR":
            self._fail(handle, "transfer state ERR")
        return handle.state

    def _fail(self, handle: TransferHandle, error: str) -> None:
        logger.warning("NIXL write %s -> %s: %s", self.name, handle.peer, error)
        handle.state, handle.error = ERROR, error
        self._suspect.add(handle.peer)

    def release(self, handle: TransferHandle) -> None:
        if handle.released:
            return
        handle.released = True
        self._live.discard(handle)
        if handle.state == PENDING:
            handle.state, handle.error = ERROR, "released while pending"
        if handle.native is None:
            return
        try:
            handle.native.release()  # cancels a pending request, or raises when it cannot
        except Exception as exc:  # noqa: BLE001 - the native handle stays on NIXL's leak list, freed with the agent
            logger.warning("releasing NIXL request to %s: %s", handle.peer, exc)

    # ---- notifications
    def notifications(self) -> list[tuple[str, bytes]]:
        new = self._agent.get_new_notifs()
        return [(peer, msg) for peer, msgs in new.items() for msg in msgs]

    def send_notif(self, peer_name: str, notif: bytes) -> None:
        if peer_name not in self._peers:
            raise PeerNotConnected(f"{self.name}: peer {peer_name!r} is not connected")
        try:
            self._agent.send_notif(peer_name, notif)
        except Exception as exc:  # noqa: BLE001
            self._suspect.add(peer_name)
            raise TransferError(f"notification to {peer_name} failed: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        if self._agent is None:
            return
        for handle in list(self._live):
            self.release(handle)
        for handle in list(self._regions.values()):
            try:
                self.deregister(handle)
            except Exception as exc:  # noqa: BLE001
                logger.warning("deregistering region %s: %s", handle.region_id, exc)
        for peer in list(self._peers):
            self.disconnect(peer)
        self._agent = None  # the C++ agent (and its UCX worker) is destroyed with the Python object
