"""Outgoing links from one server to another (decode -> prefill), each opened by a Hello handshake.

A link is a DEALER socket to the peer's command socket. Messages for a peer whose handshake is still in
flight wait in the link's queue; a refused or timed-out handshake fails them all (the caller falls back).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import zmq

from engine.security import ZmqKeys, secure_client
from transfer.compat import IncompatiblePeer, check_compatible
from transfer.messages import Hello, Refused, ServerInfo, Welcome
from transfer.wire import Message, ProtocolError, decode, encode

logger = logging.getLogger(__name__)


@dataclass
class PeerLink:
    address: str
    socket: zmq.Socket
    deadline: float
    state: str = "CONNECTING"  # CONNECTING -> READY | REFUSED
    info: ServerInfo | None = None
    reason: str = ""
    queue: list[Message] = field(default_factory=list)


class PeerLinks:
    def __init__(self, ctx: zmq.Context, poller: zmq.Poller, my_info: ServerInfo, handshake_timeout_s: float = 10.0,
                 keys: ZmqKeys | None = None):
        self.keys = keys
        self.ctx = ctx
        self.poller = poller
        self.my_info = my_info
        self.handshake_timeout_s = handshake_timeout_s
        self.links: dict[str, PeerLink] = {}
        self.num_refused = 0

    def get(self, address: str, engine_id: str | None = None) -> PeerLink:
        """The link to ``address``, opened if needed. A link to another life of the peer (its engine id
        changed: it restarted) or refused more than 5 s ago is replaced by a fresh handshake."""
        link = self.links.get(address)
        stale = (link is not None and link.state == "READY" and engine_id is not None
                 and link.info.engine_id != engine_id)
        if link is None or stale or link.state == "REFUSED" and time.monotonic() > link.deadline + 5.0:
            if link is not None:
                self._close(link)
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            secure_client(sock, self.keys)
            sock.connect(address)
            self.poller.register(sock, zmq.POLLIN)
            link = PeerLink(address, sock, time.monotonic() + self.handshake_timeout_s)
            sock.send(encode(Hello(self.my_info)))
            self.links[address] = link
        return link

    def send(self, address: str, msg: Message) -> PeerLink:
        """Send now if the handshake is done, else queue until it is (check ``link.state`` for REFUSED)."""
        link = self.get(address)
        if link.state == "READY":
            link.socket.send(encode(msg))
        elif link.state == "CONNECTING":
            link.queue.append(msg)
        return link

    def handle_readable(self, sock: zmq.Socket) -> list[tuple[PeerLink, Message]]:
        """Drain a link socket; handshake replies are consumed, other messages returned."""
        link = next((lk for lk in self.links.values() if lk.socket is sock), None)
        out = []
        while link is not None:
            try:
                raw = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = decode(raw)
            except ProtocolError as e:
                logger.warning("bad message from peer %s: %s", link.address, e)
                continue
            if isinstance(msg, Welcome) and link.state == "CONNECTING":
                self._welcomed(link, msg.info)
            elif isinstance(msg, Refused):
                self._refuse(link, f"peer {link.address} refused the handshake: {msg.reason}")
            else:
                out.append((link, msg))
        return out

    def expired(self) -> list[PeerLink]:
        """Links whose handshake missed its deadline (now REFUSED)."""
        now = time.monotonic()
        out = []
        for link in self.links.values():
            if link.state == "CONNECTING" and now > link.deadline:
                self._refuse(link, f"no handshake reply from {link.address} within {self.handshake_timeout_s}s")
                out.append(link)
        return out

    def _welcomed(self, link: PeerLink, info: ServerInfo) -> None:
        try:
            if self.my_info.layout is not None and info.layout is not None:
                check_compatible(self.my_info.layout, info.layout)
        except IncompatiblePeer as e:
            self._refuse(link, f"peer {link.address} is incompatible: {e}")
            return
        link.state, link.info = "READY", info
        for msg in link.queue:
            link.socket.send(encode(msg))
        link.queue.clear()

    def _refuse(self, link: PeerLink, reason: str) -> None:
        if link.state != "REFUSED":
            self.num_refused += 1
            logger.error("%s", reason)
        link.state, link.reason = "REFUSED", reason

    def _close(self, link: PeerLink) -> None:
        self.poller.unregister(link.socket)
        link.socket.close(0)

    def close(self) -> None:
        for link in self.links.values():
            self._close(link)
        self.links.clear()
