"""``VllmExecutor``: a vLLM V1 engine behind a Duet server (``--executor vllm``).

Processes and threads: the server's loop thread calls this executor; ``VllmEngine`` runs vLLM's ``AsyncLLM`` on
a thread of its own; vLLM's scheduler and worker run in processes of their own, with Duet's KV connector
(``transfer.vllm_connector``) inside, whose worker side runs the same ``transfer.handoff.Handoff`` as a native
server (``transfer.vllm_kv_mover``). The executor reaches that worker over a local control socket
(``transfer.vllm_control``)::

    Generate(remote) at D   PeerReady -> the worker; submit(kv_transfer_params={"duet_recv": tid}); once vLLM
                            allocated the blocks the worker's receive sends KVDest to P over the KV transport
    Prefill at P            submit("xfer:<tid>", max_tokens=1, {"duet_send": tid}); the worker packs each
                            layer as vLLM saves it and WRITEs it once D's KVDest is in
    P's first token         vLLM's output here -> FirstToken -> the worker, which posts the last layer with it
    P's send ends           worker -> SendEnded -> PrefillDone (the server answers the router)
    D's receive fails       worker -> RecvFailed -> KVLost (vLLM's kv_load_failure_policy also acts on it)

KV events: vLLM's publisher connects to a SUB socket bound here; ``KVEventTranslator`` turns vLLM's block
hashes into Duet's chained hashes for the router's prefix index.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass

import zmq

from duet.engine import envs
from duet.engine.config import EngineConfig
from duet.engine.kv_events import KVEvent
from duet.engine.protocol import PrefillDone, ServerStats, TokenDelta, Tokens
from duet.engine.sampling_params import SamplingParams
from duet.engine.server.executor import Executor, ExecutorEvent, ExecutorInfo, KVLost, Load, handoff_stats_into
from duet.engine.server.server_config import ServerConfig
from duet.engine.server.vllm_engine import VllmEngine, engine_args, model_id
from duet.engine.server.vllm_kv_events import KVEventTranslator
from duet.transfer.curve import secure_server
from duet.transfer.handoff import HandoffStats
from duet.transfer.vllm_control import (AbortSend, ConnectPeer, FailRecv, FirstToken, PeerReady, RecvFailed,
                                        WorkerReady, WorkerStats)
from duet.transfer.vllm_control import SendEnded as WorkerSendEnded
from duet.transfer.wire import Message, decode, encode
from duet.transfer.zmq_messages import recv_messages

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.02


@dataclass
class _PrefillJob:
    transfer_id: str
    admitted_at: float
    compute_s: float = 0.0
    scored: TokenDelta | None = None
    """The output that carried the prompt logprobs (when the request asked for them)."""


class VllmExecutor(Executor):
    def __init__(self, engine_config: EngineConfig, server: ServerConfig, start_timeout_s: float = 900.0):
        if engine_config.host_kv_cache_bytes:
            raise ValueError("--host-kv-gib: Duet's host KV tier is native only (see README, KV tiers)")
        self.ctx = zmq.Context.instance()
        keys = server.zmq_keys
        self.control = self.ctx.socket(zmq.ROUTER)  # vLLM's worker connects here
        secure_server(self.control, keys)
        self.control.setsockopt(zmq.LINGER, 0)
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
        self._kv_events: list[KVEvent] = []
        self.jobs: dict[str, _PrefillJob] = {}  # engine request id of a prefill for a peer -> its job
        self.worker_stats = HandoffStats()
        self.worker_open_transfers = 0
        faults = server.faults
        where = server.advertised
        extra = {"duet_control": control_address, "duet_transport": server.kv_transport, "duet_host": where.bind_host,
                 "duet_advertise_host": where.advertise_host,
                 "duet_staging_bytes": server.staging_bytes, "duet_kv_timeout_s": server.kv_timeout_s,
                 "duet_model_id": model_id(engine_config.model), "duet_debug_layer_delay_s": server.debug_layer_delay_s,
                 "duet_fault_fail_write_p": faults.fail_write_p, "duet_fault_drop_notif_p": faults.drop_notif_p,
                 "duet_disable_extension": envs.disable_extension()}
        if server.zmq_keys_dir:
            extra["duet_keys_dir"] = server.zmq_keys_dir
        self.engine = VllmEngine(engine_args(engine_config, kv_connector_extra=extra,
                                             kv_failure_policy=server.kv_failure_policy,
                                             kv_events_endpoint=kv_events_endpoint), self._on_engine_output,
                                 start_timeout_s)
        self.worker_ident, ready = self._await_worker(start_timeout_s)
        self.info = ExecutorInfo(
            layout=ready.layout, transport_kind=ready.transport_kind, transport_name=ready.transport_name,
            transport_metadata=ready.transport_metadata, staging_region=ready.staging_region,
            max_model_len=self.engine.max_model_len, vocab_size=self.engine.vocab_size,
            num_total_blocks=self.engine.num_total_blocks)

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
        """Engine thread: queue the output and wake the server's loop (a PUSH socket per calling thread)."""
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

    def _to_worker(self, msg: Message) -> None:
        try:
            self.control.send_multipart([self.worker_ident, encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.warning("message %s to the vLLM worker dropped: %s", type(msg).__name__, e)

    # ---- requests ---------------------------------------------------------------------------------------
    def sockets(self) -> list[zmq.Socket]:
        return [self.control, self.kv_sub, self.wake]

    def wait_s(self) -> float:
        return IDLE_WAIT_S  # every input wakes the poller: outputs through ``wake``, the worker through ``control``

    def connect_peer(self, transport_name: str, metadata: bytes) -> None:
        self._to_worker(ConnectPeer(transport_name, metadata))

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.submit(request_id, prompt_token_ids, params)

    def add_remote(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, transfer_id: str,
                   peer_transport_name: str, timeout_s: float) -> bool:
        self._to_worker(PeerReady(transfer_id, peer_transport_name))
        self.engine.submit(request_id, prompt_token_ids, params, {"duet_recv": transfer_id})
        return True  # vLLM admits it when it has room; its receive's deadline covers the wait

    def recompute(self, request_id: str, transfer_id: str) -> None:
        # vLLM's kv_load_failure_policy (``recompute``) prefills it once the worker reports the receive failed;
        # make sure the worker does (a router-reported failure the worker has not seen yet).
        self._to_worker(FailRecv(transfer_id, "prefill side failed"))

    def add_prefill(self, request_id: str, transfer_id: str, router_request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, timeout_s: float) -> None:
        self.jobs[request_id] = _PrefillJob(transfer_id, time.monotonic())
        self.engine.submit(request_id, prompt_token_ids, params, {"duet_send": transfer_id})

    def abort(self, request_id: str, transfer_id: str | None) -> None:
        job = self.jobs.get(request_id)
        if job is not None:
            self._to_worker(AbortSend(job.transfer_id))
        self.engine.abort(request_id)  # vLLM tells the connector, which cancels a receive in flight

    # ---- the loop ---------------------------------------------------------------------------------------
    def run_once(self) -> list[ExecutorEvent]:
        events: list[ExecutorEvent] = []
        while self.wake.poll(0):
            self.wake.recv()
        self._drain_control(events)
        self._drain_kv_events()
        while True:
            try:
                out = self._outputs.get_nowait()
            except queue.Empty:
                break
            job = self.jobs.get(out.request_id)
            if job is None:
                events.append(out)
            else:
                self._prefill_output(job, out)
        return events

    def _prefill_output(self, job: _PrefillJob, out: Tokens) -> None:
        delta = out.delta
        if delta.prompt_logprobs is not None:
            job.scored = delta
        if delta.token_ids and not job.compute_s:
            job.compute_s = time.monotonic() - job.admitted_at
            logprobs = delta.logprobs[0] if delta.logprobs else None
            self._to_worker(FirstToken(job.transfer_id, delta.token_ids[0], logprobs))
        elif delta.finished and not delta.token_ids and not job.compute_s:
            why = delta.error or f"prefill ended ({delta.finish_reason}) before its first token"
            self._to_worker(FirstToken(job.transfer_id, error=why))

    def _drain_control(self, events: list[ExecutorEvent]) -> None:
        for _, msg in recv_messages(self.control, routed=True):
            if isinstance(msg, WorkerStats):
                self.worker_stats, self.worker_open_transfers = msg.stats, msg.open_transfers
            elif isinstance(msg, WorkerSendEnded):
                request_id = next((rid for rid, j in self.jobs.items() if j.transfer_id == msg.transfer_id), None)
                job = self.jobs.pop(request_id, None) if request_id is not None else None
                if job is not None:
                    scored = job.scored
                    events.append(PrefillDone(request_id, msg.transfer_id, msg.ok, msg.error, job.compute_s,
                                              msg.num_cached_tokens, msg.num_bytes,
                                              prompt_logprobs=scored and scored.prompt_logprobs,
                                              prompt_token_ranks=scored and scored.prompt_token_ranks))
            elif isinstance(msg, RecvFailed):
                events.append(KVLost(msg.request_id, msg.transfer_id, msg.reason))

    def _drain_kv_events(self) -> None:
        while True:
            try:
                frames = self.kv_sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3:
                continue
            try:
                self._kv_events.extend(self.translator.translate(frames[2]))
            except Exception as e:  # noqa: BLE001 - a malformed batch must not stop the server
                logger.warning("cannot read a vLLM KV event batch: %s", e)

    # ---- observability ----------------------------------------------------------------------------------
    def _free_blocks(self) -> int:
        return round(self.engine.num_total_blocks * (1.0 - self.engine.load.kv_cache_usage))

    def load(self) -> Load:
        load = self.engine.load
        return Load(load.waiting, load.running, load.waiting_blocked, self._free_blocks(),
                    self.engine.num_total_blocks, 0, 0)

    def fill_stats(self, stats: ServerStats) -> None:
        load = self.engine.load
        stats.free_blocks, stats.total_blocks = self._free_blocks(), self.engine.num_total_blocks
        stats.waiting, stats.running, stats.waiting_for_kv = load.waiting, load.running, load.waiting_blocked
        stats.prompt_tokens_computed, stats.prompt_tokens_external = (load.prompt_tokens_computed,
                                                                      load.prompt_tokens_external)
        stats.generated_tokens, stats.prefix_hit_tokens = load.generated_tokens, load.prompt_tokens_local_hit
        stats.preemptions = load.preemptions
        stats.open_transfers = self.worker_open_transfers
        handoff_stats_into(stats, self.worker_stats)

    def kv_events(self) -> list[KVEvent]:
        events, self._kv_events = self._kv_events, []
        return events

    def idle(self) -> bool:
        return not self.jobs and not self.worker_open_transfers

    def healthy(self) -> bool:
        return self.engine.healthy() or not self._outputs.empty()

    def close(self) -> None:
        self.engine.shutdown()
        for sock in (self.control, self.kv_sub, self.wake):
            sock.close(0)
