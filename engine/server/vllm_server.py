"""A vLLM V1 engine behind Duet's ZeroMQ protocol: ``--executor vllm`` prefill, decode and colocated servers.

The same command socket (ROUTER) and event socket (PUB) as ``engine.server.engine_server``, the same
messages (Hello/Welcome/Refused, Generate, Prefill, KVDest, Abort, KVFailed, StatsRequest, Drain; Tokens,
PrefillDone, Stats; LoadReport and KVEvents on PUB), so a router drives it unchanged and a native server can
be its peer when the KV layouts agree (the handshake refuses with the differing fields otherwise).

Processes and threads: this process runs one loop thread (all ZeroMQ sockets) and the ``VllmEngine`` thread
(vLLM's ``AsyncLLM``); vLLM's scheduler and worker run in processes of their own, with Duet's connector
(``transfer.vllm_connector``) inside. The worker side of that connector owns the KV transport and staging; it
reaches this server over a local control socket (``transfer.vllm_control``)::

    router -> D: Generate(remote)   D: AsyncLLM.generate(kv_transfer_params={"duet_recv": tid}); Hello to P
    vLLM D allocates blocks         worker -> D: KVDest   D -> P (after the handshake): KVDest
    router -> P: Prefill            P: AsyncLLM.generate(max_tokens=1, {"duet_send": tid})
    P: KVDest -> worker             worker packs layers as vLLM saves them and WRITEs them to D's staging
    P: first token -> worker        rides the last layer; worker -> P: PrefillDone -> router
    D worker scatters, reports      vLLM D schedules the request (recomputing its last prompt token)

KV events: vLLM's publisher connects to a SUB socket bound here; ``KVEventTranslator`` turns vLLM's block
hashes into Duet's chained hashes, republished as ``KVEvents`` for the router's prefix index.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, replace

import zmq

from engine.config import EngineConfig
from engine.kv_events import event_to_dict
from engine.sampling_params import SamplingParams
from engine.security import ZmqKeys, secure_client, secure_server, start_authenticator
from engine.server.command_server import CommandServer, check_server_args
from engine.server.peers import PeerLinks
from engine.server.vllm_engine import VllmEngine, engine_args, model_id
from engine.server.vllm_kv_events import KVEventTranslator
from transfer.compat import IncompatiblePeer, check_compatible
from transfer.messages import (
    Abort,
    Drain,
    Generate,
    Hello,
    KVDest,
    KVEvents,
    KVFailed,
    LoadReport,
    Prefill,
    PrefillDone,
    Refused,
    ServerInfo,
    Stats,
    StatsRequest,
    Tokens,
    Welcome,
)
from transfer.vllm_control import STAT_NAMES, ConnectPeer, FirstToken, WorkerReady
from transfer.wire import Message, ProtocolError, decode, encode

logger = logging.getLogger(__name__)


@dataclass
class _PrefillJob:
    request_id: str
    transfer_id: str
    reply_to: bytes
    admitted_at: float
    num_prompt_tokens: int
    compute_s: float = 0.0
    done: bool = False


class VllmServer(CommandServer):
    def __init__(self, config: EngineConfig, role: str, host: str = "127.0.0.1", port: int = 0,
                 event_port: int | None = None, kv_transport: str = "auto", zone: str | None = None,
                 staging_bytes: int = 64 << 20, kv_timeout_s: float = 30.0, model_name: str | None = None,
                 kv_failure_policy: str = "recompute", heartbeat_s: float = 0.2, router_address: str | None = None,
                 drain_timeout_s: float = 30.0, zmq_keys: ZmqKeys | None = None, keys_dir: str | None = None,
                 debug_layer_delay_s: float = 0.0, start_timeout_s: float = 900.0):
        check_server_args(role, kv_failure_policy, heartbeat_s)
        self.role = role
        self.heartbeat_s = heartbeat_s
        self.drain_timeout_s = drain_timeout_s
        self.kv_timeout_s = kv_timeout_s
        self.engine_id = f"{role}-vllm-{uuid.uuid4().hex[:8]}"
        self.epoch = uuid.uuid4().hex
        self.model_name = model_name or config.model
        self.ctx = zmq.Context.instance()
        self.keys = zmq_keys
        self._auth = start_authenticator(self.ctx, zmq_keys)
        self.cmd = self._socket(zmq.ROUTER, server=True)
        self.cmd.setsockopt(zmq.ROUTER_MANDATORY, 0)
        port = self._bind(self.cmd, host, port)
        self.pub = self._socket(zmq.PUB, server=True)
        event_port = self._bind(self.pub, host, 0 if event_port is None else event_port)
        self.address, self.event_address = f"tcp://{host}:{port}", f"tcp://{host}:{event_port}"
        self.control = self._socket(zmq.ROUTER, server=True)  # vLLM's worker connects here
        control_address = f"tcp://127.0.0.1:{self.control.bind_to_random_port('tcp://127.0.0.1')}"
        self.kv_sub = self.ctx.socket(zmq.SUB)  # vLLM's KV-event publisher connects here (local, plaintext)
        self.kv_sub.setsockopt(zmq.LINGER, 0)
        self.kv_sub.setsockopt(zmq.SUBSCRIBE, b"")
        kv_events_endpoint = f"tcp://127.0.0.1:{self.kv_sub.bind_to_random_port('tcp://127.0.0.1')}"
        self._wake_address = f"inproc://duet-vllm-wake-{uuid.uuid4().hex}"
        self.wake = self.ctx.socket(zmq.PULL)
        self.wake.bind(self._wake_address)
        self._tls = threading.local()
        self._outputs: queue.SimpleQueue[Tokens] = queue.SimpleQueue()
        self.translator = KVEventTranslator()

        extra = {"duet_control": control_address, "duet_transport": kv_transport, "duet_host": host,
                 "duet_staging_bytes": staging_bytes, "duet_kv_timeout_s": kv_timeout_s,
                 "duet_model_id": model_id(config.model), "duet_debug_layer_delay_s": debug_layer_delay_s}
        if keys_dir:
            extra["duet_keys_dir"] = keys_dir
        self.engine = VllmEngine(engine_args(config, kv_connector_extra=extra, kv_failure_policy=kv_failure_policy,
                                             kv_events_endpoint=kv_events_endpoint), self._on_engine_output,
                                 start_timeout_s)
        self.worker_ident, ready = self._await_worker(start_timeout_s)
        self.layout = ready.layout
        self.info = ServerInfo(
            engine_id=self.engine_id, epoch=self.epoch, role=role, model_name=self.model_name,
            address=self.address, event_address=self.event_address, zone=zone, layout=self.layout,
            compat_hash=self.layout.compat_hash(), transport_kind=ready.transport_kind,
            transport_name=ready.transport_name, transport_metadata=ready.transport_metadata,
            staging_region=ready.staging_region, max_model_len=self.engine.max_model_len,
            vocab_size=self.engine.vocab_size, num_total_blocks=self.engine.num_total_blocks)
        self.poller = zmq.Poller()
        for sock in (self.cmd, self.control, self.kv_sub, self.wake):
            self.poller.register(sock, zmq.POLLIN)
        self.peers = PeerLinks(self.ctx, self.poller, self.info, keys=zmq_keys)
        self.clients: dict[str, bytes] = {}  # request id -> router identity (for Tokens)
        self.transfer_of: dict[str, str] = {}  # decode side: request id -> transfer id
        self.prefill_of: dict[str, tuple[str, str]] = {}  # decode side: transfer id -> (request id, P address)
        self.dest_waiting: dict[str, tuple[str, float]] = {}  # transfer id -> (P address, deadline): handshake
        self.jobs: dict[str, _PrefillJob] = {}  # prefill side, by transfer id
        self.worker_stats: dict[str, float] = dict.fromkeys(STAT_NAMES, 0.0)
        self.traces: dict[str, dict[str, float]] = {}
        self.num_kv_events = 0
        self.router_link = None
        if router_address:
            self.router_link = self._socket(zmq.DEALER, server=False)
            self.router_link.connect(router_address)
        self.stopping = False
        self.draining = False
        self._drain_deadline = 0.0
        self._next_heartbeat = 0.0
        logger.info("%s serving %s on %s (events %s, vLLM engine, KV transport %s, %d blocks)", self.engine_id,
                    self.model_name, self.address, self.event_address, ready.transport_kind,
                    self.engine.num_total_blocks)

    def _socket(self, kind: int, server: bool) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        (secure_server if server else secure_client)(sock, self.keys)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    def _await_worker(self, timeout_s: float) -> tuple[bytes, WorkerReady]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.control.poll(100):
                ident, raw = self.control.recv_multipart()
                msg = decode(raw)
                if isinstance(msg, WorkerReady):
                    return ident, msg
        raise TimeoutError(f"vLLM's worker did not report its KV connector within {timeout_s}s")

    def _on_engine_output(self, out: Tokens) -> None:
        """Engine thread: queue the output and wake the loop (a PUSH socket per calling thread)."""
        self._outputs.put(out)
        push = getattr(self._tls, "push", None)
        if push is None:
            push = self._tls.push = self.ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(self._wake_address)
        try:
            push.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # the loop is awake already with a full pipe

    # ---- main loop ---------------------------------------------------------------------------------
    def run_once(self) -> None:
        events = dict(self.poller.poll(20))
        if self.cmd in events:
            self._drain_commands()
        if self.control in events:
            self._drain_control()
        if self.kv_sub in events:
            self._drain_kv_events()
        if self.wake in events:
            while self.wake.poll(0):
                self.wake.recv()
        for sock in events:
            if sock not in (self.cmd, self.control, self.kv_sub, self.wake):
                for link, msg in self.peers.handle_readable(sock):
                    logger.debug("unexpected %s from peer %s", type(msg).__name__, link.address)
        self._route_outputs()
        self._advance_links()
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.heartbeat_s
            self._heartbeat()
        if self.draining and (not (self.clients or self.jobs) or now > self._drain_deadline):
            self.stopping = True
        if not self.engine.healthy() and self._outputs.empty():
            logger.error("%s: the vLLM engine died; exiting so the router stops placing work here", self.engine_id)
            self.stopping = True

    # ---- commands ----------------------------------------------------------------------------------
    def _drain_commands(self) -> None:
        while (command := self._recv_command()) is not None:
            self._handle(*command)

    def _to_worker(self, msg: Message) -> None:
        try:
            self.control.send_multipart([self.worker_ident, encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.warning("message %s to the vLLM worker dropped: %s", type(msg).__name__, e)

    def _on_hello(self, ident: bytes, msg: Hello) -> None:
        peer = msg.info
        if peer.role != "router":
            try:
                if peer.layout is None:
                    raise IncompatiblePeer({"layout": (self.layout, None)})
                check_compatible(self.layout, peer.layout)
                if peer.transport_kind and peer.transport_kind != self.info.transport_kind:
                    raise ValueError(f"KV transport {peer.transport_kind} != {self.info.transport_kind}")
            except (IncompatiblePeer, ValueError) as e:
                self.peers.num_refused += 1
                logger.error("refusing %s %s: %s", peer.role, peer.engine_id, e)
                self._reply(ident, Refused(f"{self.engine_id} (vLLM) refuses {peer.engine_id}: {e}"))
                return
            if peer.transport_metadata:
                self._to_worker(ConnectPeer(peer.transport_name, peer.transport_metadata))
        self._reply(ident, Welcome(self.info))

    def _on_generate(self, ident: bytes, msg: Generate) -> None:
        rid = msg.request_id
        params = self._generate_params(ident, msg)
        if params is None:
            return
        self.clients[rid] = ident
        if msg.remote is None:
            self.engine.submit(rid, msg.prompt_token_ids, params)
            self._trace(rid, "queued")
            return
        tid = msg.remote.transfer_id
        self.transfer_of[rid] = tid
        self.prefill_of[tid] = (rid, msg.remote.prefill_address)
        self.peers.get(msg.remote.prefill_address, msg.remote.prefill_engine_id)  # handshake starts now
        self.engine.submit(rid, msg.prompt_token_ids, params, {"duet_recv": tid})
        self._trace(rid, "decode_admitted")

    def _on_prefill(self, ident: bytes, msg: Prefill) -> None:
        if self.role == "decode" or self.draining:
            why = "server is draining" if self.draining else "a decode server does not prefill for others"
            self._reply(ident, PrefillDone(msg.request_id, msg.transfer_id, False, why))
            return
        try:
            params = SamplingParams.from_dict(msg.sampling)
            params = replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=[])
        except (ValueError, TypeError) as e:
            self._reply(ident, PrefillDone(msg.request_id, msg.transfer_id, False, str(e)))
            return
        tid = msg.transfer_id
        self.jobs[tid] = _PrefillJob(msg.request_id, tid, ident, time.monotonic(), len(msg.prompt_token_ids))
        self.engine.submit(f"xfer:{tid}", msg.prompt_token_ids, params, {"duet_send": tid})
        self._trace(msg.request_id, "prefill_admitted")

    def _on_kvdest(self, ident: bytes, msg: KVDest) -> None:
        self._to_worker(msg)

    def _on_abort(self, ident: bytes, msg: Abort) -> None:
        rid = msg.request_id
        tid = msg.transfer_id or self.transfer_of.get(rid)
        job = self.jobs.get(tid) if tid else None
        if job is not None:
            self.engine.abort(f"xfer:{tid}")
            self._to_worker(Abort(rid, tid))
        if rid in self.clients:
            self.engine.abort(rid)  # vLLM tells the connector, which cancels a receive in flight

    def _on_kvfailed(self, ident: bytes, msg: KVFailed) -> None:
        self.dest_waiting.pop(msg.transfer_id, None)
        self._to_worker(msg)  # the worker fails the receive; vLLM's kv_load_failure_policy decides

    def _on_statsrequest(self, ident: bytes, msg: StatsRequest) -> None:
        traces = {rid: st for rid, st in self.traces.items() if msg.request_id is None or rid == msg.request_id}
        self._reply(ident, Stats(msg.token, self.engine_id, self.stats(), traces))

    def _on_drain(self, ident: bytes, msg: Drain) -> None:
        self.draining = True
        self._drain_deadline = time.monotonic() + self.drain_timeout_s

    # ---- the worker's side of transfers ------------------------------------------------------------
    def _drain_control(self) -> None:
        while True:
            try:
                _, raw = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue
            try:
                msg = decode(raw)
            except ProtocolError as e:
                logger.warning("bad message from the vLLM worker: %s", e)
                continue
            if isinstance(msg, Stats):
                self.worker_stats = dict(msg.values)
            elif isinstance(msg, KVDest):
                self._send_dest(msg)
            elif isinstance(msg, PrefillDone):
                self._prefill_done(msg)

    def _send_dest(self, dest: KVDest) -> None:
        entry = self.prefill_of.get(dest.transfer_id)
        if entry is None:
            self._to_worker(KVFailed("", dest.transfer_id, "no prefill server known for this transfer"))
            return
        rid, address = entry
        dest = replace(dest, request_id=rid, decode_engine_id=self.engine_id)
        link = self.peers.send(address, dest)  # queued until the handshake completes
        if link.state != "READY":
            self.dest_waiting[dest.transfer_id] = (address, time.monotonic() + self.kv_timeout_s)
        self._trace(rid, "kv_dest_sent")

    def _advance_links(self) -> None:
        self.peers.expired()
        for tid, (address, _) in list(self.dest_waiting.items()):
            link = self.peers.get(address)
            if link.state == "READY":
                del self.dest_waiting[tid]
            elif link.state == "REFUSED":
                del self.dest_waiting[tid]
                self._to_worker(KVFailed("", tid, link.reason))

    def _prefill_done(self, msg: PrefillDone) -> None:
        job = self.jobs.pop(msg.transfer_id, None)
        if job is None or job.done:
            return
        job.done = True
        self._trace(job.request_id, "transfer_done" if msg.ok else "transfer_failed")
        num_tokens = max(0, job.num_prompt_tokens - msg.num_cached_tokens)
        self._reply(job.reply_to, replace(msg, request_id=job.request_id, compute_s=job.compute_s,
                                          num_tokens=num_tokens))

    # ---- outputs and events ------------------------------------------------------------------------
    def _route_outputs(self) -> None:
        while True:
            try:
                out = self._outputs.get_nowait()
            except queue.Empty:
                return
            if out.request_id.startswith("xfer:"):
                self._prefill_output(out)
                continue
            ident = self.clients.get(out.request_id)
            if ident is None:
                continue
            self._reply(ident, out)
            if out.token_ids:
                self._trace(out.request_id, "first_token_sent")
            if out.finished:
                self._trace(out.request_id, "finished")
                del self.clients[out.request_id]
                tid = self.transfer_of.pop(out.request_id, None)
                if tid is not None:
                    self.prefill_of.pop(tid, None)
                    self.dest_waiting.pop(tid, None)

    def _prefill_output(self, out: Tokens) -> None:
        tid = out.request_id.removeprefix("xfer:")
        job = self.jobs.get(tid)
        if job is None:
            return
        if out.token_ids:
            job.compute_s = time.monotonic() - job.admitted_at
            self._trace(job.request_id, "first_token_computed")
            lps = out.logprobs[0] if out.logprobs else None
            self._to_worker(FirstToken(tid, out.token_ids[0], lps))
        elif out.finished:  # aborted or failed before its first token: nothing will be sent
            why = out.error or f"prefill ended ({out.finish_reason}) before its first token"
            self._to_worker(FirstToken(tid, error=why))
            self._prefill_done(PrefillDone(job.request_id, tid, False, why))

    def _drain_kv_events(self) -> None:
        events = []
        while True:
            try:
                frames = self.kv_sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) != 3:
                continue
            try:
                events.extend(self.translator.translate(frames[2]))
            except Exception as e:  # noqa: BLE001 - a malformed batch must not stop the server
                logger.warning("cannot read a vLLM KV event batch: %s", e)
        if events:
            self.num_kv_events += len(events)
            self.pub.send(encode(KVEvents(self.engine_id, self.epoch, [event_to_dict(e) for e in events])))

    def stats(self) -> dict[str, float]:
        load, total = self.engine.load, self.engine.num_total_blocks
        out = {
            "free_blocks": round(total * (1.0 - load.kv_cache_usage)), "total_blocks": total,
            "waiting": load.waiting, "running": load.running, "waiting_for_kv": load.waiting_blocked,
            "prompt_tokens_computed": load.prompt_tokens_computed, "prompt_tokens_external": load.prompt_tokens_external,
            "generated_tokens": load.generated_tokens, "prefix_hit_tokens": load.prompt_tokens_local_hit,
            "preemptions": load.preemptions, "handshakes_refused": self.peers.num_refused,
            "kv_events_published": self.num_kv_events, "engine_healthy": 1.0 if self.engine.healthy() else 0.0,
        }
        out.update(self.worker_stats)
        return out

    def _heartbeat(self) -> None:
        load, total = self.engine.load, self.engine.num_total_blocks
        queued = sum(j.num_prompt_tokens for j in self.jobs.values() if not j.compute_s)
        self.pub.send(encode(LoadReport(
            self.engine_id, self.epoch, self.role, load.waiting, load.running, load.waiting_blocked,
            round(total * (1.0 - load.kv_cache_usage)), total, queued, 0, self.draining)))
        if self.router_link is not None:
            try:
                self.router_link.send(encode(Hello(self.info)), zmq.NOBLOCK)
            except zmq.Again:
                pass

    def close(self) -> None:
        self.stopping = True
        self.engine.shutdown()
        if self.router_link is not None:
            self.router_link.close(0)
        self.peers.close()
        for sock in (self.cmd, self.pub, self.control, self.kv_sub, self.wake):
            sock.close(0)
        if self._auth is not None:
            self._auth.stop()


def serve_vllm(role: str, args, config: EngineConfig, keys: ZmqKeys | None) -> None:
    """``python -m engine.<role> --executor vllm``: the server_main flags, a vLLM engine inside."""
    server = VllmServer(
        config, role, host=args.host, port=args.port, event_port=args.event_port, kv_transport=args.kv_transport,
        zone=args.zone, staging_bytes=args.staging_mib << 20, kv_timeout_s=args.kv_timeout_s,
        model_name=args.served_model_name, kv_failure_policy=args.kv_failure_policy, heartbeat_s=args.heartbeat_s,
        router_address=args.router, drain_timeout_s=args.drain_timeout_s, zmq_keys=keys, keys_dir=args.zmq_keys,
        debug_layer_delay_s=args.debug_layer_delay_s)
    print(f"DUET_READY {role} {server.address} {server.event_address}", flush=True)
    server.serve_forever()
