"""KVTransport over ZeroMQ TCP, for hosts without NIXL (and for tests): honest, simple, not fast.

Each instance binds one ROUTER socket (``tcp://host:port``, a random port by default) and advertises
``tcp://advertise_host:port`` in its metadata (``advertise_host`` defaults to ``host``, and is required when
``host`` is a wildcard: the server passes what ``--advertise-host`` resolved to). A writer keeps one
DEALER per peer. A WRITE is one multipart message ``[ZmqWrite header, payload of range 0, range 1, ...]``;
the receiver, inside its own ``notifications()``/``poll()`` call, validates it, copies every payload into
the registered tensor, queues the notif (so the notif is only ever seen after the data), and answers with a
``ZmqAck`` on the same connection. The writer's handle turns DONE when that ACK arrives, or ERROR when the
receiver refused the write or the TCP connection to the peer dropped (socket monitor), so a dead peer
never leaves a handle pending forever. Peers are not reconnected: a restarted peer has a new name and
new metadata, and the writer connects to it afresh.

With ``keys`` (:class:`transfer.curve.ZmqKeys`) the ROUTER is a CURVE server, every DEALER a CURVE client,
and the transport runs its own ZAP authenticator thread on its own ``zmq.Context`` (the process's
authenticator on ``zmq.Context.instance()`` does not cover it): a writer without authorized keys fails
its handshake, so ``connect()`` raises and nothing it sends reaches the ROUTER.

Payloads leave CPU tensors without a copy (zero-copy frames); CUDA tensors go through host memory.
"""
from __future__ import annotations

import itertools
import logging
import secrets
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from duet.transfer.curve import ZmqKeys, secure_client, secure_server, start_authenticator
from duet.transfer.transport import (DONE, ERROR, PENDING, KVTransport, PeerNotConnected, Ranges, RegionHandle,
                                     RemoteRegion, TransferError, TransferHandle, TransferState)
from duet.transfer.wire import Message, ProtocolError, decode, encode

logger = logging.getLogger(__name__)


@dataclass
class ZmqPeerInfo(Message):
    """``ZmqTransport.metadata()``: where to reach an instance."""

    TYPE = "zmq.peer"
    name: str
    endpoint: str


@dataclass
class ZmqWrite(Message):
    """Header frame of a WRITE; one payload frame per range follows, in order."""

    TYPE = "zmq.write"
    sender: str
    xfer_id: int
    region_id: int
    ranges: bytes  # little-endian int64 [num_descs, 2]: (remote_offset, nbytes)
    notif: bytes


@dataclass
class ZmqNotif(Message):
    TYPE = "zmq.notif"
    sender: str
    notif: bytes


@dataclass
class ZmqAck(Message):
    """The receiver's answer to one ZmqWrite: ``error`` is None when every byte landed."""

    TYPE = "zmq.ack"
    xfer_id: int
    error: str | None = None


_DEAD_EVENTS = {zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED, zmq.EVENT_MONITOR_STOPPED}
_HANDSHAKE_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
                     zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed (protocol; CURVE keys on one side only?)",
                     zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake refused (CURVE key not authorized)"}


@dataclass(eq=False)
class _Peer:
    name: str
    endpoint: str
    dealer: zmq.Socket
    monitor: zmq.Socket
    alive: bool = True


