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

KV tiers (issue 19): the prefix match is per tier (``PrefixIndex.match_tiers``), so the scorer prices a device
hit, a host-tier hit and a pull from another server differently. A decision with a pull sends the decode server
``Generate(pull=...)`` and the owner ``PullKV`` (the owner stands where a prefill server would: when it dies, D
is told, and computes the prefix itself); the owner's ``PullDone`` feeds the scorer's bandwidth estimate.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import AsyncIterator

import zmq
import zmq.asyncio

from duet.engine.protocol import (Abort, FinishReason, Generate, Hello, KVFailed, Lease, PeerRef, Prefill, PrefillDone,
                             PullDone, PullKV, RemotePrefill, RemotePull, Role, ServerInfo, Stats, StatsRequest,
                             TokenDelta, Tokens)
from duet.engine.router.dispatcher import Dispatcher, DispatchError, GenerateRequest
from duet.engine.router.metrics import RouterMetrics
from duet.engine.router.scoring import NO_SERVER_IN_ZONE, RequestInfo, RouterPolicy, Scorer
from duet.engine.router.server_registry import ServerLink, ServerRegistry
from duet.transfer.curve import ZmqKeys, start_async_authenticator
from duet.transfer.wire import Message, encode

logger = logging.getLogger(__name__)

_SERVER_GONE = object()  # queued to a request whose decode server died
MAX_STALE_ABORTS = 10_000
WAIT_LOG_FIRST_S = 1.0  # at start-up: first "waiting for ..." line after this long, then every WAIT_LOG_EVERY_S
WAIT_LOG_EVERY_S = 5.0


@dataclass
class _Placement:
    """Where one attempt of a request runs. A message from another attempt is stale."""

    decode: ServerLink
    prefill: ServerLink | None
    transfer_id: str | None
    attempt: int
    prefill_done: asyncio.Future | None = None
    """Set when the request wants prompt logprobs from its prefill server: its ``PrefillDone`` carries them."""


def _send_soon(link: ServerLink, msg: Message) -> None:
    """Send from synchronous code on the event loop. ``zmq.asyncio``'s ``send`` returns a Future, not a coroutine
    (``asyncio.create_task`` raises TypeError on it; that once killed the registry's watch loop, so no server
    was declared dead again): ``ensure_future`` takes either."""
    asyncio.ensure_future(link.socket.send(encode(msg)))


