"""Prefill side of a KV hand-off: stream each remote request's KV to its decode server, layer by layer.

A transfer needs two messages: ``Prefill`` from the router and ``KVDest`` from the decode server (where to
write, and how many leading blocks decode already caches). The prompt is admitted as soon as ``Prefill``
arrives (``ready()``), so computing overlaps the decode side's admission. During the step that computes the
prompt's last chunk, the layer hook packs layer l's blocks into a local staging slab (one gather) and, once
the destination is known, posts one WRITE of layer l while layer l+1 computes; layers packed before
``KVDest`` arrived are posted when it does. The last layer's WRITE waits for the sampled first token, which
rides in its notification. Blocks are released by the engine as soon as the step ends (the slab holds the
bytes); the slab is freed when every WRITE is DONE.

Slabs hold the whole model's KV (every layer, every KV head), whatever the engine's parallel layout: the
model runner hands the hook each layer's merged KV (``ModelRunner.read_kv_out``), so a prefill server with
tensor parallelism 2 feeds a decode server with 1 (or 4) unchanged.

States: PENDING (no Prefill yet) -> ADMITTED -> STREAMING (in the final step) -> PACKED (all layers packed,
first token known) -> SENT (every WRITE posted) -> DONE | FAILED.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine import envs
from engine.model_runner import ModelRunner
from transfer.messages import KVDest, KVLayers, Prefill, PrefillDone
from transfer.staging import StagingPool
from transfer.transport import DONE, ERROR, KVTransport, RegionHandle, TransferError, TransferHandle
from transfer.wire import encode

logger = logging.getLogger(__name__)


@dataclass
class OutTransfer:
    transfer_id: str
    deadline: float
    prefill: Prefill | None = None
    reply_to: bytes | None = None
    dest: KVDest | None = None
    state: str = "PENDING"
    engine_request_id: str = ""
    generator: torch.Generator | None = None
    """The engine request's own sampling generator (seeded requests): its state travels with the first token."""
    local_offset: int = -1
    slab: torch.Tensor | None = None  # [layers, 2, prompt_blocks, block_size, kv_heads, head_dim] staging view
    handles: list[TransferHandle] = field(default_factory=list)
    layers_packed: int = 0
    layers_posted: int = 0
    last_notif: KVLayers | None = None
    """The last layer's notification (with the first token), once the step sampled it."""
    admitted_at: float = 0.0
    compute_s: float = 0.0
    num_cached_tokens: int = 0
    error: str | None = None

    def ranges(self, l0: int, l1: int) -> list[tuple[int, int, int]]:
        """(local offset, remote offset, bytes) of layers [l0, l1): decode holds the first ``num_skip_blocks``
        blocks already, so each layer's K and V runs start past them (2 descriptors, 1 when nothing is skipped)."""
        _, _, n_local, *rest = self.slab.shape
        block_bytes = self.slab[0, 0, 0].numel() * self.slab.element_size()
        skip, n = self.dest.num_skip_blocks, self.dest.num_blocks
        out = []
        for layer in range(l0, l1):
            for kv in range(2):
                local = self.local_offset + ((layer * 2 + kv) * n_local + skip) * block_bytes
                remote = self.dest.offset + (layer * 2 + kv) * n * block_bytes
                if out and out[-1][0] + out[-1][2] == local and out[-1][1] + out[-1][2] == remote:
                    out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n * block_bytes)
                else:
                    out.append((local, remote, n * block_bytes))
        return out


