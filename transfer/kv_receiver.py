"""Decode side of a KV hand-off: receive a request's KV slabs, scatter them into its blocks, start decoding.

``start()`` runs at admission, after the engine allocated the request's blocks (prefix hits shrink what is
sent): it reserves a staging slab and returns the ``KVDest`` for the prefill server. Each ``KVLayers``
notification means those layers' bytes have landed; they are scattered into the request's blocks at once
(one scatter). When every layer and the first token have arrived the transfer is complete. A transfer that
misses its deadline or reports an error fails; its slab is quarantined (a late write must not hit a reused
slab) and the caller applies its failure policy.

Slabs hold the whole model's KV (every layer, every KV head); the model runner stores each rank's slice of
it (``ModelRunner.write_kv_in``), so the prefill server's parallel layout does not matter here.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import torch

from engine import envs
from engine.model_runner import ModelRunner
from engine.request import Request
from engine.sampler import SampleResult
from transfer.messages import KVDest, KVLayers
from transfer.staging import StagingPool
from transfer.transport import KVTransport, RemoteRegion
from transfer.wire import ProtocolError, decode

logger = logging.getLogger(__name__)


@dataclass
class InTransfer:
    transfer_id: str
    request: Request
    prefill_engine_id: str
    deadline: float
    offset: int
    nbytes: int
    slab: torch.Tensor  # [layers, 2, n, block_size, kv_heads, head_dim]
    block_ids: torch.Tensor  # [n] int64: destination blocks
    layers_done: int = 0
    first_token: SampleResult | None = None
    error: str | None = None
    started_at: float = 0.0


class KVReceiver:
    def __init__(self, transport: KVTransport, staging: StagingPool, region: RemoteRegion, runner: ModelRunner):
        """``runner``: the engine's model runner (rank 0 under model parallelism), which stores arrived KV."""
        self.transport = transport
        self.staging = staging
        self.region = region
        self.runner = runner
        self.device = runner.device
        self.dtype = runner.kv_cache.dtype
        self.num_layers = runner.model_config.num_layers
        self.transfers: dict[str, InTransfer] = {}
        self.traces: dict[str, dict[str, float]] = {}
        self.fault_drop_notif_p = envs.fault_drop_notif_p()
        self.num_bytes_received = 0
        self.num_completed = 0
        self.num_failed = 0
        self.transfer_seconds_sum = 0.0
        """Admission (KVDest sent) to all KV in place, summed over completed transfers."""
        self.transfer_seconds_max = 0.0

    def start(self, transfer_id: str, req: Request, prefill_engine_id: str, engine_id: str,
              timeout_s: float) -> KVDest | None:
        """Reserve a slab for ``req``'s uncached prompt blocks; None if staging is full."""
        bs = self.runner.block_size
        skip = req.num_computed_tokens // bs
        n = -(-req.num_prompt_tokens // bs) - skip
        shape = self.runner.kv_slab_shape(n)
        nbytes = math.prod(shape) * self.dtype.itemsize
        offset = self.staging.alloc(nbytes)
        if offset is None:
            return None
        ids = torch.tensor(req.block_ids[skip:skip + n], dtype=torch.int64, device=self.device)
        self.transfers[transfer_id] = InTransfer(
            transfer_id, req, prefill_engine_id, time.monotonic() + timeout_s, offset, nbytes,
            self.staging.view(offset, nbytes, self.dtype, shape), ids, started_at=time.monotonic())
        self._trace(req.request_id, "kv_dest_sent")
        return KVDest(req.request_id, transfer_id, engine_id, self.transport.name, self.region, offset, skip, n)

    def poll(self) -> tuple[list[tuple[Request, SampleResult]], list[tuple[Request, str]]]:
        """Apply arrived notifications. Returns (completed: request + first token, failed: request + why)."""
        for peer, raw in self.transport.notifications():
            if self.fault_drop_notif_p and random.random() < self.fault_drop_notif_p:
                logger.warning("dropping a notification from %s (DUET_FAULT_DROP_NOTIF_P)", peer)
                continue
            try:
                msg = decode(raw)
            except ProtocolError as e:
                logger.warning("bad notification from %s: %s", peer, e)
                continue
            if not isinstance(msg, KVLayers):
                continue
            t = self.transfers.get(msg.transfer_id)
            if t is None:
                continue  # late notification of an aborted or failed transfer
            if msg.error:
                t.error = msg.error
                continue
            l0, l1 = msg.layer_start, msg.layer_end
            if l1 > l0:
                self.runner.write_kv_in(t.slab[l0:l1], t.block_ids, l0, l1)
                t.layers_done += l1 - l0
                self.num_bytes_received += t.nbytes * (l1 - l0) // self.num_layers
                self._trace(t.request.request_id, f"kv_layer_{l0}_received")
            if msg.first_token is not None:
                t.first_token = SampleResult(msg.first_token, msg.first_logprobs, msg.first_generator_state)
        completed, failed = [], []
        now = time.monotonic()
        for tid, t in list(self.transfers.items()):
            if t.error is None and t.layers_done >= self.num_layers and t.first_token is not None:
                if self.device.type == "cuda":
                    torch.cuda.current_stream().synchronize()
                self._drop(t, quarantine=False)
                self.num_completed += 1
                took = time.monotonic() - t.started_at
                self.transfer_seconds_sum += took
                self.transfer_seconds_max = max(self.transfer_seconds_max, took)
                self._trace(t.request.request_id, "kv_complete")
                completed.append((t.request, t.first_token))
            elif t.error is not None or now > t.deadline:
                reason = t.error or f"KV for {tid} did not arrive within the deadline"
                self._drop(t, quarantine=True)
                self.num_failed += 1
                self._trace(t.request.request_id, "kv_failed")
                failed.append((t.request, reason))
        return completed, failed

    def cancel(self, transfer_id: str) -> None:
        t = self.transfers.get(transfer_id)
        if t is not None:
            self._drop(t, quarantine=True)

    def find_by_request(self, request_id: str) -> InTransfer | None:
        return next((t for t in self.transfers.values() if t.request.request_id == request_id), None)

    def _drop(self, t: InTransfer, quarantine: bool) -> None:
        del self.transfers[t.transfer_id]
        self.staging.free(t.offset, t.nbytes, quarantine=quarantine)

    def _trace(self, request_id: str, stage: str) -> None:
        self.traces.setdefault(request_id, {})[stage] = time.time()
        while len(self.traces) > 1024:
            self.traces.pop(next(iter(self.traces)))
