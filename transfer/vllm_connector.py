"""Duet's KV connector for vLLM V1: vLLM engines as Duet prefill and decode servers.

Loaded by vLLM from ``kv_transfer_config = {"kv_connector": "DuetConnector", "kv_connector_module_path":
"duet.transfer.vllm_connector", "kv_role": "kv_both", "kv_connector_extra_config": {...}}`` (built by
``engine.server.vllm_engine``); the extra config carries the server's control address, the transport kind,
staging size, deadlines and the model identity of the KV layout. vLLM makes one instance per role:

Scheduler side (vLLM's engine-core process). A request's ``kv_transfer_params`` say what to do:

- ``{"duet_recv": transfer_id}`` (decode): ``get_num_new_matched_tokens`` claims every prompt token past the
  local prefix hit as external and asynchronous, so vLLM allocates the blocks at admission and parks the
  request in WAITING_FOR_REMOTE_KVS; ``update_state_after_alloc`` records where the KV goes; the worker is
  told in the next ``build_connector_meta``. A request that finishes (abort) while its KV is still on the
  way is cancelled at the worker, which reports it once more so vLLM can free its blocks.
- ``{"duet_send": transfer_id}`` (prefill): ``build_connector_meta`` lists the request in the step that
  computes its prompt's last token, with the prompt's block ids. ``request_finished`` frees the blocks at
  once (the worker packed them into a staging slab during that step).

Worker side (vLLM's worker process): ``transfer.vllm_kv_mover.KVMover`` does the work; the hooks here only
hand it this step's plan (``bind_connector_metadata``), each saved layer (``save_kv_layer``) and collect its
results (``get_transfer_results``: finished and failed receives, so vLLM's ``kv_load_failure_policy``
decides between recomputing and failing). KV is never loaded inside a forward pass, so
``wait_for_layer_load`` has nothing to wait for.

vLLM always recomputes the last prompt token of a request whose whole prompt came from outside (its
scheduler's rule), so a vLLM decode server samples the first token itself from the transferred KV; the
token sent by the prefill server (native or vLLM) is not used there. A native decode server uses it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole,
                                                               KVConnectorTransferResults)

from duet.kernels.extension import use_extension
from duet.transfer.compat import KVLayout
from duet.transfer.handoff import HandoffFaults
from duet.transfer.vllm_kv_mover import KVMover, MoverConfig, RecvSpec, SendSpec
from duet.transfer.vllm_kv_port import VllmKVPort, layer_order, pool_views

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

# vLLM CPU attention ISAs whose block layout ``pool_views`` knows (checked against vLLM's own cache-write op
# and end to end by the mixed vLLM <-> native tests); others may pack keys for their matrix units.
KNOWN_CPU_ISAS = ("vec",)


@dataclass
class DuetConnectorMetadata(KVConnectorMetadata):
    """One step's plan, scheduler -> workers."""

    sends: list[SendSpec] = field(default_factory=list)
    recvs: list[RecvSpec] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    """Request ids whose receive must stop (the request finished while its KV was on the way)."""


class DuetConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self.extra: dict[str, Any] = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.block_size = vllm_config.cache_config.block_size
        # scheduler side
        self._send_reqs: dict[str, tuple[Request, str, int]] = {}  # request id -> (request, transfer id, hits)
        self._new_recvs: list[RecvSpec] = []
        self._recv_pending: set[str] = set()  # allocated, not reported by the worker yet
        self._cancels: list[str] = []
        # worker side
        self.mover: KVMover | None = None
        self._layer_idx: dict[str, int] = {}

    # ---- scheduler side -----------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params or {}
        if not params.get("duet_recv") or params.get("duet_recv_started"):
            return 0, False  # a failed load comes back here: prefill locally
        count = request.num_prompt_tokens - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        params = request.kv_transfer_params or {}
        rid = request.request_id
        if params.get("duet_send") and not params.get("duet_sent"):
            # Blocks are allocated when the request is admitted: what it has computed by then came from the cache.
            self._send_reqs[rid] = (request, params["duet_send"], request.num_computed_tokens)
        if params.get("duet_recv") and num_external_tokens > 0 and not params.get("duet_recv_started"):
            params["duet_recv_started"] = True
            num_local = request.num_prompt_tokens - num_external_tokens
            skip = num_local // self.block_size
            total = -(-request.num_prompt_tokens // self.block_size)
            block_ids = blocks.get_block_ids()[0][skip:total]
            self._new_recvs.append(RecvSpec(rid, params["duet_recv"], list(block_ids), skip))
            self._recv_pending.add(rid)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = DuetConnectorMetadata(recvs=self._new_recvs, cancels=self._cancels)
        self._new_recvs, self._cancels = [], []
        for rid, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            entry = self._send_reqs.get(rid)
            if entry is None:
                continue
            req, tid, num_cached = entry
            # num_computed_tokens is advanced after this call: this step completes the prompt if it reaches the end.
            if req.num_computed_tokens + num_scheduled >= req.num_prompt_tokens:
                total = -(-req.num_prompt_tokens // self.block_size)
                block_ids = self._kv_cache_manager.get_block_ids(rid)[0][:total]
                meta.sends.append(SendSpec(rid, tid, list(block_ids), num_cached))
                req.kv_transfer_params["duet_sent"] = True  # a preempted, re-admitted request sends no second time
                del self._send_reqs[rid]
        return meta

    def update_connector_output(self, connector_output: KVConnectorOutput):
        for rid in connector_output.finished_recving or ():
            self._recv_pending.discard(rid)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._send_reqs.pop(rid, None)
        if rid in self._recv_pending:
            self._recv_pending.discard(rid)
            self._cancels.append(rid)
        return False, None

    # ---- worker side --------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        mc, pc = self._vllm_config.model_config, self._vllm_config.parallel_config
        tp = pc.tensor_parallel_size
        if tp != 1 or pc.pipeline_parallel_size != 1:
            raise ValueError(f"Duet's vLLM connector moves KV between single-rank engines; got tensor parallel "
                             f"size {tp}, pipeline parallel size {pc.pipeline_parallel_size}")
        names = layer_order(list(kv_caches))
        heads, head_dim = mc.get_num_kv_heads(pc), mc.get_head_size()
        cache_layout = "cpu_vec" if kv_caches[names[0]].device.type == "cpu" else "flash"
        views = [pool_views(kv_caches[name], heads, head_dim, cache_layout) for name in names]
        first = kv_caches[names[0]]
        if cache_layout == "cpu_vec":  # CPU attention: the bytes are plain only for some ISAs
            isa = self._cpu_isa(names[0])
            if isa not in KNOWN_CPU_ISAS:
                raise ValueError(f"vLLM's CPU attention ISA {isa!r} stores KV blocks in a layout Duet's connector "
                                 f"does not know (known: {KNOWN_CPU_ISAS}); on x86 float32 uses 'vec'")
        self._layer_idx = {name: i for i, name in enumerate(names)}
        layout = KVLayout(model=self.extra["duet_model_id"], dtype=str(first.dtype).removeprefix("torch."),
                          num_layers=len(names), num_kv_heads=heads, head_dim=head_dim,
                          block_size=int(views[0][0].shape[3]))
        extra = self.extra
        if extra.get("duet_disable_extension"):
            use_extension(False)
        faults = HandoffFaults(float(extra.get("duet_fault_fail_write_p", 0.0)),
                               float(extra.get("duet_fault_drop_notif_p", 0.0)))
        config = MoverConfig(
            extra["duet_control"], transport_kind=extra.get("duet_transport", "auto"),
            host=extra.get("duet_host", "127.0.0.1"), advertise_host=extra.get("duet_advertise_host"),
            staging_bytes=int(extra.get("duet_staging_bytes", 64 << 20)),
            timeout_s=float(extra.get("duet_kv_timeout_s", 30.0)), keys_dir=extra.get("duet_keys_dir"),
            faults=faults, debug_layer_delay_s=float(extra.get("duet_debug_layer_delay_s", 0.0)))
        self.mover = KVMover(VllmKVPort(views), layout, config)
        logger.info("Duet connector: %d layers, layout %s, transport %s", len(names), layout,
                    self.mover.handoff.transport.name)

    def _cpu_isa(self, layer_name: str) -> str:
        layer = self._vllm_config.compilation_config.static_forward_context.get(layer_name)
        return str(getattr(layer, "isa", None) or getattr(getattr(layer, "impl", None), "isa", "unknown"))

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.mover is not None and connector_metadata.sends:
            self.mover.begin_sends(connector_metadata.sends)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if meta.recvs or meta.cancels:
            self.mover.add_recvs(meta.recvs, meta.cancels)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        idx = self._layer_idx.get(layer_name)
        if idx is not None:
            self.mover.pack_layer(idx)

    def wait_for_save(self):
        if self.mover is not None:
            self.mover.end_step()

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        if self.mover is None:
            return KVConnectorTransferResults()
        done, failed = self.mover.take_results()
        return KVConnectorTransferResults(finished_recving=done, failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return None, results.finished_recving or None

    def shutdown(self):
        if self.mover is not None:
            self.mover.stop()
