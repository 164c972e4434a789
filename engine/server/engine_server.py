"""One engine behind ZeroMQ: the loop of every prefill, decode and colocated server.

Sockets: a ROUTER for commands (router and peer servers connect DEALERs; replies go back by identity), a
PUB for events (load, KV events), DEALERs to peer servers (``peers.PeerLinks``). One thread does
everything: poll sockets (no wait while the engine has work), apply commands, advance KV transfers
(``transfer.kv_sender`` on the prefill side, ``transfer.kv_receiver`` on the decode side), run one engine
step, send tokens. Every wait has a deadline: handshakes, KV arrival, prefill destinations.

Under model parallelism the server is rank 0 of its engine; the worker ranks never talk to peers. KV crosses
the wire in the whole model's layout (every layer, every KV head): rank 0 merges the ranks' head slices on
the prefill side and splits them on the decode side (``engine.parallel.runner``), so servers with different
tensor / pipeline parallel sizes exchange KV directly. The handshake's ``layout`` describes that wire layout;
``tensor_parallel_size`` / ``pipeline_parallel_size`` in ``ServerInfo`` are information only.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import replace

import torch
import zmq

from engine.config import EngineConfig
from engine.loader import model_identity
from engine.kv_events import event_to_dict
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.security import ZmqKeys, secure_client, secure_server, start_authenticator
from engine.server.command_server import CommandServer, check_server_args
from engine.server.peers import PeerLinks
from transfer.compat import IncompatiblePeer, KVLayout, check_compatible
from transfer.factory import make_transport
from transfer.kv_receiver import KVReceiver
from transfer.kv_sender import KVSender
from transfer.messages import (Abort, Drain, Generate, Hello, KVDest, KVEvents, KVFailed, LoadReport, Prefill,
                               PrefillDone, Refused, ServerInfo, Stats, StatsRequest, Tokens, Welcome)
from transfer.staging import StagingPool
from transfer.wire import Message, encode

logger = logging.getLogger(__name__)


class EngineServer(CommandServer):
    def __init__(self, config: EngineConfig, role: str, host: str = "127.0.0.1", port: int = 0,
                 event_port: int | None = None, kv_transport: str = "auto", zone: str | None = None,
                 staging_bytes: int = 64 << 20, kv_timeout_s: float = 30.0, debug_layer_delay_s: float = 0.0,
                 model_name: str | None = None, kv_failure_policy: str = "recompute", heartbeat_s: float = 0.2,
                 router_address: str | None = None, drain_timeout_s: float = 30.0,
                 debug_step_delay_s: float = 0.0, zmq_keys: ZmqKeys | None = None):
        check_server_args(role, kv_failure_policy, heartbeat_s)
        self.kv_failure_policy = kv_failure_policy
        self.heartbeat_s = heartbeat_s
        self.drain_timeout_s = drain_timeout_s
        self.debug_step_delay_s = debug_step_delay_s
        self._drain_deadline = 0.0
        self.role = role
        self.engine = LLMEngine(config, load_tokenizer_=False)
        self.engine_id = f"{role}-{uuid.uuid4().hex[:8]}"
        self.epoch = uuid.uuid4().hex
        self.kv_timeout_s = kv_timeout_s
        self.ctx = zmq.Context.instance()
        self.keys = zmq_keys
        self._auth = start_authenticator(self.ctx, zmq_keys)  # CURVE: only key holders get in (None: plaintext)
        self.cmd = self.ctx.socket(zmq.ROUTER)
        secure_server(self.cmd, zmq_keys)
        self.cmd.setsockopt(zmq.LINGER, 0)
        self.cmd.setsockopt(zmq.ROUTER_MANDATORY, 0)
        port = self._bind(self.cmd, host, port)
        self.pub = self.ctx.socket(zmq.PUB)
        secure_server(self.pub, zmq_keys)
        self.pub.setsockopt(zmq.LINGER, 0)
        event_port = self._bind(self.pub, host, 0 if event_port is None else event_port)
        self.address, self.event_address = f"tcp://{host}:{port}", f"tcp://{host}:{event_port}"

        runner = self.engine.runner
        mc = self.engine.model_config
        self.model_name = model_name or config.model
        wire = torch.empty(runner.kv_slab_shape(0), dtype=runner.kv_cache.dtype, device="meta")
        self.layout = KVLayout.from_cache(model_identity(config.model, mc.architecture), wire)
        self.transport = make_transport(kv_transport, self.engine_id, host=host, keys=zmq_keys)
        self.staging = StagingPool(staging_bytes, runner.device)
        staging_handle = self.transport.register(self.staging.buffer)
        region = self.transport.describe(staging_handle)
        self.sender = KVSender(self.transport, self.staging, staging_handle, runner, debug_layer_delay_s)
        self.receiver = KVReceiver(self.transport, self.staging, region, runner)
        self.info = ServerInfo(
            engine_id=self.engine_id, epoch=self.epoch, role=role, model_name=self.model_name,
            address=self.address, event_address=self.event_address, zone=zone, layout=self.layout,
            compat_hash=self.layout.compat_hash(), transport_kind=self.transport.backend,
            transport_name=self.transport.name, transport_metadata=self.transport.metadata(),
            staging_region=region, max_model_len=self.engine.max_model_len, vocab_size=mc.vocab_size,
            num_total_blocks=self.engine.num_total_blocks, tensor_parallel_size=config.tensor_parallel_size,
            pipeline_parallel_size=config.pipeline_parallel_size)
        self.poller = zmq.Poller()
        self.poller.register(self.cmd, zmq.POLLIN)
        self.peers = PeerLinks(self.ctx, self.poller, self.info, keys=zmq_keys)
        self.clients: dict[str, bytes] = {}  # request id -> router identity (for Tokens)
        self._deferred: list[tuple[bytes, Message]] = []  # commands that arrived mid-step
        self.traces: dict[str, dict[str, float]] = {}  # request id -> stage -> unix time (bounded)
        self.sender.receive_destinations = self._receive_destinations
        self.awaiting_link: dict[str, tuple[str, str]] = {}  # transfer id -> (request id, prefill address)
        self.transfer_of: dict[str, str] = {}  # request id -> transfer id (decode side)
        self.num_kv_fallbacks = 0
        self.num_kv_failed_requests = 0
        self.router_link = None
        if router_address:  # run-time registration: our Hello doubles as a heartbeat to the router
            self.router_link = self.ctx.socket(zmq.DEALER)
            self.router_link.setsockopt(zmq.LINGER, 0)
            secure_client(self.router_link, zmq_keys)
            self.router_link.connect(router_address)
        self.stopping = False
        self.draining = False
        self._pub_lock = threading.Lock()
        self._load: LoadReport = self._load_report()
        # Heartbeats come from their own thread: a long prefill step must not look like a dead server.
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="duet-heartbeat", daemon=True)
        self._heartbeat.start()
        logger.info("%s serving %s on %s (events %s, KV transport %s, tp=%d pp=%d)", self.engine_id,
                    self.model_name, self.address, self.event_address, self.transport.backend,
                    config.tensor_parallel_size, config.pipeline_parallel_size)

    # ---- main loop ---------------------------------------------------------------------------------
    def _drained(self) -> bool:
        busy = (self.engine.has_unfinished_requests() or self.sender.transfers or self.receiver.transfers
                or self.awaiting_link)
        if busy and time.monotonic() < self._drain_deadline:
            return False
        if busy:
            logger.warning("drain deadline passed with work left: aborting it")
            for rid in list(self.clients):
                self.engine.abort_request(rid)
            self._route_outputs(self.engine.step())
        return True

    def run_once(self) -> None:
        busy = self.engine.has_runnable_work()
        active = bool(self.sender.transfers or self.receiver.transfers or self.awaiting_link)
        timeout_ms = 0 if (busy or active) else 20
        events = self.poller.poll(timeout_ms)
        if active and not busy and not events:
            time.sleep(100e-6)  # transfers progress only when polled: stay close without spinning a core
        if self._deferred and not any(sock is self.cmd for sock, _ in events):
            self._drain_commands()
        for sock, _ in events:
            if sock is self.cmd:
                self._drain_commands()
            else:
                for link, msg in self.peers.handle_readable(sock):
                    logger.debug("unexpected %s from peer %s", type(msg).__name__, link.address)
        self._advance_links()
        self._advance_receiver()
        if self.engine.has_runnable_work():
            outputs = self.engine.step(on_schedule=self.sender.on_schedule)
            self.sender.after_step(outputs)
            self._route_outputs(outputs)
            if self.debug_step_delay_s:
                time.sleep(self.debug_step_delay_s)  # test hook: a slow model
        for reply_to, done in self.sender.poll():
            if reply_to is not None:
                self._reply(reply_to, done)
        self._publish()
        if self.draining and self._drained():
            self.stopping = True

    # ---- commands ----------------------------------------------------------------------------------
    def _drain_commands(self) -> None:
        deferred, self._deferred = self._deferred, []
        for ident, msg in deferred:
            self._handle(ident, msg)
        while (command := self._recv_command()) is not None:
            self._handle(*command)

    def _receive_destinations(self) -> None:
        """Mid-step (from the KV sender's layer hook): apply ``KVDest``s so streaming can start, and answer
        handshakes (a first request's decode side is waiting for one). Every other command waits for the loop,
        since it could change engine state under the running step."""
        while (command := self._recv_command()) is not None:
            ident, msg = command
            if isinstance(msg, (KVDest, Hello)):
                self._handle(ident, msg)
            else:
                self._deferred.append((ident, msg))

    def _on_hello(self, ident: bytes, msg: Hello) -> None:
        peer = msg.info
        if peer.role != "router":
            try:
                if peer.layout is None:
                    raise IncompatiblePeer({"layout": (self.layout, None)})
                check_compatible(self.layout, peer.layout)
                if peer.transport_kind and peer.transport_kind != self.transport.backend:
                    raise ValueError(f"KV transport {peer.transport_kind} != {self.transport.backend}")
                if peer.transport_metadata:
                    self.transport.connect(peer.transport_name, peer.transport_metadata)
                if (peer.tensor_parallel_size, peer.pipeline_parallel_size) != (self.info.tensor_parallel_size,
                                                                                self.info.pipeline_parallel_size):
                    logger.info("%s: peer %s runs tp=%d pp=%d, this server tp=%d pp=%d: KV heads are merged / "
                                "split at each side's rank 0", self.engine_id, peer.engine_id,
                                peer.tensor_parallel_size, peer.pipeline_parallel_size,
                                self.info.tensor_parallel_size, self.info.pipeline_parallel_size)
            except (IncompatiblePeer, ValueError, RuntimeError) as e:
                self.peers.num_refused += 1
                logger.error("refusing %s %s: %s", peer.role, peer.engine_id, e)
                self._reply(ident, Refused(f"{self.engine_id} refuses {peer.engine_id}: {e}"))
                return
        self._reply(ident, Welcome(self.info))

    def _on_generate(self, ident: bytes, msg: Generate) -> None:
        rid = msg.request_id
        params = self._generate_params(ident, msg)
        if params is None:
            return
        try:
            if msg.remote is None:
                self.engine.add_request(rid, msg.prompt_token_ids, params)
            else:
                self._admit_remote(msg, params)
        except ValueError as e:
            self._reply(ident, Tokens(rid, [], finished=True, finish_reason="error", error=str(e), status=400))
            return
        self.clients[rid] = ident
        self._trace(rid, "decode_admitted" if msg.remote is not None else "queued")

    def _admit_remote(self, msg: Generate, params: SamplingParams) -> None:
        req = self.engine.add_remote_request(msg.request_id, msg.prompt_token_ids, params)
        remote = msg.remote
        if req is None:  # no KV room now: prefill here when room frees up, and release the prefill side
            self.num_kv_fallbacks += 1
            self.engine.add_request(msg.request_id, msg.prompt_token_ids, params)
            self.peers.send(remote.prefill_address, Abort(msg.request_id, remote.transfer_id))
            return
        self.transfer_of[msg.request_id] = remote.transfer_id
        self.awaiting_link[remote.transfer_id] = (msg.request_id, remote.prefill_address)
        self.peers.get(remote.prefill_address, remote.prefill_engine_id)
        self._advance_links()

    def _advance_links(self) -> None:
        self.peers.expired()
        for tid, (rid, address) in list(self.awaiting_link.items()):
            link = self.peers.get(address)
            req = self.engine.get_request(rid)
            if req is None:
                del self.awaiting_link[tid]
                continue
            if link.state == "REFUSED":
                del self.awaiting_link[tid]
                self._fallback(rid, link.reason)
            elif link.state == "READY":
                del self.awaiting_link[tid]
                dest = self.receiver.start(tid, req, link.info.engine_id, self.engine_id, self.kv_timeout_s)
                if dest is None:
                    self._fallback(rid, "decode staging full")
                    self.peers.send(address, Abort(rid, tid))
                else:
                    self.peers.send(address, dest)

    def _fallback(self, request_id: str, reason: str) -> None:
        """The prompt's KV will not come: prefill it here (policy ``recompute``) or fail the request."""
        if self.kv_failure_policy == "fail":
            logger.warning("request %s: KV transfer failed (%s); failing it", request_id, reason)
            self.num_kv_failed_requests += 1
            ident = self.clients.pop(request_id, None)
            self.engine.abort_request(request_id)  # its abort output finds no client: dropped
            if ident is not None:
                self._reply(ident, Tokens(request_id, [], finished=True, finish_reason="error", status=503,
                                          error=f"KV transfer failed: {reason}"))
            return
        logger.warning("request %s: prefilling locally (%s)", request_id, reason)
        self.num_kv_fallbacks += 1
        self.engine.fail_remote_request(request_id)

    def _on_kvfailed(self, ident: bytes, msg: KVFailed) -> None:
        pending = self.awaiting_link.pop(msg.transfer_id, None) is not None
        if msg.transfer_id in self.receiver.transfers:
            self.receiver.cancel(msg.transfer_id)
            pending = True
        if pending:
            self._fallback(msg.request_id, msg.reason or "prefill server failed")

    def _advance_receiver(self) -> None:
        completed, failed = self.receiver.poll()
        for req, first in completed:
            out = self.engine.complete_remote_request(req.request_id, first)
            if out is not None:
                self._route_outputs([out])
        for req, reason in failed:
            self._fallback(req.request_id, reason)

    def _on_prefill(self, ident: bytes, msg: Prefill) -> None:
        if self.role == "decode" or self.draining:
            why = "server is draining" if self.draining else "a decode server does not prefill for others"
            self._reply(ident, PrefillDone(msg.request_id, msg.transfer_id, False, why))
            return
        self._maybe_admit_prefill(self.sender.on_prefill(msg, ident))

    def _on_kvdest(self, ident: bytes, msg: KVDest) -> None:
        self.sender.on_dest(msg, self.kv_timeout_s)

    def _maybe_admit_prefill(self, t) -> None:
        if not self.sender.ready(t):
            return
        p = t.prefill
        engine_rid = f"xfer:{t.transfer_id}"
        try:
            params = SamplingParams.from_dict(p.sampling)
            params = replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=[])
            self.engine.add_request(engine_rid, p.prompt_token_ids, params)
        except ValueError as e:
            self.sender.abort(t.transfer_id, str(e))
            return
        err = self.sender.admitted(t, engine_rid)
        if err is not None:
            self.engine.abort_request(engine_rid)
            self.sender.abort(t.transfer_id, err)

    def _on_abort(self, ident: bytes, msg: Abort) -> None:
        rid = msg.request_id
        tid = msg.transfer_id or self.transfer_of.get(rid)
        if tid is not None:
            self.receiver.cancel(tid)
            self.awaiting_link.pop(tid, None)
            t = self.sender.abort(tid)
            if t is not None and t.engine_request_id:
                self.engine.abort_request(t.engine_request_id)
        self.engine.abort_request(rid)

    def _on_statsrequest(self, ident: bytes, msg: StatsRequest) -> None:
        traces = {}
        for src in (self.traces, self.sender.traces, self.receiver.traces):
            for rid, stages in src.items():
                if msg.request_id is None or rid == msg.request_id:
                    traces.setdefault(rid, {}).update(stages)
        self._reply(ident, Stats(msg.token, self.engine_id, self.stats(), traces))

    def _on_drain(self, ident: bytes, msg: Drain) -> None:
        self.draining = True

    def stats(self) -> dict[str, float]:
        e, s, bm = self.engine, self.engine.scheduler, self.engine.block_manager
        return {
            "free_blocks": e.num_free_blocks, "total_blocks": e.num_total_blocks,
            "waiting": len(s.waiting), "running": len(s.running), "waiting_for_kv": len(s.waiting_for_kv),
            "prompt_tokens_computed": e.num_prompt_tokens_computed, "generated_tokens": e.num_generated_tokens,
            "prefix_hit_tokens": bm.stats.hit_tokens, "preemptions": s.num_preemptions,
            "kv_bytes_sent": self.sender.num_bytes_sent, "kv_descriptors_sent": self.sender.num_descriptors,
            "kv_transfers_failed_send": self.sender.num_failed, "kv_bytes_received": self.receiver.num_bytes_received,
            "kv_transfers_received": self.receiver.num_completed, "kv_transfers_failed": self.receiver.num_failed,
            "kv_transfer_seconds_sum": self.receiver.transfer_seconds_sum,
            "kv_transfer_seconds_max": self.receiver.transfer_seconds_max,
            "kv_fallbacks": self.num_kv_fallbacks, "kv_failed_requests": self.num_kv_failed_requests,
            "handshakes_refused": self.peers.num_refused,
        }

    # ---- outputs and events ------------------------------------------------------------------------
    def _route_outputs(self, outputs) -> None:
        for out in outputs:
            ident = self.clients.get(out.request_id)
            if ident is None:
                continue  # prefill-side requests report through PrefillDone
            n = len(out.new_token_ids)
            lps = out.logprobs[-n:] if (out.logprobs and n) else None
            self._reply(ident, Tokens(out.request_id, out.new_token_ids, lps, out.finished, out.finish_reason,
                                      out.stop_reason if isinstance(out.stop_reason, int) else None,
                                      out.num_cached_tokens))
            if out.new_token_ids:
                self._trace(out.request_id, "first_token_sent")
            if out.finished:
                self._trace(out.request_id, "finished")
            if out.finished:
                del self.clients[out.request_id]
                tid = self.transfer_of.pop(out.request_id, None)
                if tid is not None:
                    self.receiver.cancel(tid)

    def _publish(self) -> None:
        events = self.engine.block_manager.drain_events()
        if events:
            msg = encode(KVEvents(self.engine_id, self.epoch, [event_to_dict(e) for e in events]))
            with self._pub_lock:
                self.pub.send(msg)
        self._load = self._load_report()

    def _load_report(self) -> LoadReport:
        s = self.engine.scheduler
        return LoadReport(
            self.engine_id, self.epoch, self.role, len(s.waiting), len(s.running), len(s.waiting_for_kv),
            self.engine.num_free_blocks, self.engine.num_total_blocks,
            sum(r.num_tokens - r.num_computed_tokens for r in s.waiting),
            sum(r.num_tokens for r in s.running), self.draining)

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
            time.sleep(self.heartbeat_s)

    def close(self) -> None:
        with self._pub_lock:
            self.stopping = True
        self._heartbeat.join(timeout=5)
        if self.router_link is not None:
            self.router_link.close(0)
        self.peers.close()
        self.transport.close()
        self.cmd.close(0)
        self.pub.close(0)
        if self._auth is not None:
            self._auth.stop()
        self.engine.close()  # model-parallel worker processes exit with the server
