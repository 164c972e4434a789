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
"""
from __future__ import annotations

import atexit
import logging
import threading
import time
from typing import Callable

import torch

from engine.config import EngineConfig
from engine.model_config import ModelConfig
from engine.model_runner import ModelRunner, StepInputs
from engine.models.decoder import LayerHook
from engine.parallel.comm import ParallelComm
from engine.parallel.layout import ParallelLayout

logger = logging.getLogger(__name__)

CMD_STEP, CMD_HEARTBEAT, CMD_SHUTDOWN = 1, 2, 3
_HEADER_LEN = 8  # cmd, num_tokens, num_seqs, table_width, num_samples, max_seqlen_q, decode_only, scratch


def pack_step(step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(header [8] int64, payload [n] int64): everything a rank needs to run the step."""
    num_seqs, width = step.block_tables.shape
    header = torch.tensor(
        [CMD_STEP, step.input_ids.numel(), num_seqs, width, step.sample_rows.numel(), step.max_seqlen_q,
         int(step.decode_only), step.scratch_blocks], dtype=torch.int64,
    )
    payload = torch.cat([
        step.input_ids, step.positions, step.slot_mapping, step.cu_seqlens_q.long(), step.seq_lens.long(),
        step.block_tables.long().flatten(), step.sample_rows,
    ])
    return header, payload


def payload_len(header: torch.Tensor) -> int:
    _, n, seqs, width, samples = header[:5].tolist()
    return 3 * n + (seqs + 1) + seqs + seqs * width + samples


def unpack_step(header: torch.Tensor, payload: torch.Tensor) -> StepInputs:
    _, n, seqs, width, samples, max_q, decode_only, scratch = header.tolist()
    parts = payload.split([n, n, n, seqs + 1, seqs, seqs * width, samples])
    return StepInputs(
        input_ids=parts[0], positions=parts[1], slot_mapping=parts[2], cu_seqlens_q=parts[3].int(),
        seq_lens=parts[4].int(), block_tables=parts[5].view(seqs, width).int(), sample_rows=parts[6],
        max_seqlen_q=max_q, decode_only=bool(decode_only), scratch_blocks=scratch,
    )


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

        Streaming KV out per layer (``layer_hook``) is refused: the other ranks' KV shards live in the
        worker processes, which have no transfer side yet.
        """
        if layer_hook is not None:
            raise NotImplementedError("layer_hook (KV streaming) is not supported with model parallelism yet")
        with self._lock:
            self._check_usable()
            try:
                header, payload = pack_step(step)
                self._broadcast(header)
                self.comm.control.broadcast(payload, 0)
                return self._forward(step, layer_hook)
            except Exception as e:
                self._failure = e
                raise RuntimeError(f"model-parallel step failed; the engine cannot continue: {e}") from e

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
            if cmd != CMD_STEP:
                raise RuntimeError(f"rank {self.layout.rank}: unknown command {cmd}")
            payload = torch.empty(payload_len(header), dtype=torch.int64)
            self.comm.control.broadcast(payload, 0)
            self._forward(unpack_step(header.clone(), payload), None)

    # ---- every rank ------------------------------------------------------------------------------------
    def _forward(self, step: StepInputs, layer_hook: LayerHook | None) -> torch.Tensor | None:
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
        x = model.run_layers(x, positions, kv, step.metadata(dev), self.backend, layer_hook)
        num_samples = step.sample_rows.numel()
        logits = None
        if not L.is_last_stage:
            data.send(x, L.stage_rank(L.pp_rank + 1))
        elif L.tp_rank == 0 and num_samples:
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
