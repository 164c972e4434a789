"""One Duet server (prefill, decode or colocated) over an ``Executor``: the loop every server process runs.

Sockets: a ROUTER for commands (routers connect DEALERs; replies go back by identity), a PUB for events
(``LoadReport`` every heartbeat, ``KVEvents``), and whatever the executor asks the poller to watch. One thread
does everything: poll, apply commands through the dispatch table, run one executor turn, route what it
reports. A heartbeat thread publishes the latest load report, so a long step never looks like a dead server.

Servers do not talk to each other on the control plane: a ``Generate`` with remote KV names its prefill
server, and a ``Prefill`` its decode server, as a ``PeerRef`` (the router has every server's ``Welcome``).
Before any KV moves the server checks the peer's layout hash and connects the executor's transport to it
(once per peer); from then on the two executors talk over their KV transports only.

Every request the server works on is one ``ServerRequest`` keyed by its engine request id (the router's id;
``xfer:<transfer id>`` for a prompt prefilled here for another server), with a ``Phase``::

    Generate, local          -> GENERATING ----------------------------------> (finished Tokens) gone
    Generate, remote KV      -> AWAITING_KV -(first Tokens: the KV and the prefill's token arrived)-> GENERATING
                                    | peer unusable / KVLost / KVFailed: policy recompute -> GENERATING,
                                    |                                   policy fail      -> error Tokens, gone
    Prefill (for a peer)     -> PREFILLING -(the executor's PrefillDone, to the router)-> gone
    Generate, pull a prefix  -> PULLING -(first Tokens)-> GENERATING     (a failed pull is recomputed here)
    PullKV (for a peer)      -> SERVING_PULL -(the executor's PullDone, to the router)-> gone

A request is registered before anything can fail it, and it leaves the table in exactly one place
(``_forget``), so no entry outlives its request. ``Drain`` (or SIGTERM) is a state: nothing new is admitted,
the running requests (and a prefill server's hand-offs) finish, then the process exits; past the drain
deadline what is left is aborted. Every wait has a deadline: transport connects, KV arrival, draining.
"""
from __future__ import annotations

import enum
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Callable

import zmq

from duet.engine import envs
from duet.engine.protocol import (Abort, Drain, Generate, Hello, KVEvents, KVFailed, Lease, LoadReport, PeerRef,
                                  Prefill, PrefillDone, PullDone, PullKV, Refused, Role, ServerInfo, ServerStats, Stats,
                                  StatsRequest, TokenDelta, Tokens, Welcome)
from duet.engine.server.executor import Executor, KVLost
from duet.engine.server.server_config import ServerConfig
from duet.transfer.compat import IncompatiblePeer, check_compatible
from duet.transfer.curve import secure_client, secure_server, start_authenticator
from duet.transfer.transport import TransferError
from duet.transfer.wire import Message, ProtocolError, encode
from duet.transfer.zmq_messages import recv_messages

logger = logging.getLogger(__name__)

MAX_TRACES = 1024
PREFILL_PREFIX = "xfer:"


class Phase(enum.Enum):
    GENERATING = "generating"
    """Prefills (unless its KV came from a peer) and decodes here."""
    AWAITING_KV = "awaiting_kv"
    """Remote KV: the prefill server computes it and streams it here."""
    PREFILLING = "prefilling"
    """Prefilled here for a decode server; ends when the hand-off does."""
    PULLING = "pulling"
    """Generates here once a prefix pulled from another server is in (or the pull failed and it recomputes)."""
    SERVING_PULL = "serving_pull"
    """A prefix cached here, being sent to the server that pulls it; ends when that send does."""


@dataclass
class ServerRequest:
    request_id: str
    """The router's id."""
    engine_request_id: str
    client: bytes
    """The router's socket identity: where Tokens / PrefillDone go."""
    phase: Phase
    num_prompt_tokens: int
    transfer_id: str | None = None
    attempt: int = 0
    """The router's attempt number, echoed in every reply (a superseded attempt's output is then recognised)."""


def engine_request_id(request_id: str, attempt: int) -> str:
    """The engine's id for one attempt of a router request (attempts of one request never collide)."""
    return request_id if attempt == 0 else f"{request_id}@{attempt}"


