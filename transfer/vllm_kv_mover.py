"""Worker side of Duet's vLLM connector: a thread that runs the KV hand-off (``transfer.handoff.Handoff``) over
vLLM's paged cache (``transfer.vllm_kv_port.VllmKVPort``).

vLLM calls the connector's worker hooks from its model runner thread; the transport, the staging slabs and the
control socket to the ``--executor vllm`` server belong to the mover's own thread (a ``KVTransport`` is not
thread-safe, and transfers must progress while the engine idles). Who does what:

- model runner thread: ``begin_sends`` (the step completes these prompts: reserve their slabs, start packing),
  ``pack_layer`` (gather layer l into each slab, then tell the mover), ``end_step``, ``add_recvs`` (vLLM
  allocated blocks for these requests' KV) and ``take_results`` (receives that ended, for vLLM's scheduler).
  The first two touch the ``Handoff`` under ``_lock``; the gather itself runs without it (the slab is the
  step's own until ``end_step``).
- mover thread: everything else, under ``_lock``: control messages from the server (peer connections, peers
  ready, first tokens, aborts), ``Handoff.advance`` (notifications, WRITEs, deadlines), and the reports back
  (``SendEnded``, ``RecvFailed``, ``WorkerStats`` to the server; finished / failed receives to vLLM).

Every receive is reported to vLLM exactly once, an aborted one included: vLLM holds the blocks of a request
that waits for KV until then. vLLM recomputes the last prompt token itself, so the decode side does not use
the prefill's first token; the prefill side still sends it (a native decode peer uses it).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch
import zmq

from duet.transfer.compat import KVLayout
from duet.transfer.curve import load_keys, secure_client
from duet.transfer.factory import make_transport
from duet.transfer.handoff import Handoff, HandoffFaults
from duet.transfer.recv_transfer import RecvState
from duet.transfer.send_transfer import SendState
from duet.transfer.staging import StagingPool
from duet.transfer.transport import TransferError
from duet.transfer.vllm_control import (AbortSend, ConnectPeer, FailRecv, FirstToken, PeerReady, RecvFailed, SendEnded,
                                   WorkerReady, WorkerStats)
from duet.transfer.vllm_kv_port import VllmKVPort
from duet.transfer.wire import encode
from duet.transfer.zmq_messages import recv_messages

logger = logging.getLogger(__name__)


@dataclass
class SendSpec:
    """Prefill side: a request whose prompt completes in this step; send its KV under ``transfer_id``."""

    req_id: str
    transfer_id: str
    block_ids: list[int]
    """The prompt's blocks, in order (ceil(num_prompt_tokens / block_size) of them)."""
    num_cached_tokens: int = 0


@dataclass
class RecvSpec:
    """Decode side: KV of ``transfer_id`` goes into ``block_ids`` (the prompt's blocks after the cached ones)."""

    req_id: str
    transfer_id: str
    block_ids: list[int]
    num_skip_blocks: int


@dataclass
class MoverConfig:
    control_address: str
    transport_kind: str = "auto"
    host: str = "127.0.0.1"
    advertise_host: str | None = None
    """What the ZeroMQ transport's metadata tells peers to dial (None: ``host``)."""
    staging_bytes: int = 64 << 20
    timeout_s: float = 30.0
    keys_dir: str | None = None
    faults: HandoffFaults | None = None
    debug_layer_delay_s: float = 0.0
    """Test hook: the runner thread sleeps this long after packing each layer (a slow forward pass)."""
    start_timeout_s: float = 120.0


