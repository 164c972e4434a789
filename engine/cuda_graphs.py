"""CUDA graphs for decode-only steps: the backbone captured once per padded batch size, replayed per step.

A decode step launches a handful of kernels per layer; at small batches those launches, not the GPU, set
the step time. ``DecodeGraphs`` captures the backbone (embedding to final norm) for each size in
``capture_sizes`` reading fixed device buffers. A step of ``n`` sequences copies its inputs into those
buffers, pads them to the smallest captured size ``>= n`` (slot -1: the KV store skips the token;
seq_len 0: decode attention writes zeros and reads no block) and replays that graph. The caller computes
logits from the first ``n`` rows of the output eagerly (one GEMM over the sampled rows).

Contract with the model: during a decode-only step nothing reads a tensor's value on the host (no
``.item()``, no data-dependent shapes), and every kernel choice depends on shapes alone. The dense
decoder with the Triton backend meets it; MoE layers (data-dependent expert loops) and the parallel
ranks (collectives) are never captured.
"""
from __future__ import annotations

import logging
import time

import torch

from duet.engine.attention import AttentionBackend, AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes to capture, ascending: 1, 2, 4, 8, then multiples of 16 up to ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    """Captured decode graphs of one model over one KV pool (the pool is baked into the graphs)."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        backend: AttentionBackend,
        max_batch: int,
        max_blocks_per_seq: int,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.sizes = capture_sizes(max_batch)
        self.max_blocks_per_seq = max_blocks_per_seq
        device = kv_cache.device
        cap, width = self.sizes[-1], max_blocks_per_seq
        # Inputs travel in two pinned host buffers and two copies: int64 rows (ids, positions, slots) and
        # int32 (seq_lens, then the block table row-major), so a step costs two H2D copies.
        self._host64 = torch.zeros(3, cap, dtype=torch.int64, pin_memory=True)
        self._host32 = torch.zeros(cap + cap * width, dtype=torch.int32, pin_memory=True)
        self._dev64 = torch.zeros(3, cap, dtype=torch.int64, device=device)
        self._dev32 = torch.zeros(cap + cap * width, dtype=torch.int32, device=device)
        self._dev64[2].fill_(-1)
        self._cu = torch.arange(cap + 1, dtype=torch.int32, device=device)  # one query token per sequence
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # size -> [size, hidden], written by the graph
        self._capture()

    def _meta(self, size: int) -> AttentionMetadata:
        cap, width = self.sizes[-1], self.max_blocks_per_seq
        return AttentionMetadata(
            slot_mapping=self._dev64[2, :size],
            block_tables=self._dev32[cap:].view(cap, width)[:size],
            cu_seqlens_q=self._cu[: size + 1],
            seq_lens=self._dev32[:size],
            max_seqlen_q=1,
            decode_only=True,
        )

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self._dev64[0, :size], self._dev64[1, :size], self.kv_cache, self._meta(size),
                          self.backend, None)

    @torch.inference_mode()
    def _capture(self) -> None:
        t0 = time.perf_counter()
        pool = None
        # Largest first: the smaller graphs then fit in the memory pool the largest one reserved.
        for size in reversed(self.sizes):
            # Warm-up off the capture (Triton compiles, cuBLAS picks algorithms) on a side stream, as torch
            # asks; with every slot -1 and seq_len 0 it neither reads nor writes the KV pool.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(size)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[size] = self._forward(size)
            pool = graph.pool()
            self._graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch %d..%d) in %.1f s",
                    len(self.sizes), self.sizes[0], self.sizes[-1], time.perf_counter() - t0)

    def fits(self, num_seqs: int, table_width: int) -> bool:
        return num_seqs <= self.sizes[-1] and table_width <= self.max_blocks_per_seq

    def run(
        self,
        input_ids: torch.Tensor,  # [n] int64, CPU
        positions: torch.Tensor,  # [n] int64, CPU
        slot_mapping: torch.Tensor,  # [n] int64, CPU
        block_tables: torch.Tensor,  # [n, w] int32, CPU, w <= max_blocks_per_seq
        seq_lens: torch.Tensor,  # [n] int32, CPU
    ) -> torch.Tensor:  # [n, hidden]: a view of the graph's output, valid until the next replay
        n, w = block_tables.shape
        size = next(s for s in self.sizes if s >= n)
        cap, width = self.sizes[-1], self.max_blocks_per_seq
        h64, h32 = self._host64, self._host32
        h64[0, :n], h64[1, :n], h64[2, :n] = input_ids, positions, slot_mapping
        h64[:2, n:size] = 0
        h64[2, n:size] = -1
        h32[:n] = seq_lens
        h32[n:size] = 0
        h32[cap: cap + size * width].view(size, width)[:n, :w] = block_tables
        # The previous step's copies are complete: its sampled tokens were read on the host.
        self._dev64[:, :size].copy_(h64[:, :size], non_blocking=True)
        self._dev32[:size].copy_(h32[:size], non_blocking=True)
        self._dev32[cap: cap + size * width].copy_(h32[cap: cap + size * width], non_blocking=True)
        self._graphs[size].replay()
        return self._outputs[size][:n]
