"""``ClusterDispatcher``: drives prefill and decode server processes over ZeroMQ.

For each request it picks a decode server and, when the prompt is worth it, a prefill server
(``engine.router.placement``), then sends ``Generate`` (with the prefill reference) to D and ``Prefill`` to P
concurrently. Tokens stream back from D; P reports ``PrefillDone`` (its compute time feeds the hand-off
metric). One DEALER per server, with a receive task per socket that routes replies to per-request queues.
Servers are greeted with ``Hello`` at start-up; prefill and decode servers whose KV layouts differ are
refused right there, before any request.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import zmq
import zmq.asyncio

from engine.router.dispatcher import DispatchError, Dispatcher, GenerateRequest, TokenDelta
from engine.router.metrics import Histogram
from engine.router.placement import Placement, ServerView
from transfer.messages import (Abort, Generate, Hello, LoadReport, Prefill, PrefillDone, RemotePrefill, ServerInfo,
                               Stats, StatsRequest, Tokens, Welcome)
from transfer.wire import Message, ProtocolError, decode, encode

logger = logging.getLogger(__name__)


@dataclass
class ServerLink:
    address: str
    kind: str  # "prefill" or "decode" (how the router uses it)
    socket: zmq.asyncio.Socket
    info: ServerInfo | None = None
    view: ServerView = field(default_factory=lambda: ServerView("", "decode"))
    last_seen: float = 0.0
    task: asyncio.Task | None = None
    events: zmq.asyncio.Socket | None = None
    events_task: asyncio.Task | None = None


class ClusterDispatcher(Dispatcher):
    def __init__(self, prefill: list[str], decode: list[str], model_name: str, placement: Placement | None = None,
                 connect_timeout_s: float = 120.0, kv_timeout_s: float = 30.0, request_timeout_s: float = 600.0):
        if not decode:
            raise ValueError("decode: at least one decode server address is required")
        self.ctx = zmq.asyncio.Context.instance()
        self.model_name = model_name
        self.placement = placement or Placement()
        self.connect_timeout_s = connect_timeout_s
        self.kv_timeout_s = kv_timeout_s
        self.request_timeout_s = request_timeout_s
        self.links = [self._link(a, "prefill") for a in prefill] + [self._link(a, "decode") for a in decode]
        self._queues: dict[str, asyncio.Queue] = {}
        self._stats_waiters: dict[int, asyncio.Future] = {}
        self._tokens = itertools.count(1)
        self.max_model_len = 0
        self.vocab_size = 0
        self.counters = {"disaggregated": 0, "local_prefill": 0, "prefill_failed": 0}
        self.prefill_compute = Histogram("duet_prefill_compute_seconds", "prefill server compute per request")
        self.handoff = Histogram("duet_handoff_seconds", "disaggregated TTFT minus prefill compute")
        self._handoff_parts: dict[str, dict[str, float]] = {}  # transfer id -> sent / first_token / compute

    def _link(self, address: str, kind: str) -> ServerLink:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        return ServerLink(address, kind, sock, view=ServerView(address, kind))

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Greet every server (bounded by ``connect_timeout_s``) and check their layouts. Idempotent."""
        if self.max_model_len:
            return
        hello = Hello(ServerInfo(f"router-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex, "router", self.model_name))
        await asyncio.gather(*(self._greet(link, hello) for link in self.links))
        self._check_layouts()
        d = [lk.info for lk in self.links if lk.kind == "decode"]
        self.max_model_len = min(i.max_model_len for i in d)
        self.vocab_size = d[0].vocab_size
        for link in self.links:
            link.task = asyncio.create_task(self._receive(link))
            link.events = self.ctx.socket(zmq.SUB)
            link.events.setsockopt(zmq.LINGER, 0)
            link.events.setsockopt(zmq.SUBSCRIBE, b"")
            link.events.connect(link.info.event_address)
            link.events_task = asyncio.create_task(self._receive_events(link))

    async def _greet(self, link: ServerLink, hello: Hello) -> None:
        deadline = time.monotonic() + self.connect_timeout_s
        await link.socket.send(encode(hello))
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not await link.socket.poll(int(min(left, 1.0) * 1000)):
                if left <= 0:
                    raise DispatchError(f"{link.kind} server {link.address} did not answer within "
                                        f"{self.connect_timeout_s}s")
                continue
            msg = decode(await link.socket.recv())
            if isinstance(msg, Welcome):
                break
            raise DispatchError(f"{link.kind} server {link.address} refused the router: {msg}")
        info = msg.info
        if link.kind == "prefill" and info.role not in ("prefill", "both"):
            raise DispatchError(f"{link.address} is a {info.role} server, not a prefill server")
        if link.kind == "decode" and info.role not in ("decode", "both"):
            raise DispatchError(f"{link.address} is a {info.role} server, not a decode server")
        link.info, link.last_seen = info, time.monotonic()
        link.view = ServerView(info.engine_id, link.kind, zone=info.zone, total_blocks=info.num_total_blocks,
                               free_blocks=info.num_total_blocks)

    def _check_layouts(self) -> None:
        first = next(lk for lk in self.links if lk.kind == "decode")
        for link in self.links:
            if link.info.compat_hash != first.info.compat_hash:
                a, b = first.info.layout, link.info.layout
                diff = {k: (v, b.canonical().get(k)) for k, v in a.canonical().items() if b.canonical().get(k) != v}
                raise DispatchError(f"{link.kind} server {link.address} is incompatible with decode server "
                                    f"{first.address}: KV layouts differ in {diff}")

    async def close(self) -> None:
        for link in self.links:
            for task in (link.task, link.events_task):
                if task is not None:
                    task.cancel()
            if link.events is not None:
                link.events.close(0)
        for q in self._queues.values():
            q.put_nowait(Tokens("", [], finished=True, finish_reason="abort"))
        for link in self.links:
            link.socket.close(0)

    def healthy(self) -> bool:
        return any(lk.kind == "decode" and lk.info is not None and lk.view.healthy for lk in self.links)

    # ---- receiving ---------------------------------------------------------------------------------
    async def _receive(self, link: ServerLink) -> None:
        while True:
            raw = await link.socket.recv()
            link.last_seen = time.monotonic()
            try:
                msg = decode(raw)
            except ProtocolError as e:
                logger.warning("bad message from %s: %s", link.address, e)
                continue
            self._dispatch(link, msg)

    async def _receive_events(self, link: ServerLink) -> None:
        while True:
            raw = await link.events.recv()
            try:
                msg = decode(raw)
            except ProtocolError:
                continue
            link.last_seen = time.monotonic()
            self._dispatch(link, msg)

    def _dispatch(self, link: ServerLink, msg: Message) -> None:
        if isinstance(msg, Tokens):
            q = self._queues.get(msg.request_id)
            if q is not None:
                q.put_nowait(msg)
        elif isinstance(msg, PrefillDone):
            if msg.ok:
                self.prefill_compute.observe(msg.compute_s)
                self._handoff_part(msg.transfer_id, "compute", msg.compute_s)
            else:
                self.counters["prefill_failed"] += 1
                logger.warning("prefill of %s on %s failed: %s", msg.request_id, link.address, msg.error)
        elif isinstance(msg, Stats):
            fut = self._stats_waiters.pop(msg.token, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, LoadReport):
            link.view.update_load(msg)

    # ---- requests ----------------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        decode_links = [lk for lk in self.links if lk.kind == "decode"]
        prefill_links = [lk for lk in self.links if lk.kind == "prefill"]
        choice = self.placement.choose(request, [lk.view for lk in decode_links], [lk.view for lk in prefill_links])
        d = decode_links[choice.decode_index]
        p = prefill_links[choice.prefill_index] if choice.prefill_index is not None else None
        rid = request.request_id
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        sampling = request.params.to_dict()
        remote = None
        tid = None
        if p is not None:
            tid = uuid.uuid4().hex
            remote = RemotePrefill(p.info.engine_id, p.info.address, tid, self.kv_timeout_s)
            self._handoff_parts[tid] = {"sent": time.monotonic()}
            while len(self._handoff_parts) > 10_000:  # parts of failed transfers never complete
                self._handoff_parts.pop(next(iter(self._handoff_parts)))
            self.counters["disaggregated"] += 1
        else:
            self.counters["local_prefill"] += 1
        finished = False
        try:
            await d.socket.send(encode(Generate(rid, list(request.prompt_token_ids), sampling, remote)))
            if p is not None:
                await p.socket.send(encode(Prefill(rid, tid, list(request.prompt_token_ids), sampling,
                                                   d.info.engine_id, self.kv_timeout_s)))
            deadline = time.monotonic() + self.request_timeout_s
            while not finished:
                try:
                    msg: Tokens = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    yield TokenDelta(finished=True, finish_reason="error",
                                     error=f"request timed out after {self.request_timeout_s}s", status=504)
                    return
                finished = msg.finished
                if tid is not None and msg.token_ids:
                    self._handoff_part(tid, "first_token", time.monotonic())
                if msg.error and not msg.token_ids and msg.finish_reason == "error":
                    raise DispatchError(msg.error, status=msg.status)
                yield TokenDelta(msg.token_ids, msg.logprobs, msg.finished, msg.finish_reason, msg.stop_reason,
                                 msg.num_cached_tokens, msg.error, msg.status)
        finally:
            self._queues.pop(rid, None)
            if not finished:
                await self._abort_on(d, p, rid, tid)

    def _handoff_part(self, tid: str, key: str, value: float) -> None:
        parts = self._handoff_parts.get(tid)
        if parts is None or key in parts:
            return
        parts[key] = value
        if {"sent", "first_token", "compute"} <= parts.keys():
            self.handoff.observe(parts["first_token"] - parts["sent"] - parts["compute"])
            del self._handoff_parts[tid]

    async def _abort_on(self, d: ServerLink, p: ServerLink | None, rid: str, tid: str | None) -> None:
        await d.socket.send(encode(Abort(rid, tid)))
        if p is not None:
            await p.socket.send(encode(Abort(rid, tid)))

    async def abort(self, request_id: str) -> None:
        for link in self.links:
            await link.socket.send(encode(Abort(request_id)))

    # ---- metrics -----------------------------------------------------------------------------------
    async def server_stats(self, timeout_s: float = 2.0) -> dict[str, Stats]:
        """``Stats`` of every server that answers within ``timeout_s`` (by address)."""
        loop = asyncio.get_running_loop()
        waiting = {}
        for link in self.links:
            token = next(self._tokens)
            fut = loop.create_future()
            self._stats_waiters[token] = fut
            waiting[link.address] = (token, fut)
            await link.socket.send(encode(StatsRequest(token)))
        out = {}
        for address, (token, fut) in waiting.items():
            try:
                out[address] = await asyncio.wait_for(fut, timeout_s)
            except asyncio.TimeoutError:
                self._stats_waiters.pop(token, None)
        return out

    async def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        samples = []
        by_address = {lk.address: lk for lk in self.links}
        for address, stats in (await self.server_stats()).items():
            labels = {"server": address, "role": by_address[address].kind}
            for key, value in stats.values.items():
                samples.append((f"duet_server_{key}", labels, float(value)))
        for key, value in self.counters.items():
            samples.append((f"duet_router_requests_{key}_total", {}, float(value)))
        for h in (self.prefill_compute, self.handoff):
            samples.extend(_histogram_samples(h))
        return samples


def _histogram_samples(h: Histogram) -> list[tuple[str, dict[str, str], float]]:
    out, cumulative = [], 0
    for bound, n in zip(h.buckets + (float("inf"),), h.bucket_counts):
        cumulative += n
        out.append((f"{h.name}_bucket", {"le": "+Inf" if bound == float("inf") else repr(bound)}, cumulative))
    return out + [(f"{h.name}_sum", {}, h.sum), (f"{h.name}_count", {}, h.count)]
