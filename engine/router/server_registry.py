"""The router's live set of servers: links, heartbeats, epochs, load and the prefix index.

Servers enter the registry two ways: listed on the router's command line (greeted with ``Hello`` at start),
or registering themselves at run time (a server started with ``--router tcp://H:P`` sends its ``Hello``
to the router's registry socket every heartbeat). Every server publishes ``LoadReport`` (a heartbeat) and
``KVEvents`` on its PUB socket; the registry subscribes to all of them. A server that misses
``missed_heartbeats`` heartbeats is marked unhealthy and gets no new request; the dispatcher is told so it
can rescue the requests that were running there. From then on its address is greeted again every
``regreet_period_s``: a process that answers there with a new epoch (a restart, maybe with new weights) is a
new server (the registry is keyed by (address, epoch)): fresh sockets and event subscription, the old life's
prefix-index entries and cost model dropped, and the log says so. The same happens when any message from the
address carries a new epoch.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

import zmq
import zmq.asyncio

from duet.engine.protocol import SERVER_ROLES, Hello, KVEvents, LoadReport, ServerInfo, Welcome
from duet.engine.router.prefix_index import PrefixIndex
from duet.engine.router.scoring import ServerState
from duet.transfer.curve import ZmqKeys, secure_client, secure_server
from duet.transfer.wire import Message, ProtocolError, decode, encode

logger = logging.getLogger(__name__)


@dataclass
class ServerLink:
    info: ServerInfo
    socket: zmq.asyncio.Socket  # DEALER to the server's command socket
    events: zmq.asyncio.Socket  # SUB to its event socket
    state: ServerState
    last_seen: float
    tasks: tuple[asyncio.Task, ...] = ()
    failures: int = 0
    """Consecutive failed requests (the circuit breaker opens at ``breaker_failures``)."""
    silent_since: float | None = None
    """When it missed its heartbeats (None while it is heard): the registry greets its address again from
    then on, so a new process at that address (a restart) is found even on a new event port."""
    breaker_until: float = 0.0

    @property
    def address(self) -> str:
        return self.info.address

    @property
    def engine_id(self) -> str:
        return self.info.engine_id


class ServerRegistry:
    def __init__(self, ctx: zmq.asyncio.Context, on_message: Callable[[ServerLink, Message], None],
                 on_dead: Callable[[ServerLink], None], heartbeat_s: float = 0.2, missed_heartbeats: int = 5,
                 breaker_failures: int = 3, breaker_cooldown_s: float = 5.0, keys: ZmqKeys | None = None,
                 on_removed: Callable[[ServerLink], None] = lambda link: None, regreet_period_s: float = 1.0):
        """``on_dead``: a server missed its heartbeats (rescue its requests). ``on_removed``: a server left the
        registry for good (e.g. replaced by a new life at its address): forget what was learnt about it."""
        self.keys = keys
        self.ctx = ctx
        self.on_message = on_message
        self.on_dead = on_dead
        self.on_removed = on_removed
        self.regreet_period_s = regreet_period_s
        self.regreet_timeout_s = max(1.0, regreet_period_s)
        self.heartbeat_s = heartbeat_s
        self.missed_heartbeats = missed_heartbeats
        self.breaker_failures = breaker_failures
        self.breaker_cooldown_s = breaker_cooldown_s
        self.links: dict[str, ServerLink] = {}  # engine id -> link
        self.prefix_index = PrefixIndex()
        self._epochs: dict[str, str] = {}  # address -> epoch last seen there
        self._tasks: list[asyncio.Task] = []
        self.registry_socket: zmq.asyncio.Socket | None = None
        self.hello: Hello | None = None
        """The router's Hello, for greeting servers that restart at a known address."""
        self._regreeting: set[str] = set()
        self.compat_hash: str | None = None
        """The cluster's KV layout (set from the first servers). A server that joins later with another one (a
        rolling model update) is accepted with a warning; the dispatcher moves KV only between equal layouts."""

    async def greet(self, address: str, hello: Hello, timeout_s: float) -> ServerInfo:
        """Hello to a server listed on the command line; its Welcome, or TimeoutError / ValueError."""
        sock = self._dealer(address)
        await sock.send(encode(hello))
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"server {address} did not answer within {timeout_s}s")
                if await sock.poll(int(min(left, 1.0) * 1000)):
                    msg = decode(await sock.recv())
                    if isinstance(msg, Welcome):
                        return msg.info
                    raise ValueError(f"server {address} refused the router: {msg}")
        finally:
            sock.close(0)

    def _dealer(self, address: str) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        secure_client(sock, self.keys)
        sock.connect(address)
        return sock

    def add(self, info: ServerInfo) -> ServerLink:
        """Start routing to a server; a new epoch at a known address replaces the old life (the registry is
        keyed by (address, epoch): fresh sockets and event subscription, the old one's prefix entries dropped)."""
        old = next((lk for lk in self.links.values() if lk.address == info.address), None)
        if old is not None:
            if old.info.epoch == info.epoch:
                return old
            logger.warning("server at %s restarted (epoch %.8s -> %.8s, engine %s -> %s): routing to it again",
                           info.address, old.info.epoch, info.epoch, old.engine_id, info.engine_id)
            self.remove(old)
        if self.compat_hash is not None and info.compat_hash != self.compat_hash:
            logger.warning("server %s at %s joins with another KV layout (a model update?): KV moves only between "
                           "servers of one layout", info.engine_id, info.address)
        sock = self._dealer(info.address)
        events = self.ctx.socket(zmq.SUB)
        events.setsockopt(zmq.LINGER, 0)
        events.setsockopt(zmq.SUBSCRIBE, b"")
        secure_client(events, self.keys)
        events.connect(info.event_address)
        state = ServerState(info.engine_id, role=info.role, zone=info.zone, block_size=info.layout.block_size,
                            total_blocks=info.num_total_blocks, free_blocks=info.num_total_blocks)
        link = ServerLink(info, sock, events, state, time.monotonic())
        link.tasks = (asyncio.create_task(self._receive(link, sock)), asyncio.create_task(self._receive(link, events)))
        self.links[info.engine_id] = link
        self._epochs[info.address] = info.epoch
        logger.info("routing to %s server %s at %s (zone %s)", info.role, info.engine_id, info.address, info.zone)
        return link

    def remove(self, link: ServerLink) -> None:
        for t in link.tasks:
            t.cancel()
        link.socket.close(0)
        link.events.close(0)
        self.links.pop(link.engine_id, None)
        self.prefix_index.drop_server(link.engine_id)
        self.on_removed(link)

    async def _receive(self, link: ServerLink, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                raw = await sock.recv()
                msg = decode(raw)
            except ProtocolError as e:
                logger.warning("bad message from %s: %s", link.address, e)
                continue
            except zmq.ZMQError:
                return
            if isinstance(msg, LoadReport):
                if msg.epoch != link.info.epoch:
                    self._regreet(link)  # a new life at the same address: greet it as a new server
                    continue
                self._apply_load(link, msg)
            elif isinstance(msg, KVEvents):
                if msg.epoch == link.info.epoch:
                    self._apply_kv_events(link, msg)
            else:
                self.on_message(link, msg)

    def _regreet(self, link: ServerLink) -> None:
        if self.hello is None or link.address in self._regreeting:
            return
        self._regreeting.add(link.address)

        async def greet() -> None:
            try:
                info = await self.greet(link.address, self.hello, timeout_s=self.regreet_timeout_s)
                if info.epoch != link.info.epoch and info.role in SERVER_ROLES and info.layout is not None:
                    self.add(info)
            except (TimeoutError, ValueError, ProtocolError) as e:
                logger.debug("server at %s did not answer a greeting: %s", link.address, e)
            finally:
                self._regreeting.discard(link.address)

        self._tasks.append(asyncio.create_task(greet()))

    def _apply_load(self, link: ServerLink, msg: LoadReport) -> None:
        s = link.state
        load = msg.load
        s.queued_requests = load.waiting + load.waiting_for_kv
        s.queued_prefill_tokens = load.queued_prefill_tokens
        s.running_requests, s.running_tokens = load.running, load.running_tokens
        s.total_blocks, s.free_blocks = load.total_blocks, min(load.free_blocks, load.total_blocks)
        link.last_seen = now = time.monotonic()
        link.silent_since = None
        healthy = not msg.draining and now >= link.breaker_until
        if healthy and not s.healthy:
            logger.info("server %s is back", link.address)
        s.healthy = healthy

    def failed(self, link: ServerLink) -> None:
        """A request failed on ``link``: after ``breaker_failures`` in a row, stop routing there for a while."""
        link.failures += 1
        if link.failures >= self.breaker_failures:
            logger.warning("circuit breaker open for %s (%d failures in a row)", link.address, link.failures)
            link.breaker_until = time.monotonic() + self.breaker_cooldown_s
            link.state.healthy = False
            link.failures = self.breaker_failures - 1  # half-open after the cool-down: one more failure reopens

    def succeeded(self, link: ServerLink) -> None:
        link.failures = 0

    def _apply_kv_events(self, link: ServerLink, msg: KVEvents) -> None:
        link.last_seen = time.monotonic()
        for event in msg.events:
            if event.kind == "stored":
                self.prefix_index.stored(link.engine_id, event.block_hashes, event.tier)
            elif event.kind == "removed":
                self.prefix_index.removed(link.engine_id, event.block_hashes, event.tier)
            else:
                self.prefix_index.cleared(link.engine_id, event.tier)

    async def watch(self) -> None:
        """Mark servers that missed their heartbeats unhealthy, and greet their addresses again every
        ``regreet_period_s`` until a server answers there (runs until cancelled)."""
        limit = self.heartbeat_s * self.missed_heartbeats
        next_regreet = 0.0
        while True:
            await asyncio.sleep(self.heartbeat_s / 2)
            now = time.monotonic()
            for link in list(self.links.values()):
                if link.silent_since is None and now - link.last_seen > limit:
                    logger.warning("server %s missed %d heartbeats: no longer routing to it", link.address,
                                   self.missed_heartbeats)
                    link.silent_since = now
                    link.state.healthy = False
                    self.prefix_index.cleared(link.engine_id)
                    try:
                        self.on_dead(link)
                    except Exception:  # noqa: BLE001 - the watch must outlive any one rescue
                        logger.exception("rescuing the requests of %s failed", link.address)
            if now >= next_regreet:
                next_regreet = now + self.regreet_period_s
                for link in list(self.links.values()):
                    if link.silent_since is not None:
                        self._regreet(link)

    def listen(self, address: str) -> None:
        """Accept run-time registrations (servers started with ``--router``) on ``address``."""
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        secure_server(sock, self.keys)
        sock.bind(address)
        self.registry_socket = sock
        self._tasks.append(asyncio.create_task(self._accept(sock)))

    async def _accept(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                ident, raw = await sock.recv_multipart()
                msg = decode(raw)
            except (ValueError, ProtocolError):
                continue
            except zmq.ZMQError:
                return
            if isinstance(msg, Hello) and msg.info.role in SERVER_ROLES and msg.info.layout:
                self.compat_hash = self.compat_hash or msg.info.compat_hash
                link = self.links.get(msg.info.engine_id)
                if link is None or link.info.epoch != msg.info.epoch:
                    self.add(msg.info)
                else:
                    link.last_seen = time.monotonic()

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for link in list(self.links.values()):
            self.remove(link)
        if self.registry_socket is not None:
            self.registry_socket.close(0)