class KVSender:
    def __init__(self, transport: KVTransport, staging: StagingPool, staging_handle: RegionHandle,
                 runner: ModelRunner, debug_layer_delay_s: float = 0.0):
        """``runner``: the engine's model runner (rank 0 under model parallelism), which reads KV out."""
        self.transport = transport
        self.staging = staging
        self.staging_handle = staging_handle
        self.runner = runner
        self.device = runner.device
        self.dtype = runner.kv_cache.dtype
        self.num_layers = runner.model_config.num_layers
        self.debug_layer_delay_s = debug_layer_delay_s
        self.transfers: dict[str, OutTransfer] = {}
        self._by_engine_id: dict[str, OutTransfer] = {}
        self._streaming: list[tuple[OutTransfer, torch.Tensor]] = []
        self.receive_destinations: Callable[[], None] = lambda: None
        """Set by the server: apply ``KVDest``s that arrived while a step runs."""
        self.traces: dict[str, dict[str, float]] = {}
        self.fault_fail_write_p = envs.fault_fail_write_p()
        self.num_bytes_sent = 0
        self.num_descriptors = 0
        self.num_failed = 0

    # ---- the two halves of a request ---------------------------------------------------------------
    def _get(self, transfer_id: str, timeout_s: float) -> OutTransfer:
        t = self.transfers.get(transfer_id)
        if t is None:
            t = self.transfers[transfer_id] = OutTransfer(transfer_id, time.monotonic() + timeout_s)
        return t

    def on_prefill(self, msg: Prefill, reply_to: bytes) -> OutTransfer:
        t = self._get(msg.transfer_id, msg.timeout_s)
        t.prefill, t.reply_to = msg, reply_to
        return t

    def on_dest(self, msg: KVDest, timeout_s: float = 30.0) -> OutTransfer:
        t = self._get(msg.transfer_id, timeout_s)
        t.dest = msg
        if t.slab is not None and t.dest.num_skip_blocks + t.dest.num_blocks != t.slab.shape[2]:
            t.state, t.error = "FAILED", f"decode asked for {msg.num_skip_blocks}+{msg.num_blocks} blocks of a " \
                                         f"{t.slab.shape[2]}-block prompt"
        self._flush(t)
        return t

    def ready(self, t: OutTransfer) -> bool:
        return t.state == "PENDING" and t.prefill is not None

    def admitted(self, t: OutTransfer, engine_request_id: str) -> str | None:
        """The prompt is in the engine: reserve the local slab. Returns an error string if impossible."""
        n = -(-len(t.prefill.prompt_token_ids) // self.runner.block_size)
        shape = self.runner.kv_slab_shape(n)
        nbytes = math.prod(shape) * self.dtype.itemsize
        offset = self.staging.alloc(nbytes)
        if offset is None:
            return f"prefill staging full ({self.staging.free_bytes} bytes free, {nbytes} needed)"
        t.local_offset = offset
        t.slab = self.staging.view(offset, nbytes, self.dtype, shape)
        t.state = "ADMITTED"
        t.engine_request_id = engine_request_id
        t.admitted_at = time.monotonic()
        self._by_engine_id[engine_request_id] = t
        self._trace(t, "prefill_admitted")
        return None

    # ---- engine step integration -------------------------------------------------------------------
    def on_schedule(self, sched):
        """Called with the step's plan: stream the transfers whose prompt completes in this step."""
        self._streaming = []
        for chunk in sched.chunks:
            t = self._by_engine_id.get(chunk.request.request_id)
            if t is not None and t.state == "ADMITTED" and chunk.samples:
                req = chunk.request
                ids = torch.tensor(req.block_ids, dtype=torch.int64, device=self.device)
                t.num_cached_tokens = req.num_cached_tokens
                t.generator = req.generator
                t.state = "STREAMING"
                self._streaming.append((t, ids))
        if not self._streaming:
            return None
        self.runner.plan_kv_out([ids for _, ids in self._streaming])
        return self._layer_hook

    def _layer_hook(self, layer: int) -> None:
        for i, (t, _) in enumerate(self._streaming):
            self.runner.read_kv_out(layer, i, out=t.slab[layer:layer + 1])
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the WRITE must see the finished gather
        if any(t.dest is None for t, _ in self._streaming):
            self.receive_destinations()
        for t, _ in self._streaming:
            self._trace(t, f"layer_{layer}_computed")
            # The last layer waits for the first token (after_step); earlier ones go now if we know where.
            t.layers_packed = min(layer + 1, self.num_layers - 1)
            self._flush(t)
        self.progress()
        if self.debug_layer_delay_s > 0:
            # Test hook: a slow layer; keep driving transfers meanwhile, as a GPU-bound step would.
            until = time.monotonic() + self.debug_layer_delay_s
            while time.monotonic() < until:
                self.progress()
                if any(t.dest is None for t, _ in self._streaming):
                    self.receive_destinations()
                time.sleep(0.002)

    def after_step(self, outputs) -> None:
        """The step sampled the first tokens: queue each streaming transfer's last layer with its token."""
        by_id = {o.request_id: o for o in outputs}
        for t, _ in self._streaming:
            out = by_id.get(t.engine_request_id)
            if out is None or not out.token_ids:
                t.state, t.error = "FAILED", "prefill produced no token"
                continue
            t.compute_s = time.monotonic() - t.admitted_at
            logprobs = out.logprobs[0] if out.logprobs else None
            last = self.num_layers - 1
            state = None if t.generator is None else t.generator.get_state().numpy().tobytes()
            t.last_notif = KVLayers(t.transfer_id, last, last + 1, out.token_ids[0], logprobs, state)
            t.layers_packed = self.num_layers
            if t.state == "STREAMING":
                t.state = "PACKED"
            self._flush(t)
        self._streaming = []

    def _flush(self, t: OutTransfer) -> None:
        """Post every packed layer not posted yet, once the destination is known."""
        if t.dest is None or t.state in ("FAILED", "PENDING") or t.layers_posted >= t.layers_packed:
            return
        for layer in range(t.layers_posted, t.layers_packed):
            last = layer == self.num_layers - 1
            notif = t.last_notif if last else KVLayers(t.transfer_id, layer, layer + 1)
            self._post(t, layer, notif)
            t.layers_posted = layer + 1
        if t.layers_posted == self.num_layers and t.state == "PACKED":
            t.state = "SENT"
            self._trace(t, "last_layer_sent")

    def _post(self, t: OutTransfer, layer: int, notif: KVLayers) -> None:
        if t.state == "FAILED":
            return
        ranges = t.ranges(layer, layer + 1)
        try:
            if self.fault_fail_write_p and random.random() < self.fault_fail_write_p:
                raise TransferError("injected write failure (DUET_FAULT_FAIL_WRITE_P)")
            h = self.transport.write_many(self.staging_handle, t.dest.region, ranges, encode(notif))
        except (TransferError, ValueError) as e:
            t.state, t.error = "FAILED", f"KV write to {t.dest.decode_engine_id} failed: {e}"
            return
        t.handles.append(h)
        self.num_bytes_sent += sum(r[2] for r in ranges)
        self.num_descriptors += len(ranges)
        self._trace(t, f"layer_{layer}_sent")

    # ---- progress, completion, failure -------------------------------------------------------------
    def progress(self) -> None:
        for t in self.transfers.values():
            for h in t.handles:
                self.transport.poll(h)

    def poll(self) -> list[tuple[bytes | None, PrefillDone]]:
        """Finished transfers (DONE or FAILED or expired): replies for the router; resources freed."""
        now = time.monotonic()
        done = []
        for tid, t in list(self.transfers.items()):
            states = [self.transport.poll(h) for h in t.handles]
            if t.state == "SENT" and all(s == DONE for s in states):
                done.append(self._finish(t, ok=True))
            elif ERROR in states or t.state == "FAILED":
                err = next((h.error for h in t.handles if h.state == ERROR), None)
                t.error = t.error or f"KV write failed: {err}"
                done.append(self._finish(t, ok=False))
            elif now > t.deadline and t.state != "STREAMING":
                t.error = f"transfer {tid} timed out in state {t.state}"
                done.append(self._finish(t, ok=False))
        return done

    def abort(self, transfer_id: str, reason: str = "aborted") -> OutTransfer | None:
        t = self.transfers.get(transfer_id)
        if t is not None and t.state != "STREAMING":
            t.state, t.error = "FAILED", reason
        return t

    def _finish(self, t: OutTransfer, ok: bool) -> tuple[bytes | None, PrefillDone]:
        for h in t.handles:
            self.transport.release(h)
        if t.local_offset >= 0:
            self.staging.free(t.local_offset, t.slab.numel() * t.slab.element_size())
        del self.transfers[t.transfer_id]
        self._by_engine_id.pop(t.engine_request_id, None)
        if not ok:
            self.num_failed += 1
            logger.warning("transfer %s failed: %s", t.transfer_id, t.error)
            if t.dest is not None:
                try:  # let decode fall back now rather than at its deadline
                    self.transport.send_notif(t.dest.decode_transport_name, encode(
                        KVLayers(t.transfer_id, 0, 0, error=t.error or "failed")))
                except TransferError:
                    pass
        self._trace(t, "transfer_done" if ok else "transfer_failed")
        request_id = t.prefill.request_id if t.prefill else (t.dest.request_id if t.dest else "")
        nbytes = sum(h.nbytes for h in t.handles)
        num_tokens = len(t.prefill.prompt_token_ids) - t.num_cached_tokens if t.prefill else 0
        return t.reply_to, PrefillDone(request_id, t.transfer_id, ok, None if ok else t.error, t.compute_s,
                                       t.num_cached_tokens, nbytes, num_tokens)

    def _trace(self, t: OutTransfer, stage: str) -> None:
        rid = t.prefill.request_id if t.prefill else t.transfer_id
        self.traces.setdefault(rid, {})[stage] = time.time()
        while len(self.traces) > 1024:
            self.traces.pop(next(iter(self.traces)))