class ClusterDispatcher(Dispatcher):
    def __init__(self, prefill: list[str], decode: list[str], model_name: str, policy: RouterPolicy | None = None, *,
                 connect_timeout_s: float = 120.0, kv_timeout_s: float = 30.0, request_timeout_s: float = 600.0,
                 heartbeat_s: float = 0.2, missed_heartbeats: int = 5, max_queue: int = 256,
                 queue_timeout_s: float = 10.0,
                 registry_address: str | None = None, max_migrations: int = 2, zmq_keys: ZmqKeys | None = None,
                 lease_ttl_s: float = 5.0):
        if not decode and registry_address is None:
            raise ValueError("decode: at least one decode server (or a registry address) is required")
        self.ctx = zmq.asyncio.Context.instance()
        self.model_name = model_name
        self.scorer = Scorer(policy or RouterPolicy())
        self.keys = zmq_keys
        self._auth = None
        self.registry = ServerRegistry(self.ctx, self._on_message, self._on_dead, heartbeat_s, missed_heartbeats,
                                       keys=zmq_keys,
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
        self._placement: dict[str, _Placement] = {}
        self._pull_blocks: dict[str, int] = {}  # request id -> blocks its next attempt pulls from its "p" link
        self._stale_aborted: set[tuple[str, int]] = set()
        self.lease_ttl_s = lease_ttl_s
        self.router_id = f"router-{uuid.uuid4().hex[:8]}"
        self._lease_task: asyncio.Task | None = None
        self._stats_waiters: dict[int, asyncio.Future] = {}
        self._next_token = 0
        self._capacity_changed = asyncio.Event()
        self._num_queued = 0
        self._watch_task: asyncio.Task | None = None
        self.router_metrics = RouterMetrics(model_name)
        self._handoff_parts: dict[str, dict[str, float]] = {}
        self.traces: dict[str, dict[str, float]] = {}  # request id -> router stage -> unix time (bounded)

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Greet the listed servers (bounded by ``connect_timeout_s``), check layouts. Idempotent."""
        if self._watch_task is not None:
            return
        self._auth = start_async_authenticator(self.ctx, self.keys)
        hello = Hello(ServerInfo(self.router_id, uuid.uuid4().hex, Role.ROUTER, self.model_name))
        self.registry.hello = hello
        infos = await self._greet_all(hello)
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
            started = time.monotonic()
            next_log = started + WAIT_LOG_FIRST_S
            while not self.healthy():  # no decode server listed: wait for one to register
                now = time.monotonic()
                if now - started > self.connect_timeout_s:
                    raise DispatchError(f"no decode server registered at {self.registry_address} within "
                                        f"{self.connect_timeout_s}s")
                if now >= next_log:
                    logger.info("waiting for a decode server to register at %s (%.0fs of %.0fs)",
                                self.registry_address, now - started, self.connect_timeout_s)
                    next_log = now + WAIT_LOG_EVERY_S
                await asyncio.sleep(0.05)
        self._watch_task = asyncio.create_task(self.registry.watch())
        self._lease_task = asyncio.create_task(self._hold_leases())
        self._refresh_limits()

    async def _greet_all(self, hello: Hello) -> list[ServerInfo]:
        """Every listed server's Welcome, in ``self.addresses`` order; logs the ones not heard from yet every few
        seconds while waiting. DispatchError naming every silent server when ``connect_timeout_s`` passes."""
        tasks = {asyncio.create_task(self.registry.greet(a, hello, self.connect_timeout_s)): (a, kind)
                 for a, kind in self.addresses}
        pending, started = set(tasks), time.monotonic()
        wait_s = WAIT_LOG_FIRST_S
        try:
            while pending:
                done, pending = await asyncio.wait(pending, timeout=wait_s, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    try:
                        task.result()
                    except TimeoutError:
                        silent = [f"{kind} {a}" for t, (a, kind) in tasks.items()
                                  if not t.done() or t.cancelled() or t.exception() is not None]
                        raise DispatchError(f"no answer within {self.connect_timeout_s:g}s from "
                                            f"{', '.join(silent)}") from None
                    except ValueError as e:
                        raise DispatchError(str(e)) from e
                if pending:
                    waiting = [f"{kind} {a}" for t, (a, kind) in tasks.items() if t in pending]
                    logger.info("waiting for %d of %d servers (%.0fs of %.0fs): %s", len(waiting), len(tasks),
                                time.monotonic() - started, self.connect_timeout_s, ", ".join(waiting))
                wait_s = WAIT_LOG_EVERY_S
        finally:
            for task in pending:
                task.cancel()
        return [task.result() for task in tasks]

    def _refresh_limits(self) -> None:
        infos = [lk.info for lk in self.registry.links.values() if lk.info.role != "prefill"]
        if infos:
            self.max_model_len = min(i.max_model_len for i in infos)
            self.vocab_size = infos[0].vocab_size
            self.block_size = infos[0].layout.block_size
            self._price_kv_bytes(infos[0].layout)

    async def _hold_leases(self) -> None:
        """Renew this router's lease on every server: if the router dies, they abort its requests."""
        lease = encode(Lease(self.router_id, self.lease_ttl_s))
        while True:
            for link in list(self.registry.links.values()):
                await link.socket.send(lease)
            await asyncio.sleep(min(1.0, self.lease_ttl_s / 4))

    async def close(self) -> None:
        for task in (self._watch_task, self._lease_task):
            if task is not None:
                task.cancel()
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
            if msg.delta.finished:
                self._capacity_changed.set()
            placement = self._placement.get(msg.request_id)
            if placement is None or placement.attempt != msg.attempt or placement.decode is not link:
                self._stale(link, msg)
                return
            self._queues[msg.request_id].put_nowait(msg)
        elif isinstance(msg, PrefillDone):
            placement = self._placement.get(msg.request_id)
            if placement is None or placement.attempt != msg.attempt:
                return
            if placement.prefill_done is not None and not placement.prefill_done.done():
                placement.prefill_done.set_result(msg)
            if msg.ok:
                self.router_metrics.observe_prefill_compute(msg.compute_s)
                self.scorer.observe_prefill(link.engine_id, max(1, msg.num_tokens), msg.compute_s)
                self._handoff_part(msg.transfer_id, "compute", msg.compute_s)
            else:
                self.router_metrics.event("prefill_failures")
                logger.warning("prefill of %s on %s failed: %s", msg.request_id, link.address, msg.error)
        elif isinstance(msg, PullDone):
            self._on_pull_done(link, msg)
        elif isinstance(msg, Stats):
            fut = self._stats_waiters.pop(msg.token, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _stale(self, link: ServerLink, msg: Tokens) -> None:
        """Output of an attempt the router no longer waits for (the request moved on, or ended): drop it, and
        tell the server to stop that attempt (once)."""
        placement = self._placement.get(msg.request_id)
        if placement is not None:
            self.router_metrics.event("stale_attempt_messages_dropped")
            logger.warning("request %s: dropped output of superseded attempt %d from %s (current: %d)",
                           msg.request_id, msg.attempt, link.address, placement.attempt)
        key = (msg.request_id, msg.attempt)
        if not msg.delta.finished and key not in self._stale_aborted:
            if len(self._stale_aborted) >= MAX_STALE_ABORTS:
                self._stale_aborted.clear()
            self._stale_aborted.add(key)
            _send_soon(link, Abort(msg.request_id, attempt=msg.attempt))

    def _on_dead(self, link: ServerLink) -> None:
        self.router_metrics.event("server_deaths")
        for rid, pl in list(self._placement.items()):
            if pl.decode is link and rid in self._queues:
                self._queues[rid].put_nowait(_SERVER_GONE)
            elif pl.prefill is link and pl.transfer_id is not None:  # the KV will never come: decode falls back now
                _send_soon(pl.decode, KVFailed(rid, pl.transfer_id, f"prefill server {link.address} died"))

    # ---- placement ---------------------------------------------------------------------------------
    def _decide(self, request: GenerateRequest, prompt: list[int], max_tokens: int, exclude: set[str]):
        self._refresh_limits()
        info = RequestInfo.from_tokens(prompt, max_tokens, self.block_size, zone=request.zone,
                                       request_id=request.request_id)
        links = [lk for lk in self.registry.links.values() if lk.engine_id not in exclude]
        match = self.registry.prefix_index.match(info.block_hashes)
        tiers = self.registry.prefix_index.match_tiers(info.block_hashes)
        return self.scorer.choose(info, [lk.state for lk in links], match, tiers), info

    async def _place(self, request: GenerateRequest, prompt: list[int], max_tokens: int, exclude: set[str]):
        decision, info = self._decide(request, prompt, max_tokens, exclude)
        if not decision.accepted and exclude and decision.reason == "no_healthy_server":
            raise DispatchError("no other healthy decode server to move the request to", 503)
        if not decision.accepted and decision.retryable:
            if self._num_queued >= self.max_queue:
                self.router_metrics.rejection("queue_full")
                raise DispatchError(f"server overloaded ({decision.detail}); admission queue full", 429,
                                    decision.retry_after_s or 1.0)
            self._num_queued += 1
            self.router_metrics.set_queue_length(self._num_queued)
            self.router_metrics.event("queued")
            deadline = time.monotonic() + self.queue_timeout_s
            try:
                while not decision.accepted and decision.retryable:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.router_metrics.rejection("queue_timeout")
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
                self.router_metrics.set_queue_length(self._num_queued)
        self.router_metrics.decision(decision.reason)
        self._trace(request.request_id, "placed:" + decision.reason)
        if not decision.accepted:
            self.router_metrics.rejection(decision.reason)
            if decision.reason == NO_SERVER_IN_ZONE:  # the client named a zone no server has: its mistake
                raise DispatchError(f"X-Duet-Zone: {decision.detail}", 400, param="X-Duet-Zone")
            status = 400 if decision.reason == "request_too_large" else 503
            raise DispatchError(decision.detail or decision.reason, status)
        d = self.registry.links[decision.decode_id]
        p = self.registry.links[decision.prefill_id] if decision.prefill_id else None
        if p is not None and p.info.compat_hash != d.info.compat_hash:
            # Mid rolling update (servers of two model versions): KV only moves between equal layouts.
            self.router_metrics.event("local_prefill_layout_mismatch")
            p = None
        # Count this placement until the next load report says it (bursts must not all pile on one server).
        d.state.running_requests += 1
        d.state.running_tokens += info.num_prompt_tokens
        d.state.free_blocks = max(0, d.state.free_blocks - -(-(info.num_prompt_tokens + max_tokens) // self.block_size))
        if p is not None:
            p.state.queued_requests += 1
            p.state.queued_prefill_tokens += info.num_prompt_tokens
        self.router_metrics.event("prefix_hit_tokens_predicted", decision.decode_cached_tokens)
        if p is None and decision.pull_from_id in self.registry.links and request.params.prompt_logprobs is None:
            # The owner stands where P would. (A request scoring its prompt computes it: nothing to pull.)
            p = self.registry.links[decision.pull_from_id]
            # The pull covers the prompt's first blocks up to the end of the pulled run (D keeps its own hits).
            covered = decision.decode_cached_tokens + decision.host_hit_tokens + decision.pull_tokens
            self._pull_blocks[request.request_id] = covered // self.block_size
            self.router_metrics.event("pulls_planned")
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
            placing_since = time.monotonic()
            d, p = await self._place(request, prompt + generated, params.max_tokens - len(generated), excluded)
            if attempts == 1:
                request.queued_s = time.monotonic() - placing_since
            attempt_params = params
            if generated:  # migration: continue after the tokens the client already has
                attempt_params = replace(params, max_tokens=params.max_tokens - len(generated),
                                         min_tokens=max(0, params.min_tokens - len(generated)),
                                         prompt_logprobs=None)  # the client has them from the first attempt
            failure = None
            try:
                async for delta in self._run_on(rid, prompt + generated, attempt_params, d, p, deadline,
                                                attempts - 1):
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
            if generated and params.structured_outputs is not None:
                # Another server would restart the grammar on tokens already generated under it.
                yield TokenDelta.failure(f"structured-output request lost its server ({failure}) after "
                                         f"{len(generated)} tokens; it cannot continue elsewhere", 503)
                return
            if attempts > self.max_migrations:
                yield TokenDelta.failure(f"request failed on {attempts} servers; last: {failure}", 503)
                return
            self.router_metrics.event("migrations" if generated else "retries")
            logger.warning("request %s: %s after %d tokens; moving it to another decode server", rid, failure,
                           len(generated))
            await asyncio.sleep(0.05 * 2 ** (attempts - 1))  # backoff

    async def _run_on(self, rid: str, prompt: list[int], params, d: ServerLink, p: ServerLink | None,
                      deadline: float, attempt: int) -> AsyncIterator:
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue
        tid = uuid.uuid4().hex if p is not None else None
        placement = self._placement[rid] = _Placement(d, p, tid, attempt)
        if p is not None and params.prompt_logprobs is not None:
            placement.prefill_done = asyncio.get_running_loop().create_future()
        sampling = params
        finished = False
        try:
            remote = None
            pull = self._pull_blocks.pop(rid, 0)  # p owns a prefix to pull: it is not a prefill server
            if p is not None and not pull:
                remote = RemotePrefill(PeerRef.of(p.info), tid, self.kv_timeout_s)
                self._handoff_parts[tid] = {"sent": time.monotonic()}
                while len(self._handoff_parts) > 10_000:  # parts of failed transfers never complete
                    self._handoff_parts.pop(next(iter(self._handoff_parts)))
            if pull:
                await self._send_pull(rid, tid, prompt, sampling, d, p, pull, attempt)
            else:
                await d.socket.send(encode(Generate(rid, prompt, sampling, remote, attempt)))
            if p is not None and not pull:
                await p.socket.send(encode(Prefill(rid, tid, prompt, sampling, PeerRef.of(d.info), self.kv_timeout_s,
                                                   attempt)))
            while not finished:
                try:
                    msg = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    yield TokenDelta.failure(f"request timed out after {self.request_timeout_s}s", 504)
                    return
                if msg is _SERVER_GONE:  # abort there anyway: a server that stalled (not died) stops this attempt
                    yield msg
                    return
                delta = msg.delta
                finished = delta.finished
                if tid is not None and delta.token_ids:
                    self._handoff_part(tid, "first_token", time.monotonic())
                if delta.error and not delta.token_ids and delta.finish_reason is FinishReason.ERROR:
                    raise DispatchError(delta.error, status=delta.status, retryable=delta.retryable)
                if placement.prefill_done is not None and delta.token_ids and delta.prompt_logprobs is None:
                    delta = await self._with_prompt_logprobs(placement, delta, deadline)
                placement.prefill_done = None
                yield delta
        finally:
            self._queues.pop(rid, None)
            self._placement.pop(rid, None)
            if not finished:
                for link in (d, p):
                    if link is not None:
                        await link.socket.send(encode(Abort(rid, tid, attempt)))

    async def _with_prompt_logprobs(self, placement: _Placement, delta: TokenDelta, deadline: float) -> TokenDelta:
        """The first delta of a disaggregated request that asked for prompt logprobs: the prefill server scored
        the prompt (the decode server only got its KV), so they come from its ``PrefillDone``."""
        try:
            done = await asyncio.wait_for(placement.prefill_done, max(0.0, min(deadline - time.monotonic(),
                                                                                self.kv_timeout_s)))
        except asyncio.TimeoutError:
            done = None
        if done is None or done.prompt_logprobs is None:
            raise DispatchError("prompt logprobs did not come back from the prefill server", 502)
        return replace(delta, prompt_logprobs=done.prompt_logprobs, prompt_token_ranks=done.prompt_token_ranks)

    # ---- prefix pulls (KV tiers) --------------------------------------------------------------------
    def _price_kv_bytes(self, layout) -> None:
        """Pulls are priced by the servers' real KV bytes per token (their layout), not the policy's default."""
        tiers = self.scorer.policy.tiers
        per_token = layout.block_bytes * 2 * layout.num_layers // layout.block_size
        if tiers.kv_bytes_per_token != per_token:
            self.scorer.policy = replace(self.scorer.policy, tiers=replace(tiers, kv_bytes_per_token=per_token))

    async def _send_pull(self, rid: str, tid: str, prompt: list[int], sampling, d: ServerLink, owner: ServerLink,
                         num_blocks: int, attempt: int) -> None:
        """D generates, pulling the first ``num_blocks`` blocks from ``owner``; the owner sends them."""
        pull = RemotePull(PeerRef.of(owner.info), tid, num_blocks, self.kv_timeout_s)
        await d.socket.send(encode(Generate(rid, prompt, sampling, attempt=attempt, pull=pull)))
        await owner.socket.send(encode(PullKV(rid, tid, prompt[:num_blocks * self.block_size], PeerRef.of(d.info),
                                              self.kv_timeout_s, attempt)))

    def _on_pull_done(self, link: ServerLink, msg: PullDone) -> None:
        if msg.ok:
            self.router_metrics.event("pulls_served")
            self.scorer.observe_pull(msg.num_bytes, msg.seconds)
        else:
            self.router_metrics.event("pulls_failed")
            logger.warning("pull %s from %s failed (the puller computes it): %s", msg.transfer_id, link.address,
                           msg.error)

    def _handoff_part(self, tid: str, key: str, value: float) -> None:
        parts = self._handoff_parts.get(tid)
        if parts is None or key in parts:
            return
        parts[key] = value
        if {"sent", "first_token", "compute"} <= parts.keys():
            self.router_metrics.observe_handoff(parts["first_token"] - parts["sent"] - parts["compute"])
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

    async def metrics(self) -> list:
        """The router's families (``RouterMetrics.families``), with the stats of every server that answers."""
        stats = await self.server_stats()
        return self.router_metrics.families(list(self.registry.links.values()), stats)