class ZmqTransport(KVTransport):
    """ZeroMQ implementation of :class:`KVTransport` (see there for the threading and ownership contract)."""

    backend = "zmq"

    def __init__(self, name: str = "duet", *, host: str = "127.0.0.1", port: int = 0,
                 advertise_host: str | None = None, connect_timeout_s: float = 5.0, unique: bool = True,
                 keys: ZmqKeys | None = None):
        if advertise_host is None and host in ("0.0.0.0", "*", "::"):
            raise ValueError(f"bound to {host} (every interface): give advertise_host, the address peers dial")
        self.name = f"{name}-{secrets.token_hex(4)}" if unique else name
        self._connect_timeout_s = connect_timeout_s
        self._keys = keys
        self._ctx = zmq.Context(io_threads=1)
        self._auth = start_authenticator(self._ctx, keys)  # None without keys
        self._router = self._ctx.socket(zmq.ROUTER)
        secure_server(self._router, keys)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.SNDHWM, 0)
        self._router.setsockopt(zmq.RCVHWM, 0)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an ACK to a vanished writer raises, not blocks
        try:
            self._router.bind(f"tcp://{host}:{port or '*'}")
        except zmq.ZMQError:
            if self._auth is not None:
                self._auth.stop()
            self._ctx.destroy(linger=0)
            raise
        bound = self._router.getsockopt_string(zmq.LAST_ENDPOINT)  # tcp://ip:port
        bound_port = bound.rsplit(":", 1)[1]
        self.endpoint = f"tcp://{advertise_host or host}:{bound_port}"  # what peers dial: the metadata carries it
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        self._peers: dict[str, _Peer] = {}
        self._by_socket: dict[zmq.Socket, _Peer] = {}
        self._regions: dict[int, RegionHandle] = {}
        self._region_ids = itertools.count()
        self._xfer_ids = itertools.count(1)
        self._pending: dict[int, TransferHandle] = {}
        self._inbox: list[tuple[str, bytes]] = []

    # ---- memory
    def register(self, tensor) -> RegionHandle:
        if not tensor.is_contiguous():
            raise ValueError("only contiguous tensors can be registered")
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            raise ValueError("cannot register an empty tensor")
        flat = tensor.reshape(-1).view(torch.uint8)  # [nbytes], shares the tensor's memory
        native = flat.numpy() if flat.device.type == "cpu" else flat
        handle = RegionHandle(next(self._region_ids), tensor, tensor.data_ptr(), nbytes,
                              "VRAM" if tensor.is_cuda else "DRAM", (tensor.device.index or 0) if tensor.is_cuda else 0,
                              native=native)
        self._regions[handle.region_id] = handle
        return handle

    def deregister(self, handle: RegionHandle) -> None:
        self._regions.pop(handle.region_id, None)
        handle.native = None

    def describe(self, handle: RegionHandle) -> RemoteRegion:
        return RemoteRegion(agent=self.name, region_id=handle.region_id, nbytes=handle.nbytes, addr=0,
                            mem_type=handle.mem_type, device_id=handle.device_id)

    # ---- peers
    def metadata(self) -> bytes:
        return encode(ZmqPeerInfo(name=self.name, endpoint=self.endpoint))

    def connect(self, peer_name: str, peer_metadata: bytes) -> None:
        """Connect a DEALER to the peer; blocks until the ZMTP handshake (CURVE with keys) succeeded.

        TransferError after the timeout, or as soon as the peer refuses the handshake.
        """
        try:
            info = decode(peer_metadata)
        except ProtocolError as exc:
            raise ValueError(f"bad ZMQ peer metadata: {exc}") from exc
        if not isinstance(info, ZmqPeerInfo) or info.name != peer_name:
            raise ValueError(f"metadata is for {getattr(info, 'name', info)!r}, not {peer_name!r}")
        self.disconnect(peer_name)
        dealer = self._ctx.socket(zmq.DEALER)
        secure_client(dealer, self._keys)
        for opt, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0), (zmq.RECONNECT_IVL, -1),
                           (zmq.HEARTBEAT_IVL, 1000), (zmq.HEARTBEAT_TIMEOUT, 5000)):
            dealer.setsockopt(opt, value)  # heartbeats catch a peer host that vanished without closing TCP
        # Wait for the handshake, not just TCP: with CURVE a refused key only shows up there.
        monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
                                            | zmq.EVENT_MONITOR_STOPPED | sum(_HANDSHAKE_FAILED))
        dealer.connect(info.endpoint)
        give_up = time.monotonic() + self._connect_timeout_s
        connected, why = False, f"cannot reach it within {self._connect_timeout_s}s"
        while not connected:
            remaining_ms = int((give_up - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not monitor.poll(remaining_ms):
                break
            event = recv_monitor_message(monitor)["event"]
            connected = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
            if event in _HANDSHAKE_FAILED:
                why = _HANDSHAKE_FAILED[event]
                break
            if event in _DEAD_EVENTS:
                break
        if not connected:
            dealer.disable_monitor()
            monitor.close(linger=0)
            dealer.close(linger=0)
            raise TransferError(f"{self.name}: {peer_name} at {info.endpoint}: {why}")
        peer = _Peer(peer_name, info.endpoint, dealer, monitor)
        self._peers[peer_name] = peer
        self._by_socket[dealer] = self._by_socket[monitor] = peer
        self._poller.register(dealer, zmq.POLLIN)
        self._poller.register(monitor, zmq.POLLIN)

    def connected(self, peer_name: str) -> bool:
        self._progress()  # a disconnect the monitor reported is seen now, not at the next poll
        peer = self._peers.get(peer_name)
        return peer is not None and peer.alive

    def disconnect(self, peer_name: str) -> None:
        peer = self._peers.pop(peer_name, None)
        if peer is None:
            return
        self._peer_gone(peer, "disconnected")
        for sock in (peer.dealer, peer.monitor):
            self._poller.unregister(sock)
            del self._by_socket[sock]
        peer.dealer.disable_monitor()
        peer.monitor.close(linger=0)
        peer.dealer.close(linger=0)

    def _peer_gone(self, peer: _Peer, why: str) -> None:
        if peer.alive and why != "disconnected":
            logger.warning("%s: peer %s (%s) is gone: %s", self.name, peer.name, peer.endpoint, why)
        peer.alive = False
        for xfer_id, handle in list(self._pending.items()):
            if handle.peer == peer.name:
                del self._pending[xfer_id]
                handle.state, handle.error = ERROR, f"peer {peer.name} {why}"

    def _live_peer(self, peer_name: str) -> _Peer:
        peer = self._peers.get(peer_name)
        if peer is None:
            raise PeerNotConnected(f"{self.name}: peer {peer_name!r} is not connected")
        return peer

    # ---- data
    def write_many(self, local: RegionHandle, remote: RemoteRegion, ranges: Ranges,
                   notif: bytes = b"") -> TransferHandle:
        peer = self._live_peer(remote.agent)
        if self._regions.get(local.region_id) is not local:
            raise ValueError(f"local region {local.region_id} is not registered")
        arr = self._check_ranges(local, remote, ranges)
        xfer_id = next(self._xfer_ids)
        handle = TransferHandle(peer=remote.agent, nbytes=int(arr[:, 2].sum()), num_descs=arr.shape[0], native=xfer_id)
        if not peer.alive:
            handle.state, handle.error = ERROR, f"peer {peer.name} is gone"
            return handle
        header = ZmqWrite(sender=self.name, xfer_id=xfer_id, region_id=remote.region_id,
                          ranges=np.ascontiguousarray(arr[:, 1:], dtype="<i8").tobytes(), notif=bytes(notif))
        source = local.native  # numpy uint8 view (CPU) or uint8 tensor (CUDA)
        if isinstance(source, np.ndarray):
            payloads = [source[lo:lo + n] for lo, _, n in arr.tolist()]
        else:
            payloads = [source[lo:lo + n].cpu().numpy() for lo, _, n in arr.tolist()]
        try:
            peer.dealer.send_multipart([encode(header), *payloads], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # Again: no live connection under the dealer
            logger.warning("%s: write to %s not sent: %s", self.name, peer.name, exc)
            handle.state, handle.error = ERROR, f"send failed: {exc}"
            return handle
        self._pending[xfer_id] = handle
        return handle

    def poll(self, handle: TransferHandle) -> TransferState:
        if handle.state == PENDING and not handle.released:
            self._progress()
        return handle.state

    def release(self, handle: TransferHandle) -> None:
        if handle.released:
            return
        handle.released = True
        if self._pending.pop(handle.native, None) is not None:
            # Bytes may still land on the peer; we just stop waiting for the ACK.
            handle.state, handle.error = ERROR, "released while pending"

    # ---- notifications
    def notifications(self) -> list[tuple[str, bytes]]:
        self._progress()
        out, self._inbox = self._inbox, []
        return out

    def send_notif(self, peer_name: str, notif: bytes) -> None:
        peer = self._live_peer(peer_name)
        if not peer.alive:
            raise TransferError(f"notification to {peer_name} failed: peer is gone")
        try:
            peer.dealer.send(encode(ZmqNotif(sender=self.name, notif=bytes(notif))), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            raise TransferError(f"notification to {peer_name} failed: {exc}") from exc

    def close(self) -> None:
        if self._ctx is None:
            return
        for name in list(self._peers):
            self.disconnect(name)
        self._pending.clear()
        self._regions.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self._ctx.destroy(linger=0)  # closes the router too; never waits on unsent messages
        self._ctx = None

    # ---- progress: everything that arrived on our sockets, without blocking
    def _progress(self) -> None:
        for sock, _ in self._poller.poll(0):
            if sock is self._router:
                self._drain_router()
                continue
            peer = self._by_socket.get(sock)
            if peer is None:
                continue
            if sock is peer.monitor:
                while peer.monitor.poll(0):
                    if recv_monitor_message(peer.monitor)["event"] in _DEAD_EVENTS:
                        self._peer_gone(peer, "closed the connection")
            else:
                while peer.dealer.poll(0):
                    self._on_ack(peer, peer.dealer.recv())

    def _on_ack(self, peer: _Peer, data: bytes) -> None:
        try:
            ack = decode(data)
        except ProtocolError as exc:
            logger.warning("%s: bad message from %s: %s", self.name, peer.name, exc)
            return
        handle = self._pending.pop(ack.xfer_id, None) if isinstance(ack, ZmqAck) else None
        if handle is None:
            return  # released meanwhile, or not an ACK
        if ack.error is None:
            handle.state = DONE
        else:
            handle.state, handle.error = ERROR, f"refused by {peer.name}: {ack.error}"

    def _drain_router(self) -> None:
        while self._router.poll(0):
            frames = self._router.recv_multipart(copy=False)
            if len(frames) < 2:
                continue
            identity, header, *payloads = frames
            try:
                msg = decode(header.buffer)
            except ProtocolError as exc:
                logger.warning("%s: dropping a bad message: %s", self.name, exc)
                continue
            if isinstance(msg, ZmqNotif):
                self._inbox.append((msg.sender, msg.notif))
            elif isinstance(msg, ZmqWrite):
                error = self._apply_write(msg, payloads)
                try:
                    self._router.send_multipart([identity, encode(ZmqAck(xfer_id=msg.xfer_id, error=error))])
                except zmq.ZMQError as exc:  # the writer is gone (ROUTER_MANDATORY)
                    logger.info("%s: cannot ACK %s: %s", self.name, msg.sender, exc)
                if error is None and msg.notif:
                    self._inbox.append((msg.sender, msg.notif))
            else:
                logger.warning("%s: unexpected %s on the data socket", self.name, type(msg).__name__)

    def _apply_write(self, msg: ZmqWrite, payloads: list) -> str | None:
        """Copy a WRITE's payloads into the region; an error string (and nothing written) when invalid."""
        region = self._regions.get(msg.region_id)
        if region is None:
            return f"no region {msg.region_id}"
        if len(msg.ranges) % 16:
            return "malformed ranges"
        ranges = np.frombuffer(msg.ranges, dtype="<i8").reshape(-1, 2)
        if len(ranges) != len(payloads):
            return f"{len(ranges)} ranges but {len(payloads)} payloads"
        views = [p.buffer for p in payloads]
        for (offset, nbytes), view in zip(ranges.tolist(), views):
            if offset < 0 or nbytes != view.nbytes or offset + nbytes > region.nbytes:
                return f"range ({offset}, {nbytes}) does not fit region {msg.region_id} ({region.nbytes} bytes)"
        target = region.native
        for (offset, nbytes), view in zip(ranges.tolist(), views):
            if isinstance(target, np.ndarray):
                target[offset:offset + nbytes] = np.frombuffer(view, dtype=np.uint8)
            else:
                with warnings.catch_warnings():  # read-only source buffer: we only read it
                    warnings.simplefilter("ignore", UserWarning)
                    target[offset:offset + nbytes].copy_(torch.frombuffer(view, dtype=torch.uint8))
        return None