class KVMover:
    """Owns the hand-off; see the module docstring for who calls what from which thread."""

    def __init__(self, port: VllmKVPort, layout: KVLayout, config: MoverConfig):
        self.port = port
        self.layout = layout
        self.config = config
        self._runner_cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._finished_recv: set[str] = set()
        self._failed_recv: set[str] = set()
        self._stats_sent: dict[str, float] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.handoff: Handoff | None = None
        self._thread = threading.Thread(target=self._run, name="duet-kv-mover", daemon=True)
        self._thread.start()
        if not self._ready.wait(config.start_timeout_s):
            raise TimeoutError(f"Duet KV mover did not start within {config.start_timeout_s}s")
        if self._error is not None:
            raise RuntimeError(f"Duet KV mover failed to start: {self._error}") from self._error

    # ---- model runner thread ------------------------------------------------------------------------
    def begin_sends(self, specs: list[SendSpec]) -> None:
        """This step completes these prompts: reserve their slabs and start packing (``pack_layer`` fills them)."""
        with self._lock:
            items = []
            for spec in specs:
                self.handoff.expect_send(spec.transfer_id, spec.req_id, local_id=spec.req_id)
                if self.handoff.reserve_send(spec.transfer_id, len(spec.block_ids)) is None:
                    ids = torch.tensor(spec.block_ids, dtype=torch.int64, device=self.port.kv_device)
                    items.append((spec.transfer_id, ids, spec.num_cached_tokens))
            self.handoff.begin_packing(items)

    def pack_layer(self, layer: int) -> None:
        """Layer ``layer``'s KV is in vLLM's cache: gather it into each sending slab (Duet's gather op)."""
        transfer_ids = self.handoff.gather_layer(layer)
        if transfer_ids:
            self._runner_cmds.put(("packed", transfer_ids, layer + 1))
            if self.config.debug_layer_delay_s:
                time.sleep(self.config.debug_layer_delay_s)

    def end_step(self) -> None:
        with self._lock:
            self.handoff.end_packing()

    def add_recvs(self, specs: list[RecvSpec], cancel_req_ids: list[str]) -> None:
        for spec in specs:
            self._runner_cmds.put(("recv", spec))
        for req_id in cancel_req_ids:
            self._runner_cmds.put(("cancel", req_id))

    def take_results(self) -> tuple[set[str], set[str]]:
        """(finished_recving, failed_recving) since the last call; failed ids are in both."""
        with self._lock:
            done, failed = self._finished_recv, self._failed_recv
            self._finished_recv, self._failed_recv = set(), set()
        return done, failed

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # ---- mover thread -------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.config
        keys = load_keys(cfg.keys_dir) if cfg.keys_dir else None
        transport = make_transport(cfg.transport_kind, "vllm", host=cfg.host, advertise_host=cfg.advertise_host,
                                   keys=keys)
        staging = StagingPool(cfg.staging_bytes, self.port.kv_device)
        self.handoff = Handoff(transport, staging, self.port, timeout_s=cfg.timeout_s, faults=cfg.faults)
        self.control = zmq.Context.instance().socket(zmq.DEALER)
        self.control.setsockopt(zmq.LINGER, 0)
        secure_client(self.control, keys)
        self.control.connect(cfg.control_address)
        self._send_control(WorkerReady(transport.backend, transport.name, transport.metadata(), self.handoff.region,
                                       self.layout, self.port.num_cache_blocks))

    def _run(self) -> None:
        try:
            self._setup()
        except Exception as e:  # noqa: BLE001 - reported to the constructor, which raises
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                with self._lock:
                    self._drain_runner_cmds()
                    self._drain_control()
                    self._report(self.handoff.advance())
                    busy = self.handoff.busy
                # Transfers progress only when polled: stay close while any is open, nap otherwise.
                self.control.poll(0 if busy else 5)
                if busy:
                    time.sleep(200e-6)
        except Exception:
            logger.exception("Duet KV mover thread died")
        finally:
            with self._lock:
                self.handoff.close()
            self.control.close(0)

    def _send_control(self, msg) -> None:
        try:
            self.control.send(encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.warning("control message %s dropped: %s", type(msg).__name__, e)

    def _drain_runner_cmds(self) -> None:
        while True:
            try:
                cmd = self._runner_cmds.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "packed":
                for transfer_id in cmd[1]:
                    self.handoff.packed(transfer_id, cmd[2])
            elif cmd[0] == "recv":
                spec: RecvSpec = cmd[1]
                ids = torch.tensor(spec.block_ids, dtype=torch.int64, device=self.port.kv_device)
                self.handoff.expect_recv(spec.transfer_id)
                self.handoff.recv_blocks(spec.transfer_id, spec.req_id, ids, spec.num_skip_blocks)
            elif cmd[0] == "cancel":
                t = next((t for t in self.handoff.recvs.values() if t.request_id == cmd[1]), None)
                if t is not None:  # else already reported (completed or failed): report nothing twice
                    t.cancel()

    def _drain_control(self) -> None:
        for _, msg in recv_messages(self.control):
            if isinstance(msg, ConnectPeer):
                try:
                    self.handoff.transport.connect(msg.transport_name, msg.transport_metadata)
                except (TransferError, RuntimeError, ValueError) as e:
                    logger.error("cannot connect to KV peer %s: %s", msg.transport_name, e)
            elif isinstance(msg, PeerReady):
                self.handoff.peer_ready(msg.transfer_id, msg.transport_name)
            elif isinstance(msg, FirstToken):
                if msg.token is None:
                    self.handoff.abort_send(msg.transfer_id, msg.error or "no first token")
                else:
                    self.handoff.first_token(msg.transfer_id, msg.token, msg.logprobs, None)
            elif isinstance(msg, AbortSend):
                self.handoff.abort_send(msg.transfer_id, msg.reason)
            elif isinstance(msg, FailRecv):
                self.handoff.fail_recv(msg.transfer_id, msg.reason)

    def _report(self, ended) -> None:
        for s in ended.sends:
            self._send_control(SendEnded(s.transfer_id, s.state is SendState.DONE, s.error, s.num_cached_tokens,
                                         s.num_bytes))
        for r in ended.recvs:
            failed = r.state is RecvState.FAILED and not r.cancelled
            self._finished_recv.add(r.request_id)
            if failed:
                self._failed_recv.add(r.request_id)
                self._send_control(RecvFailed(r.request_id, r.transfer_id, r.error or "KV transfer failed"))
        current = {**self.handoff.stats.as_dict(), "open": len(self.handoff.sends) + len(self.handoff.recvs)}
        if current != self._stats_sent:
            self._stats_sent = current
            self._send_control(WorkerStats(self.handoff.stats, int(current["open"])))
