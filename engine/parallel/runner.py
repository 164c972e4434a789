"""The model runner of one rank of a model-parallel engine.

Rank 0 lives inside ``LLMEngine`` like a plain ``ModelRunner``: the scheduler hands it a step, it builds
the flat ``StepInputs`` and samples. The other ranks run ``serve_forever`` in worker processes. A step:

1. rank 0 broadcasts the step on the control group: a fixed header (command and sizes) then one int64
   tensor holding every input (ids, positions, slots, cu_seqlens, seq_lens, block tables, sample rows);
2. every rank runs its layers: stage 0 embeds, later stages receive the residual stream from their TP
   peer in the previous stage; inside a layer TP ranks all-reduce after o_proj and after the MLP;
3. the last stage's TP rank 0 normalises and projects the sampled rows (lm_head is replicated) and sends
   the float32 logits to rank 0, which samples. With one stage rank 0 computes them itself.

While the engine is idle rank 0 broadcasts a heartbeat, so a worker waiting for the next step can hold
it to the group deadline: no heartbeat for that long means rank 0 is gone, and the worker exits.

KV for disaggregation crosses the engine at rank 0, always in the whole model's layout (every layer, every
KV head), so a prefill server and a decode server need not share a parallel layout:

- out (prefill side): the step broadcast also carries the block ids to stream (``plan_gather``). After each
  of its layers, every rank that is the first holder of its KV heads gathers those blocks and sends them to
  rank 0 on the data group; rank 0 merges the head slices of layer l into one buffer and calls the layer
  hook, which reads it (``gather_layer``) while layer l+1 computes on the other ranks. Layers of later
  pipeline stages reach rank 0 after its own stage is done, in layer order, before the logits.
- in (decode side, between steps): ``scatter_layers`` broadcasts a write command with the block ids, sends
  every rank the slice it holds (its layers, its KV heads; replicated heads go to each replica), and each
  rank scatters its slice into its own pool.
"""
from __future__ import annotations

import atexit
import functools
import logging
import threading
import time
from typing import Callable

import torch

from duet.engine.config import EngineConfig
from duet.engine.model_config import ModelConfig
from duet.engine.model_runner import ModelRunner, StepInputs
from duet.engine.models.decoder import LayerHook
from duet.engine.parallel.comm import ParallelComm
from duet.engine.parallel.layout import ParallelLayout
from duet.kernels.kv_blocks import gather_kv_blocks, scatter_kv_blocks

logger = logging.getLogger(__name__)

CMD_STEP, CMD_HEARTBEAT, CMD_SHUTDOWN, CMD_WRITE_KV = 1, 2, 3, 4
# Step: cmd, num_tokens, num_seqs, table_width, num_samples, max_seqlen_q, decode_only, scratch, num_kv_out.
# Write KV: cmd, num_blocks, layer_start, layer_end (the rest 0).
_HEADER_LEN = 9