class Server:
    def __init__(self, config: ServerConfig, make_executor: Callable[[str], Executor], engine_id: str):
        """``make_executor(engine_id)`` builds this server's executor (``make_server``); the server owns it. The
        ports are bound first: starting an engine can take minutes, and a port chosen by the caller must not be
        taken meanwhile by whatever else starts on the host."""
        self.config = config
        self.engine_id = engine_id
        self.epoch = uuid.uuid4().hex
        keys = config.zmq_keys
        if keys is None:
            logger.warning("%s: the ZeroMQ control plane is plaintext: any process that reaches %s can send it "
                           "commands and KV; turn on CURVE with --zmq-keys DIR (python -m engine.tools.keys DIR)",
                           engine_id, config.host)
        self.ctx = zmq.Context.instance()
        self._auth = start_authenticator(self.ctx, keys)  # CURVE: only key holders get in (None: plaintext)
        self.cmd = self._socket(zmq.ROUTER, server=True)
        self.cmd.setsockopt(zmq.ROUTER_MANDATORY, 0)
        where = config.advertised  # what the router and peers are told: never the bind address itself
        port = self._bind(self.cmd, where.bind_endpoint(), config.port)
        self.pub = self._socket(zmq.PUB, server=True)
        event_port = self._bind(self.pub, where.bind_endpoint(), config.event_port)
        self.address, self.event_address = where.endpoint(port), where.endpoint(event_port)
        try:
            self.executor = executor = make_executor(engine_id)
        except BaseException:
            self.cmd.close(0)
            self.pub.close(0)
            if self._auth is not None:
                self._auth.stop()
            raise
        x = executor.info
        self.info = ServerInfo(
            engine_id=engine_id, epoch=self.epoch, role=config.role, model_name=config.model_name,
            address=self.address, event_address=self.event_address, zone=config.zone, layout=x.layout,
            compat_hash=x.layout.compat_hash(), transport_kind=x.transport_kind, transport_name=x.transport_name,
            transport_metadata=x.transport_metadata, staging_region=x.staging_region, max_model_len=x.max_model_len,
            vocab_size=x.vocab_size, num_total_blocks=x.num_total_blocks,
            tensor_parallel_size=x.tensor_parallel_size, pipeline_parallel_size=x.pipeline_parallel_size)
        self.poller = zmq.Poller()
        for sock in (self.cmd, *executor.sockets()):
            self.poller.register(sock, zmq.POLLIN)
        self._reachable: set[str] = set()  # peer transports the executor is connected to
        self.requests: dict[str, ServerRequest] = {}  # engine request id -> request
        self.traces: dict[str, dict[str, float]] = {}  # request id -> stage -> unix time (bounded)
        self._handlers = {
            Hello: self._on_hello, Generate: self._on_generate, Prefill: self._on_prefill, Abort: self._on_abort,
            KVFailed: self._on_kv_failed, StatsRequest: self._on_stats_request, Drain: self._on_drain,
            Lease: self._on_lease, PullKV: self._on_pull_kv,
        }
        self._leases: dict[bytes, tuple[str, float, float]] = {}  # router identity -> (router id, ttl, expiry)
        self._next_lease_check = 0.0
        self.num_kv_fallbacks = 0
        self.num_kv_failed_requests = 0
        self.num_peers_refused = 0
        self.num_kv_events = 0
        self.router_link = None
        if config.router_address:  # run-time registration: our Hello doubles as a heartbeat to the router
            self.router_link = self._socket(zmq.DEALER, server=False)
            self.router_link.connect(config.router_address)
        self.stopping = False
        self.draining = False
        self._drain_deadline = 0.0
        self._pub_lock = threading.Lock()
        self._load = self._load_report()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="duet-heartbeat", daemon=True)
        self._heartbeat.start()
        logger.info("%s serving %s on %s (events %s, bound on %s, %s executor, KV transport %s, tp=%d pp=%d)",
                    engine_id, config.model_name, self.address, self.event_address, where.bind_host, config.executor,
                    x.transport_kind, x.tensor_parallel_size, x.pipeline_parallel_size)

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
        try:
            while not self.stopping:
                self.run_once()
        finally:
            self.close()

    def stop(self) -> None:
        """First call (SIGTERM): drain. A second call exits now."""
        if self.draining:
            self.stopping = True
        else:
            self.begin_drain()

    def begin_drain(self) -> None:
        """Admit nothing new; finish what runs (bounded by the drain timeout), then exit."""
        if self.draining:
            return
        logger.info("%s draining (up to %.0fs, %d requests in flight)", self.engine_id, self.config.drain_timeout_s,
                    len(self.requests))
        self.draining = True
        self._drain_deadline = time.monotonic() + self.config.drain_timeout_s
        self._publish_load()  # the router stops routing here at this message, not at the next heartbeat

    def run_once(self) -> None:
        wait_s = self.executor.wait_s()
        events = dict(self.poller.poll(int(wait_s * 1000)))
        if not events and 0 < wait_s < 1e-3:
            time.sleep(wait_s)  # transfers progress only when polled: stay close without spinning a core
        if self.cmd in events:
            for ident, msg in recv_messages(self.cmd, routed=True, on_bad=self._refuse_malformed):
                self._dispatch(ident, msg)
        now = time.monotonic()
        if self._leases and now >= self._next_lease_check:
            # Right after the commands are read: a lease renewal that waited in the socket while this loop was
            # busy (a long step) counts; a router is silent only when nothing from it is waiting here.
            self._next_lease_check = now + 0.25
            self._expire_leases(now)
        for event in self.executor.run_once():
            if isinstance(event, Tokens):
                self._on_output(event)
            elif isinstance(event, PrefillDone):
                self._on_prefill_done(event)
            elif isinstance(event, PullDone):
                self._on_pull_done(event)
            elif isinstance(event, KVLost):
                req = self.requests.get(event.request_id)
                if req is not None and req.phase is Phase.AWAITING_KV:
                    self._kv_lost(req, event.reason)
        self._publish_events()
        if self.draining:
            self._check_drained()
        if not self.executor.healthy():
            logger.error("%s: its engine died; exiting so the router stops placing work here", self.engine_id)
            self.stopping = True

    def _check_drained(self) -> None:
        if not self.requests and self.executor.idle():
            self.stopping = True
        elif time.monotonic() > self._drain_deadline:
            logger.warning("%s: drain deadline passed with %d requests left: aborting them", self.engine_id,
                           len(self.requests))
            for req in list(self.requests.values()):
                self.executor.abort(req.engine_request_id, req.transfer_id)
                self._reply_failure(req, "server drained before the request finished", 503, retryable=True)
                self._forget(req)
            self.stopping = True

    def close(self) -> None:
        with self._pub_lock:
            self.stopping = True
        self._heartbeat.join(timeout=5)
        if self.router_link is not None:
            self.router_link.close(0)
        self.cmd.close(0)
        self.pub.close(0)
        if self._auth is not None:
            self._auth.stop()
        self.executor.close()

    # ---- commands -----------------------------------------------------------------------------------------
    def _refuse_malformed(self, ident: bytes, error: ProtocolError) -> None:
        self._reply(ident, Refused(f"malformed message: {error}"))

    def _dispatch(self, ident: bytes, msg: Message) -> None:
        lease = self._leases.get(ident)
        if lease is not None:  # any message from a leasing router renews its lease
            self._leases[ident] = (lease[0], lease[1], time.monotonic() + lease[1])
        handler = self._handlers.get(type(msg))
        if handler is None:
            self._reply(ident, Refused(f"{type(msg).__name__} is not a command for a {self.config.role} server"))
            return
        try:
            handler(ident, msg)
        except Exception:  # noqa: BLE001 - an error in one request must never end the process
            logger.exception("%s: handling %s failed", self.engine_id, type(msg).__name__)
            request_id = getattr(msg, "request_id", None)
            if request_id is not None:
                self._reply(ident, Tokens(request_id, TokenDelta.failure("internal server error", 500)))

    def _on_hello(self, ident: bytes, msg: Hello) -> None:
        self._reply(ident, Welcome(self.info))

    def _on_generate(self, ident: bytes, msg: Generate) -> None:
        rid = msg.request_id
        if self.config.role is Role.PREFILL or self.draining:
            why = "server is draining" if self.draining else "a prefill server does not generate"
            self._reply(ident, Tokens(rid, TokenDelta.failure(why, 503, retryable=True)))
            return
        erid = engine_request_id(rid, msg.attempt)
        if erid in self.requests or rid.startswith(PREFILL_PREFIX):
            self._reply(ident, Tokens(rid, TokenDelta.failure(f"request_id {rid!r} is already in use", 400),
                                      msg.attempt))
            return
        for old in [r for r in self.requests.values() if r.request_id == rid and r.attempt < msg.attempt]:
            self._supersede(old)
        if msg.pull is not None and msg.remote is None:
            self._generate_pulling(ident, msg, erid)
            return
        remote, x = msg.remote, self.executor
        req = ServerRequest(rid, erid, ident, Phase.GENERATING, len(msg.prompt_token_ids), attempt=msg.attempt)
        try:
            unusable = None if remote is None else self._reach(remote.prefill)
            if remote is None:
                x.add_request(erid, msg.prompt_token_ids, msg.sampling)
            elif unusable is not None:
                if self.config.kv_failure_policy == "fail":
                    self.num_kv_failed_requests += 1
                    self._reply(ident, Tokens(rid, TokenDelta.failure(f"KV transfer impossible: {unusable}", 503),
                                              msg.attempt))
                    return
                logger.warning("request %s: prefilling locally (%s)", rid, unusable)
                self.num_kv_fallbacks += 1
                x.add_request(erid, msg.prompt_token_ids, msg.sampling)
            elif x.add_remote(erid, msg.prompt_token_ids, msg.sampling, remote.transfer_id,
                              remote.prefill.transport_name, remote.kv_timeout_s):
                req.phase, req.transfer_id = Phase.AWAITING_KV, remote.transfer_id
            else:  # no KV room now: prefill here when room frees up (the executor told the prefill side)
                self.num_kv_fallbacks += 1
                x.add_request(erid, msg.prompt_token_ids, msg.sampling)
        except ValueError as e:
            self._reply(ident, Tokens(rid, TokenDelta.failure(str(e), 400), msg.attempt))
            return
        self.requests[erid] = req  # registered before anything can end it
        self._trace(rid, "decode_admitted" if req.phase is Phase.AWAITING_KV else "queued")

    def _on_prefill(self, ident: bytes, msg: Prefill) -> None:
        if self.config.role is Role.DECODE or self.draining:
            why = "server is draining" if self.draining else "a decode server does not prefill for others"
            self._reply(ident, PrefillDone(msg.request_id, msg.transfer_id, False, why))
            return
        engine_rid = PREFILL_PREFIX + msg.transfer_id
        unusable = "transfer id already in use" if engine_rid in self.requests else self._reach(msg.decode)
        if unusable is not None:
            self._reply(ident, PrefillDone(msg.request_id, msg.transfer_id, False, unusable))
            return
        params = replace(msg.sampling, max_tokens=1, min_tokens=min(msg.sampling.min_tokens, 1), stop=[])
        try:
            self.executor.add_prefill(engine_rid, msg.transfer_id, msg.request_id, msg.prompt_token_ids, params,
                                      msg.timeout_s)
        except ValueError as e:
            self._reply(ident, PrefillDone(msg.request_id, msg.transfer_id, False, str(e)))
            return
        self.requests[engine_rid] = ServerRequest(msg.request_id, engine_rid, ident, Phase.PREFILLING,
                                                  len(msg.prompt_token_ids), msg.transfer_id, msg.attempt)
        self._trace(msg.request_id, "prefill_admitted")

    def _on_abort(self, ident: bytes, msg: Abort) -> None:
        for req in list(self.requests.values()):
            if (req.request_id == msg.request_id or (msg.transfer_id and req.transfer_id == msg.transfer_id)) \
                    and msg.attempt in (None, req.attempt):
                self.executor.abort(req.engine_request_id, req.transfer_id)

    def _on_lease(self, ident: bytes, msg: Lease) -> None:
        if ident not in self._leases:
            logger.info("%s: router %s holds a lease (%.1fs): its requests end if it goes silent", self.engine_id,
                        msg.router_id, msg.ttl_s)
        self._leases[ident] = (msg.router_id, msg.ttl_s, time.monotonic() + msg.ttl_s)

    def _expire_leases(self, now: float) -> None:
        """Abort the requests of every router that went silent past its lease (it died, or cannot reach us)."""
        for ident, (router_id, _, expiry) in list(self._leases.items()):
            if now <= expiry:
                continue
            del self._leases[ident]
            orphans = [r for r in self.requests.values() if r.client == ident]
            logger.warning("%s: router %s went silent past its lease: aborting its %d requests", self.engine_id,
                           router_id, len(orphans))
            for req in orphans:
                self.executor.abort(req.engine_request_id, req.transfer_id)
                self._forget(req)

    def _supersede(self, req: ServerRequest) -> None:
        logger.warning("request %s: attempt %d supersedes attempt %d here", req.request_id, req.attempt + 1,
                       req.attempt)
        self.executor.abort(req.engine_request_id, req.transfer_id)
        self._forget(req)

    def _on_kv_failed(self, ident: bytes, msg: KVFailed) -> None:
        for req in list(self.requests.values()):
            if req.transfer_id == msg.transfer_id and req.phase is Phase.AWAITING_KV:
                self._kv_lost(req, msg.reason or "prefill server failed")
            elif req.transfer_id == msg.transfer_id and req.phase is Phase.PULLING:
                self.executor.fail_pull(req.engine_request_id, msg.transfer_id, msg.reason or "the owner failed")

    def _on_stats_request(self, ident: bytes, msg: StatsRequest) -> None:
        traces: dict[str, dict[str, float]] = {}
        for source in (self.traces, self.executor.traces()):
            for rid, stages in source.items():
                if msg.request_id is None or rid == msg.request_id:
                    traces.setdefault(rid, {}).update(stages)
        self._reply(ident, Stats(msg.token, self.engine_id, self.stats(), traces))

    def _on_drain(self, ident: bytes, msg: Drain) -> None:
        self.begin_drain()

    # ---- remote KV: peers and the failure policy --------------------------------------------------------
    def _reach(self, peer: PeerRef) -> str | None:
        """None when KV can move between this server and ``peer``; else why not (the peer is refused)."""
        why = self._unusable(peer)
        if why is not None:
            self.num_peers_refused += 1
            logger.error("%s: %s", self.engine_id, why)
        return why

    def _unusable(self, peer: PeerRef) -> str | None:
        try:
            check_compatible(self.info.layout, peer.layout)
        except IncompatiblePeer as e:
            return f"peer {peer.engine_id}: {e}"
        if peer.transport_kind != self.info.transport_kind:
            return f"peer {peer.engine_id} uses KV transport {peer.transport_kind}, this server {self.info.transport_kind}"
        if peer.transport_name in self._reachable and not self.executor.peer_connected(peer.transport_name):
            logger.warning("%s: the KV connection to peer %s was lost (a network partition?): reconnecting",
                           self.engine_id, peer.engine_id)
            self._reachable.discard(peer.transport_name)
        if peer.transport_name not in self._reachable:
            try:
                self.executor.connect_peer(peer.transport_name, peer.transport_metadata)
            except (TransferError, ValueError, RuntimeError) as e:
                return f"cannot reach peer {peer.engine_id}'s KV transport: {e}"
            self._reachable.add(peer.transport_name)
        return None

    def _kv_lost(self, req: ServerRequest, reason: str) -> None:
        """The prompt's KV will not come: prefill it here (policy ``recompute``) or fail the request."""
        if self.config.kv_failure_policy == "fail":
            logger.warning("request %s: KV transfer failed (%s); failing it", req.request_id, reason)
            self.num_kv_failed_requests += 1
            self.executor.abort(req.engine_request_id, req.transfer_id)
            self._reply_failure(req, f"KV transfer failed: {reason}", 503)
            self._forget(req)
            return
        logger.warning("request %s: prefilling locally (%s)", req.request_id, reason)
        self.num_kv_fallbacks += 1
        self.executor.recompute(req.engine_request_id, req.transfer_id)
        req.phase = Phase.GENERATING
        self._trace(req.request_id, "kv_fallback")

    # ---- executor events --------------------------------------------------------------------------------
    def _on_output(self, out: Tokens) -> None:
        req = self.requests.get(out.request_id)
        if req is None or req.phase is Phase.PREFILLING:
            return  # aborted or failed by policy already; a prefill's progress is reported by PrefillDone
        if req.phase is not Phase.GENERATING:
            req.phase = Phase.GENERATING  # the remote KV arrived (this carries the prefill's first token)
        self._reply(req.client, Tokens(req.request_id, out.delta, req.attempt))
        if out.delta.token_ids:
            self._trace(req.request_id, "first_token_sent")
        if out.delta.finished:
            self._trace(req.request_id, "finished")
            self._forget(req)

    def _on_prefill_done(self, done: PrefillDone) -> None:
        req = self.requests.get(done.request_id)
        if req is None:
            return
        self._trace(req.request_id, "transfer_done" if done.ok else "transfer_failed")
        self._reply(req.client, replace(done, request_id=req.request_id, attempt=req.attempt,
                                        num_tokens=max(0, req.num_prompt_tokens - done.num_cached_tokens)))
        self._forget(req)

    # ---- prefix pulls (issue 19) ---------------------------------------------------------------------------
    def _generate_pulling(self, ident: bytes, msg: Generate, erid: str) -> None:
        """``Generate`` with a pull: the prefix comes from its owner's tiers, the rest is prefilled here. A pull
        never fails a request: an unusable owner, no room or a failed transfer all mean computing it here."""
        rid, pull, x = msg.request_id, msg.pull, self.executor
        req = ServerRequest(rid, erid, ident, Phase.GENERATING, len(msg.prompt_token_ids), attempt=msg.attempt)
        try:
            if self._reach(pull.owner) is not None:
                x.add_request(erid, msg.prompt_token_ids, msg.sampling)
            elif x.add_pulled(erid, msg.prompt_token_ids, msg.sampling, pull.transfer_id, pull.owner.transport_name,
                              pull.num_blocks, pull.kv_timeout_s):
                req.phase, req.transfer_id = Phase.PULLING, pull.transfer_id
        except ValueError as e:
            self._reply(ident, Tokens(rid, TokenDelta.failure(str(e), 400), msg.attempt))
            return
        self.requests[erid] = req
        self._trace(rid, "pull_admitted" if req.phase is Phase.PULLING else "queued")

    def _on_pull_kv(self, ident: bytes, msg: PullKV) -> None:
        engine_rid = PREFILL_PREFIX + msg.transfer_id
        unusable = "transfer id already in use" if engine_rid in self.requests else self._reach(msg.puller)
        if unusable is None and self.draining:
            unusable = "server is draining"
        if unusable is not None:
            self._reply(ident, PullDone(msg.request_id, msg.transfer_id, False, unusable, attempt=msg.attempt))
            return
        try:
            self.executor.add_pull_send(engine_rid, msg.transfer_id, msg.request_id, msg.prefix_token_ids,
                                        msg.timeout_s)
        except ValueError as e:
            self._reply(ident, PullDone(msg.request_id, msg.transfer_id, False, str(e), attempt=msg.attempt))
            return
        self.requests[engine_rid] = ServerRequest(msg.request_id, engine_rid, ident, Phase.SERVING_PULL,
                                                  len(msg.prefix_token_ids), msg.transfer_id, msg.attempt)
        self._trace(msg.request_id, "pull_serving")

    def _on_pull_done(self, done: PullDone) -> None:
        req = self.requests.get(done.request_id)
        if req is None:
            return
        self._trace(req.request_id, "pull_served" if done.ok else "pull_failed")
        self._reply(req.client, replace(done, request_id=req.request_id, attempt=req.attempt))
        self._forget(req)

    def _forget(self, req: ServerRequest) -> None:
        self.requests.pop(req.engine_request_id, None)

    def _reply_failure(self, req: ServerRequest, error: str, status: int, retryable: bool = False) -> None:
        if req.phase is Phase.PREFILLING:
            self._reply(req.client, PrefillDone(req.request_id, req.transfer_id or "", False, error,
                                                attempt=req.attempt))
        elif req.phase is Phase.SERVING_PULL:
            self._reply(req.client, PullDone(req.request_id, req.transfer_id or "", False, error, attempt=req.attempt))
        else:
            self._reply(req.client, Tokens(req.request_id, TokenDelta.failure(error, status, retryable), req.attempt))

    # ---- events, stats, heartbeats ----------------------------------------------------------------------
    def ready(self) -> bool:
        """Takes new requests: its engine is healthy and it is not draining (the ``/health`` of ``--metrics-port``;
        read from the exporter's thread: two flags, no lock needed)."""
        return not self.draining and not self.stopping and self.executor.healthy()

    def stats(self) -> ServerStats:
        s = ServerStats()
        self.executor.fill_stats(s)
        s.open_requests = len(self.requests)
        s.kv_fallbacks, s.kv_failed_requests = self.num_kv_fallbacks, self.num_kv_failed_requests
        s.peers_refused = self.num_peers_refused
        s.kv_events_published = self.num_kv_events
        s.engine_healthy = int(self.executor.healthy())
        return s

    def _publish_events(self) -> None:
        events = self.executor.kv_events()
        if events:
            self.num_kv_events += len(events)
            msg = encode(KVEvents(self.engine_id, self.epoch, events))
            with self._pub_lock:
                self.pub.send(msg)
        self._load = self._load_report()

    def _load_report(self) -> LoadReport:
        load = self.executor.load()
        return LoadReport(self.engine_id, self.epoch, self.config.role, load, self.draining)

    def _publish_load(self) -> None:
        self._load = self._load_report()
        with self._pub_lock:
            if not self.stopping:
                self.pub.send(encode(self._load))

    def _heartbeat_loop(self) -> None:
        """Publish the latest load report (and re-register with the router) every ``heartbeat_s``."""
        hello = encode(Hello(self.info))
        while not self.stopping:
            msg = encode(self._load)
            with self._pub_lock:
                if self.stopping:
                    return
                self.pub.send(msg)
                if self.router_link is not None:
                    try:
                        self.router_link.send(hello, zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # router not reachable yet: the next heartbeat tries again
            time.sleep(self.config.heartbeat_s)

    # ---- plumbing ---------------------------------------------------------------------------------------
    def _socket(self, kind: int, server: bool) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        (secure_server if server else secure_client)(sock, self.config.zmq_keys)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    @staticmethod
    def _bind(sock: zmq.Socket, base: str, port: int) -> int:
        """Bind ``sock`` on ``base`` (``tcp://HOST``); port 0 picks a free one. Returns the port."""
        if port == 0:
            return sock.bind_to_random_port(base)
        sock.bind(f"{base}:{port}")
        return port

    def _reply(self, ident: bytes, msg: Message) -> None:
        try:
            self.cmd.send_multipart([ident, encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.warning("reply %s dropped: %s", type(msg).__name__, e)

    def _trace(self, request_id: str, stage: str) -> None:
        self.traces.setdefault(request_id, {}).setdefault(stage, time.time())
        while len(self.traces) > MAX_TRACES:
            self.traces.pop(next(iter(self.traces)))


def make_server(engine_config, config: ServerConfig) -> Server:
    """A server with the executor ``config.executor`` names (``engine_config`` configures its engine)."""
    engine_id = f"{config.role}-{'vllm-' if config.executor == 'vllm' else ''}{uuid.uuid4().hex[:8]}"
    ucx = envs.apply_ucx_settings(config.ucx_tls, config.ucx_net_devices)  # before any NIXL agent starts
    if ucx:
        logger.info("%s: NIXL/UCX settings %s", engine_id, " ".join(f"{k}={v}" for k, v in ucx.items()))

    def make_executor(engine_id: str) -> Executor:
        if config.executor == "vllm":
            from duet.engine.server.vllm_executor import VllmExecutor

            return VllmExecutor(engine_config, config)
        from duet.engine.server.native_executor import NativeExecutor

        return NativeExecutor(engine_config, config, engine_id)

    return Server(config, make_executor, engine_id)
