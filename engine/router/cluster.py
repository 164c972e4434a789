"""``ClusterDispatcher``: drives prefill and decode server processes over ZeroMQ.

A request's path: tokens -> block hashes -> prefix match per server (``PrefixIndex``, fed by KV events) ->
``Scorer.choose`` (fit, load, cached prefix; conditional disaggregation; TTFT admission) -> ``Generate`` to
the decode server D (with the prefill reference when disaggregated) and, concurrently, ``Prefill`` to the
prefill server P -> tokens stream back from D.

When no server can take a request now (retryable rejection), it waits in a bounded admission queue that is
re-scored on every load report; a full queue or a wait past ``queue_timeout_s`` gives 429 + Retry-After.
When D dies mid-request (missed heartbeats), the request migrates: the prompt plus the tokens generated so
far go to another decode server, so the client's stream continues with no token lost or repeated. When P
dies mid-transfer, D is told the KV will not come and applies its failure policy.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter as CountMap
from dataclasses import asdict, replace
from typing import AsyncIterator

import zmq
import zmq.asyncio

from engine.protocol import (Abort, FinishReason, Generate, Hello, KVFailed, PeerRef, Prefill, PrefillDone,
                             RemotePrefill, Role, ServerInfo, Stats, StatsRequest, TokenDelta, Tokens)
from engine.router.dispatcher import Dispatcher, DispatchError, GenerateRequest
from engine.router.metrics import Histogram
from engine.router.scoring import RequestInfo, RouterPolicy, Scorer
from engine.router.server_registry import ServerLink, ServerRegistry
from transfer.curve import ZmqKeys, start_async_authenticator
from transfer.wire import Message, encode

logger = logging.getLogger(__name__)

_SERVER_GONE = object()  # queued to a request whose decode server died


class ClusterDispatcher(Dispatcher):
    def __init__(self, prefill: list[str], decode: list[str], model_name: str, policy: RouterPolicy | None = None, *,
                 connect_timeout_s: float = 120.0, kv_timeout_s: float = 30.0, request_timeout_s: float = 600.0,
                 heartbeat_s: float = 0.2, max_queue: int = 256, queue_timeout_s: float = 10.0,
                 registry_address: str | None = None, max_migrations: int = 2, zmq_keys: ZmqKeys | None = None):
        if not decode and registry_address is None:
            raise ValueError("decode: at least one decode server (or a registry address) is required")
        self.ctx = zmq.asyncio.Context.instance()
        self.model_name = model_name
        self.scorer = Scorer(policy or RouterPolicy())
        self.keys = zmq_keys
        self._auth = None
        self.registry = ServerRegistry(self.ctx, self._on_message, self._on_dead, heartbeat_s, keys=zmq_keys,
                                       on_removed=lambda link: self.scorer.forget_server(link.engine_id))
        self.addresses = [(a, "prefill") for a in prefill] + [(a, "decode") for a in decode]
        self.registry_address = registry_address
        self.connect_timeout_s = connect_timeout_s
        self.kv_timeout_s = kv_timeout_s
        self.request_timeout_s = request_timeout_s
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.max_migrations = max_migrations
        self.max_model_len = 0
        self.vocab_size = 0
        self.block_size = 16
        self._queues: dict[str, asyncio.Queue] = {}
        self._placement: dict[str, tuple[ServerLink, ServerLink | None, str | None]] = {}
        self._stats_waiters: dict[int, asyncio.Future] = {}
        self._next_token = 0
        self._capacity_changed = asyncio.Event()
        self._num_queued = 0
        self._watch_task: asyncio.Task | None = None
        self.decisions: CountMap[str] = CountMap()
        self.counters: CountMap[str] = CountMap()
        self.prefill_compute = Histogram("duet_prefill_compute_seconds", "prefill server compute per request")
        self.handoff = Histogram("duet_handoff_seconds", "disaggregated TTFT minus prefill compute")
        self._handoff_parts: dict[str, dict[str, float]] = {}
        self.traces: dict[str, dict[str, float]] = {}  # request id -> router stage -> unix time (bounded)

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Greet the listed servers (bounded by ``connect_timeout_s``), check layouts. Idempotent."""
        if self._watch_task is not None:
            return
        self._auth = start_async_authenticator(self.ctx, self.keys)
        hello = Hello(ServerInfo(f"router-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex, Role.ROUTER, self.model_name))
        self.registry.hello = hello
        try:
            infos = await asyncio.gather(*(self.registry.greet(a, hello, self.connect_timeout_s)
                                           for a, _ in self.addresses))
        except (TimeoutError, ValueError) as e:
            raise DispatchError(str(e)) from e
        for (address, kind), info in zip(self.addresses, infos):
            ok = ("prefill", "both") if kind == "prefill" else ("decode", "both")
            if info.role not in ok:
                raise DispatchError(f"{address} is a {info.role} server, not a {kind} server")
        if infos:
            first = next((i for i in infos if i.role != "prefill"), infos[0])
            for (address, kind), info in zip(self.addresses, infos):
                if info.compat_hash != first.compat_hash:
                    a, b = first.layout.canonical(), info.layout.canonical()
                    diff = {k: (v, b.get(k)) for k, v in a.items() if b.get(k) != v}
                    raise DispatchError(f"{kind} server {address} is incompatible with server {first.address}: "
                                        f"KV layouts differ in {diff}")
            self.registry.compat_hash = first.compat_hash
        for info in infos:
            self.registry.add(info)
        if self.registry_address:
            self.registry.listen(self.registry_address)
            deadline = time.monotonic() + self.connect_timeout_s
            while not self.healthy():  # no decode server listed: wait for one to register
                if time.monotonic() > deadline:
                    raise DispatchError(f"no decode server registered within {self.connect_timeout_s}s")
                await asyncio.sleep(0.05)
        self._watch_task = asyncio.create_task(self.registry.watch())
        self._refresh_limits()

    def _refresh_limits(self) -> None:
        infos = [lk.info for lk in self.registry.links.values() if lk.info.role != "prefill"]
        if infos:
            self.max_model_len = min(i.max_model_len for i in infos)
            self.vocab_size = infos[0].vocab_size
            self.block_size = infos[0].layout.block_size

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        for q in self._queues.values():
            q.put_nowait(Tokens("", TokenDelta(finished=True, finish_reason=FinishReason.ABORT)))
        self.registry.close()
        if self._auth is not None:
            self._auth.stop()

    def healthy(self) -> bool:
        return any(lk.state.healthy and lk.info.role != "prefill" for lk in self.registry.links.values())

    # ---- messages from servers ---------------------------------------------------------------------
    def _on_message(self, link: ServerLink, msg: Message) -> None:
        if isinstance(msg, Tokens):
            q = self._queues.get(msg.request_id)
            if q is not None:
                q.put_nowait(msg)
            if msg.delta.finished:
                self._capacity_changed.set()
        elif isinstance(msg, PrefillDone):
            if msg.ok:
                self.prefill_compute.observe(msg.compute_s)
                self.scorer.observe_prefill(link.engine_id, max(1, msg.num_tokens), msg.compute_s)
                self._handoff_part(msg.transfer_id, "compute", msg.compute_s)
            else:
                self.counters["prefill_failed"] += 1
                logger.warning("prefill of %s on %s failed: %s", msg.request_id, link.address, msg.error)
        elif isinstance(msg, Stats):
            fut = self._stats_waiters.pop(msg.token, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _on_dead(self, link: ServerLink) -> None:
        self.counters["server_deaths"] += 1
        for rid, (d, p, tid) in list(self._placement.items()):
            if d is link and rid in self._queues:
                self._queues[rid].put_nowait(_SERVER_GONE)
            elif p is link and tid is not None:  # the KV will never come: let decode apply its policy now
                asyncio.create_task(d.socket.send(encode(KVFailed(rid, tid, f"prefill server {link.address} died"))))

    # ---- placement ---------------------------------------------------------------------------------
    def _decide(self, request: GenerateRequest, prompt: list[int], max_tokens: int, exclude: set[str]):
        self._refresh_limits()
        info = RequestInfo.from_tokens(prompt, max_tokens, self.block_size, zone=request.zone,
                                       request_id=request.request_id)
        links = [lk for lk in self.registry.links.values() if lk.engine_id not in exclude]
        match = self.registry.prefix_index.match(info.block_hashes)
        return self.scorer.choose(info, [lk.state for lk in links], match), info

    async def _place(self, request: GenerateRequest, prompt: list[int], max_tokens: int, exclude: set[str]):
        decision, info = self._decide(request, prompt, max_tokens, exclude)
        if not decision.accepted and exclude and decision.reason == "no_healthy_server":
            raise DispatchError("no other healthy decode server to move the request to", 503)
        if not decision.accepted and decision.retryable:
            if self._num_queued >= self.max_queue:
                self.counters["rejected_queue_full"] += 1
                raise DispatchError(f"server overloaded ({decision.detail}); admission queue full", 429,
                                    decision.retry_after_s or 1.0)
            self._num_queued += 1
            self.counters["queued"] += 1
            deadline = time.monotonic() + self.queue_timeout_s
            try:
                while not decision.accepted and decision.retryable:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.counters["rejected_queue_timeout"] += 1
                        raise DispatchError(f"server overloaded ({decision.detail}); waited {self.queue_timeout_s}s",
                                            429, decision.retry_after_s or 1.0)
                    self._capacity_changed.clear()
                    try:
                        await asyncio.wait_for(self._capacity_changed.wait(), min(left, 0.1))
                    except asyncio.TimeoutError:
                        pass
                    decision, info = self._decide(request, prompt, max_tokens, exclude)
            finally:
                self._num_queued -= 1
        self.decisions[decision.reason] += 1
        self._trace(request.request_id, "placed:" + decision.reason)
        if not decision.accepted:
            self.counters["rejected_" + decision.reason] += 1
            status = 400 if decision.reason == "request_too_large" else 503
            raise DispatchError(decision.detail or decision.reason, status)
        d = self.registry.links[decision.decode_id]
        p = self.registry.links[decision.prefill_id] if decision.prefill_id else None
        # Count this placement until the next load report says it (bursts must not all pile on one server).
        d.state.running_requests += 1
        d.state.running_tokens += info.num_prompt_tokens
        d.state.free_blocks = max(0, d.state.free_blocks - -(-(info.num_prompt_tokens + max_tokens) // self.block_size))
        if p is not None:
            p.state.queued_requests += 1
            p.state.queued_prefill_tokens += info.num_prompt_tokens
        self.counters["prefix_hit_tokens_predicted"] += decision.decode_cached_tokens
        return d, p

    # ---- requests ----------------------------------------------------------------------------------
    def _trace(self, request_id: str, stage: str) -> None:
        self.traces.setdefault(request_id, {}).setdefault(stage, time.time())
        while len(self.traces) > 4096:
            self.traces.pop(next(iter(self.traces)))

    async def trace(self, request_id: str) -> dict[str, dict[str, float]]:
        out = {}
        if request_id in self.traces:
            out["router"] = dict(self.traces[request_id])
        for address, stats in (await self.server_stats(request_id=request_id)).items():
            if stats.traces.get(request_id):
                out[address] = stats.traces[request_id]
        return out

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        rid = request.request_id
        self._trace(rid, "received")
        prompt = list(request.prompt_token_ids)
        params = request.params
        generated: list[int] = []
        excluded: set[str] = set()
        attempts = 0
        deadline = time.monotonic() + self.request_timeout_s
        while True:
            attempts += 1
            d, p = await self._place(request, prompt + generated, params.max_tokens - len(generated), excluded)
            attempt_params = params
            if generated:  # migration: continue after the tokens the client already has
                attempt_params = replace(params, max_tokens=params.max_tokens - len(generated),
                                         min_tokens=max(0, params.min_tokens - len(generated)))
            failure = None
            try:
                async for delta in self._run_on(rid, prompt + generated, attempt_params, d, p, deadline):
                    if delta is _SERVER_GONE:
                        failure = f"decode server {d.address} died"
                        break
                    if delta.token_ids and not generated:
                        self._trace(rid, "first_token")
                    generated.extend(delta.token_ids)
                    self.registry.succeeded(d)
                    if delta.finished:
                        self._trace(rid, "finished")
                    yield delta
                    if delta.finished:
                        return
            except DispatchError as e:
                # Refused before its first token (draining, overloaded, broken): another server may take it.
                if generated or not e.retryable or attempts > self.max_migrations:
                    raise
                failure = str(e)
            if failure is None:
                return
            self.registry.failed(d)
            excluded.add(d.engine_id)
            if attempts > self.max_migrations:
                yield TokenDelta.failure(f"request failed on {attempts} servers; last: {failure}", 503)
                return
            self.counters["migrations" if generated else "retries"] += 1
            logger.warning("request %s: %s after %d tokens; moving it to another decode server", rid, failure,
                           len(generated))
            await asyncio.sleep(0.05 * 2 ** (attempts - 1))  # backoff

    async def _run_on(self, rid: str, prompt: list[int], params, d: ServerLink, p: ServerLink | None,
                      deadline: float) -> AsyncIterator:
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        tid = uuid.uuid4().hex if p is not None else None
        self._placement[rid] = (d, p, tid)
        sampling = params
        finished = False
        try:
            remote = None
            if p is not None:
                remote = RemotePrefill(PeerRef.of(p.info), tid, self.kv_timeout_s)
                self._handoff_parts[tid] = {"sent": time.monotonic()}
                while len(self._handoff_parts) > 10_000:  # parts of failed transfers never complete
                    self._handoff_parts.pop(next(iter(self._handoff_parts)))
            await d.socket.send(encode(Generate(rid, prompt, sampling, remote)))
            if p is not None:
                await p.socket.send(encode(Prefill(rid, tid, prompt, sampling, PeerRef.of(d.info), self.kv_timeout_s)))
            while not finished:
                try:
                    msg = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    yield TokenDelta.failure(f"request timed out after {self.request_timeout_s}s", 504)
                    return
                if msg is _SERVER_GONE:
                    finished = True  # nothing to abort there
                    yield msg
                    return
                delta = msg.delta
                finished = delta.finished
                if tid is not None and delta.token_ids:
                    self._handoff_part(tid, "first_token", time.monotonic())
                if delta.error and not delta.token_ids and delta.finish_reason is FinishReason.ERROR:
                    raise DispatchError(delta.error, status=delta.status, retryable=delta.retryable)
                yield delta
        finally:
            self._queues.pop(rid, None)
            self._placement.pop(rid, None)
            if not finished:
                for link in (d, p):
                    if link is not None:
                        await link.socket.send(encode(Abort(rid, tid)))

    def _handoff_part(self, tid: str, key: str, value: float) -> None:
        parts = self._handoff_parts.get(tid)
        if parts is None or key in parts:
            return
        parts[key] = value
        if {"sent", "first_token", "compute"} <= parts.keys():
            self.handoff.observe(parts["first_token"] - parts["sent"] - parts["compute"])
            del self._handoff_parts[tid]

    async def abort(self, request_id: str) -> None:
        for link in self.registry.links.values():
            await link.socket.send(encode(Abort(request_id)))

    # ---- metrics -----------------------------------------------------------------------------------
    async def server_stats(self, timeout_s: float = 2.0, request_id: str | None = None) -> dict[str, Stats]:
        """``Stats`` of every server that answers within ``timeout_s``, by address."""
        loop = asyncio.get_running_loop()
        waiting = {}
        for link in list(self.registry.links.values()):
            self._next_token += 1
            fut = loop.create_future()
            self._stats_waiters[self._next_token] = fut
            waiting[link.address] = (self._next_token, fut)
            await link.socket.send(encode(StatsRequest(self._next_token, request_id)))
        out = {}
        for address, (token, fut) in waiting.items():
            try:
                out[address] = await asyncio.wait_for(fut, timeout_s)
            except asyncio.TimeoutError:
                self._stats_waiters.pop(token, None)
        return out

    async def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        samples: list[tuple[str, dict[str, str], float]] = []
        roles = {lk.address: lk.info.role for lk in self.registry.links.values()}
        for address, stats in (await self.server_stats()).items():
            labels = {"server": address, "role": roles.get(address, "")}
            samples += [(f"duet_server_{k}", labels, float(v)) for k, v in asdict(stats.values).items()]
        for lk in self.registry.links.values():
            labels = {"server": lk.address, "role": lk.info.role}
            s = lk.state
            samples += [("duet_router_server_healthy", labels, float(s.healthy)),
                        ("duet_router_server_running_requests", labels, float(s.running_requests)),
                        ("duet_router_server_queued_prefill_tokens", labels, float(s.queued_prefill_tokens)),
                        ("duet_router_server_free_blocks", labels, float(s.free_blocks))]
        samples += [("duet_router_decisions_total", {"reason": r}, float(n)) for r, n in self.decisions.items()]
        samples += [(f"duet_router_{k}_total", {}, float(v)) for k, v in self.counters.items()]
        samples.append(("duet_router_queue_length", {}, float(self._num_queued)))
        for h in (self.prefill_compute, self.handoff):
            samples += _histogram_samples(h)
        return samples


def _histogram_samples(h: Histogram) -> list[tuple[str, dict[str, str], float]]:
    out, cumulative = [], 0
    for bound, n in zip(h.buckets + (float("inf"),), h.bucket_counts):
        cumulative += n
        out.append((f"{h.name}_bucket", {"le": "+Inf" if bound == float("inf") else repr(bound)}, cumulative))
    return out + [(f"{h.name}_sum", {}, h.sum), (f"{h.name}_count", {}, h.count)]