def pack_step(step: StepInputs, kv_out_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(header [9] int64, payload [n] int64): everything a rank needs to run the step.

    kv_out_ids  # [num_kv_out] int64 on the CPU: blocks whose KV goes to rank 0 after each layer
    """
    num_seqs, width = step.block_tables.shape
    if kv_out_ids is None:
        kv_out_ids = torch.empty(0, dtype=torch.int64)
    header = torch.tensor(
        [CMD_STEP, step.input_ids.numel(), num_seqs, width, step.sample_rows.numel(), step.max_seqlen_q,
         int(step.decode_only), step.scratch_blocks, kv_out_ids.numel()], dtype=torch.int64,
    )
    payload = torch.cat([
        step.input_ids, step.positions, step.slot_mapping, step.cu_seqlens_q.long(), step.seq_lens.long(),
        step.block_tables.long().flatten(), step.sample_rows, kv_out_ids,
    ])
    return header, payload


def payload_len(header: torch.Tensor) -> int:
    _, n, seqs, width, samples, _, _, _, num_kv_out = header.tolist()
    return 3 * n + (seqs + 1) + seqs + seqs * width + samples + num_kv_out


def unpack_step(header: torch.Tensor, payload: torch.Tensor) -> tuple[StepInputs, torch.Tensor]:
    """(the step, kv_out_ids [num_kv_out] int64)."""
    _, n, seqs, width, samples, max_q, decode_only, scratch, num_kv_out = header.tolist()
    parts = payload.split([n, n, n, seqs + 1, seqs, seqs * width, samples, num_kv_out])
    step = StepInputs(
        input_ids=parts[0], positions=parts[1], slot_mapping=parts[2], cu_seqlens_q=parts[3].int(),
        seq_lens=parts[4].int(), block_tables=parts[5].view(seqs, width).int(), sample_rows=parts[6],
        max_seqlen_q=max_q, decode_only=bool(decode_only), scratch_blocks=scratch,
    )
    return step, parts[7]


class DistributedModelRunner(ModelRunner):
    """One rank's runner. Rank 0 drives (``run`` / ``execute`` / ``prompt_logits``); others ``serve_forever``."""

    def __init__(
        self, config: EngineConfig, model_config: ModelConfig, max_model_len: int,
        layout: ParallelLayout, comm: ParallelComm, device: torch.device,
        stop_workers: Callable[[], None] | None = None,
    ):
        """Every rank constructs one (collective: the KV pool size is agreed here).

        ``stop_workers`` (rank 0): called by ``close`` after the shutdown broadcast; it must make sure the
        worker processes are gone.
        """
        self.comm = comm
        self._lock = threading.Lock()  # one command at a time on the control group (step or heartbeat)
        self._closed = False
        self._failure: Exception | None = None
        self._stop_workers = stop_workers
        super().__init__(config, model_config, max_model_len, layout, comm.tp, device)
        logger.debug(
            "rank %d: layers [%d, %d), KV heads [%d, %d), %d KV blocks", layout.rank, self.layer_start,
            self.layer_end, self.kv_head_start, self.kv_head_start + self.num_local_kv_heads, self.num_blocks,
        )
        mc = model_config
        self._kv_owners = layout.kv_head_owners(mc.num_kv_heads)
        self._sends_kv_out = any(tp_rank == layout.tp_rank for tp_rank, _, _ in self._kv_owners)
        self._layer_stage = [
            pp_rank for pp_rank in range(layout.pp_size)
            for _ in range(*ParallelLayout(pp_size=layout.pp_size, pp_rank=pp_rank).layer_range(mc.num_layers))
        ]
        # Rank 0, while a step streams KV out: the current layer's KV of every planned block, all heads.
        self._kv_out_buf: torch.Tensor | None = None  # [1, 2, num_kv_out, block_size, num_kv_heads, head_dim]
        self._kv_out_spans: list[tuple[int, int]] = []  # planned block list -> [start, end) in the buffer
        self._heartbeat_s = min(10.0, config.distributed_timeout_s / 4)
        self._last_command = time.monotonic()
        self._stop_heartbeat = threading.Event()
        self._heartbeat: threading.Thread | None = None
        if layout.rank == 0:
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="duet-tp-heartbeat", daemon=True)
            self._heartbeat.start()
            atexit.register(self.close)  # a forgotten close() must not leave workers behind

    def _agree_num_blocks(self, num_blocks: int) -> int:
        return self.comm.agree_min(num_blocks)

    # ---- rank 0 ----------------------------------------------------------------------------------------
    def run(self, step: StepInputs, layer_hook: LayerHook | None = None) -> torch.Tensor | None:
        """Broadcast the step, run this rank's share; logits of the sampled rows (rank 0 only).

        ``layer_hook`` is called on rank 0 for every model layer in order, once rank 0 holds that layer's KV
        of the blocks ``plan_gather`` named (``gather_layer``), whichever rank computed it.
        """
        with self._lock:
            self._check_usable()
            planned, self._kv_out = (self._kv_out if layer_hook is not None else []), []
            try:
                kv_out_ids = None
                if planned:
                    kv_out_ids = torch.cat([ids.long() for ids in planned])
                    ends = torch.tensor([ids.numel() for ids in planned]).cumsum(0).tolist()
                    self._kv_out_spans = list(zip([0] + ends[:-1], ends))
                    self._kv_out_buf = torch.empty(self.slab_shape(kv_out_ids.numel())[1:], dtype=self.dtype,
                                                   device=self.device).unsqueeze(0)
                header, payload = pack_step(step, None if kv_out_ids is None else kv_out_ids.cpu())
                self._broadcast(header)
                self.comm.control.broadcast(payload, 0)
                return self._forward(step, layer_hook, kv_out_ids)
            except Exception as e:
                self._failure = e
                raise RuntimeError(f"model-parallel step failed; the engine cannot continue: {e}") from e
            finally:
                self._kv_out_buf, self._kv_out_spans = None, []

    def gather_layer(self, layer: int, index: int, out: torch.Tensor) -> None:
        """From the layer hook of ``layer`` (rank 0): the merged KV of the ``index``-th planned block list.

        out  # [1, 2, n_index, block_size, num_kv_heads, head_dim] (all the model's KV heads)
        """
        start, end = self._kv_out_spans[index]
        out.copy_(self._kv_out_buf[:, :, start:end])

    def scatter_layers(self, slab: torch.Tensor, block_ids: torch.Tensor, layer_start: int, layer_end: int) -> None:
        """Rank 0, between steps: every rank stores its slice of arrived KV (its layers, its KV heads).

        slab  # [layer_end - layer_start, 2, n, block_size, num_kv_heads, head_dim] (all the model's KV heads)
        block_ids  # [n] int64, distinct
        """
        with self._lock:
            self._check_usable()
            try:
                header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
                header[:4] = torch.tensor([CMD_WRITE_KV, block_ids.numel(), layer_start, layer_end])
                self._broadcast(header)
                self.comm.control.broadcast(block_ids.to("cpu", torch.int64), 0)
                for rank in range(1, self.layout.world_size):
                    piece = self._kv_in_slice(rank, slab, layer_start, layer_end)
                    if piece is not None:
                        self.comm.data.send(piece[2], rank)
                piece = self._kv_in_slice(0, slab, layer_start, layer_end)
                if piece is not None:
                    la, lb, part = piece
                    scatter_kv_blocks(part, block_ids.to(self.device), la - self.layer_start, lb - self.layer_start,
                                      self.kv_cache)
            except Exception as e:
                self._failure = e
                raise RuntimeError(f"model-parallel KV write failed; the engine cannot continue: {e}") from e

    def _kv_in_slice(self, rank: int, slab: torch.Tensor, layer_start: int, layer_end: int):
        """(first layer, end layer, contiguous part of ``slab``) that ``rank`` stores; None if none of it."""
        span = self._kv_in_span(rank, layer_start, layer_end)
        if span is None:
            return None
        la, lb, h0, hn = span
        return la, lb, slab[la - layer_start:lb - layer_start, :, :, :, h0:h0 + hn].contiguous()

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("the engine's worker processes were shut down (engine closed)")
        if self._failure is not None:
            raise RuntimeError(f"a model-parallel rank failed earlier: {self._failure}")

    def _broadcast(self, header: torch.Tensor) -> None:
        self.comm.control.broadcast(header, 0)
        self._last_command = time.monotonic()

    def _command(self, cmd: int) -> None:
        header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
        header[0] = cmd
        self._broadcast(header)

    def _heartbeat_loop(self) -> None:
        while not self._stop_heartbeat.wait(self._heartbeat_s / 2):
            if time.monotonic() - self._last_command < self._heartbeat_s:
                continue
            if not self._lock.acquire(timeout=self._heartbeat_s):
                continue  # a step is running; that is a sign of life too
            try:
                if self._closed or self._failure is not None:
                    return
                self._command(CMD_HEARTBEAT)
            except Exception as e:  # a worker died: the next step reports it
                self._failure = e
                logger.error("model-parallel heartbeat failed: %s", e)
                return
            finally:
                self._lock.release()

    def close(self) -> None:
        """Tell the workers to exit, then make sure they did (``stop_workers``). Idempotent."""
        if self.layout.rank != 0 or self._closed:
            return
        self._stop_heartbeat.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=self._heartbeat_s + 1)
        got_lock = self._lock.acquire(timeout=self.config.distributed_timeout_s)
        try:
            if self._failure is None and got_lock:
                try:
                    self._command(CMD_SHUTDOWN)
                except Exception as e:
                    logger.warning("could not send shutdown to the workers: %s", e)
            self._closed = True
        finally:
            if got_lock:
                self._lock.release()
        atexit.unregister(self.close)
        if self._stop_workers is not None:
            self._stop_workers()

    # ---- workers ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def serve_forever(self) -> None:
        """Run every step rank 0 broadcasts until it says shut down; raises if rank 0 goes silent or dies."""
        header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
        while True:
            self.comm.control.broadcast(header, 0)
            cmd = int(header[0])
            if cmd == CMD_HEARTBEAT:
                continue
            if cmd == CMD_SHUTDOWN:
                logger.debug("rank %d: shutdown", self.layout.rank)
                return
            if cmd == CMD_WRITE_KV:
                self._scatter_layers_worker(header)
                continue
            if cmd != CMD_STEP:
                raise RuntimeError(f"rank {self.layout.rank}: unknown command {cmd}")
            payload = torch.empty(payload_len(header), dtype=torch.int64)
            self.comm.control.broadcast(payload, 0)
            step, kv_out_ids = unpack_step(header.clone(), payload)
            self._forward(step, None, kv_out_ids.to(self.device) if kv_out_ids.numel() else None)

    def _scatter_layers_worker(self, header: torch.Tensor) -> None:
        _, n, layer_start, layer_end = header[:4].tolist()
        block_ids = torch.empty(n, dtype=torch.int64)
        self.comm.control.broadcast(block_ids, 0)
        span = self._kv_in_span(self.layout.rank, layer_start, layer_end)
        if span is None:
            return
        la, lb, _, hn = span
        part = torch.empty(lb - la, 2, n, self.block_size, hn, self.model_config.head_dim, dtype=self.dtype,
                           device=self.device)
        self.comm.data.recv(part, 0)
        scatter_kv_blocks(part, block_ids.to(self.device), la - self.layer_start, lb - self.layer_start, self.kv_cache)

    # ---- every rank ------------------------------------------------------------------------------------
    def _kv_in_span(self, rank: int, layer_start: int, layer_end: int) -> tuple[int, int, int, int] | None:
        """(first layer, end layer, first KV head, KV heads) of model layers [layer_start, layer_end) that
        ``rank`` holds; None when it holds none of them."""
        L = self.layout
        other = ParallelLayout.for_rank(rank, L.tp_size, L.pp_size, L.expert_parallel)
        start, end = other.layer_range(self.model_config.num_layers)
        la, lb = max(start, layer_start), min(end, layer_end)
        if la >= lb:
            return None
        return (la, lb, *other.kv_head_range(self.model_config.num_kv_heads))

    def _kv_out_after_layer(self, kv_out_ids: torch.Tensor, layer_hook: LayerHook | None, layer: int) -> None:
        """After this rank computed ``layer``: hand its KV heads of the streamed blocks to rank 0."""
        if not self._sends_kv_out:
            return  # a replica of heads another rank sends
        local = gather_kv_blocks(self.kv_cache, kv_out_ids, layer - self.layer_start, layer - self.layer_start + 1)
        if self.layout.rank != 0:
            self.comm.data.send(local, 0)
            return
        self._collect_kv_out(layer, local)
        if layer_hook is not None:
            layer_hook(layer)

    def _collect_kv_out(self, layer: int, own: torch.Tensor | None) -> None:
        """Rank 0: merge every head slice of ``layer`` into the KV-out buffer (``own``: rank 0's slice)."""
        buf, L = self._kv_out_buf, self.layout
        stage = self._layer_stage[layer]
        for tp_rank, head, count in self._kv_owners:
            if stage == 0 and tp_rank == 0:
                buf[..., head:head + count, :].copy_(own)
                continue
            part = buf.new_empty(*buf.shape[:4], count, buf.shape[5])
            self.comm.data.recv(part, stage * L.tp_size + tp_rank)
            buf[..., head:head + count, :].copy_(part)

    def _forward(self, step: StepInputs, layer_hook: LayerHook | None,
                 kv_out_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """kv_out_ids  # [num_kv_out] int64 on this rank's device, or None: blocks to stream after each layer."""
        L, dev, model, data = self.layout, self.device, self.model, self.comm.data
        kv = self.kv_cache
        if step.scratch_blocks:
            kv = torch.zeros_like(kv[:, :, :step.scratch_blocks])
        positions = step.positions.to(dev)
        if L.is_first_stage:
            x = model.embed(step.input_ids.to(dev))
        else:
            x = torch.empty(positions.numel(), self.model_config.hidden_size, dtype=self.dtype, device=dev)
            data.recv(x, L.stage_rank(L.pp_rank - 1))
        hook = layer_hook
        if kv_out_ids is not None:
            hook = functools.partial(self._kv_out_after_layer, kv_out_ids, layer_hook)
        x = model.run_layers(x, positions, kv, step.metadata(dev), self.backend, hook)
        num_samples = step.sample_rows.numel()
        logits = None
        if not L.is_last_stage:
            data.send(x, L.stage_rank(L.pp_rank + 1))
        if L.rank == 0 and layer_hook is not None:
            # Later stages' layers, in order (their ranks send each layer's KV before the logits).
            for layer in range(self.layer_end, self.model_config.num_layers):
                if kv_out_ids is not None:
                    self._collect_kv_out(layer, None)
                layer_hook(layer)
        if L.is_last_stage and L.tp_rank == 0 and num_samples:
            # RMSNorm is per row, so normalising only the sampled rows gives the same values.
            logits = model.compute_logits(model.model.norm(x[step.sample_rows.to(dev)]))
        if L.pp_size > 1 and num_samples:
            last_stage_rank = (L.pp_size - 1) * L.tp_size
            if L.rank == 0:
                logits = torch.empty(num_samples, self.model_config.vocab_size, dtype=torch.float32, device=dev)
                data.recv(logits, last_stage_rank)
            elif L.rank == last_stage_rank:
                data.send(logits, 0)
        return logits if L.rank == 0 else None
