"""Runs the model for one ``SchedulerOutput``: builds flat inputs and attention metadata, samples.

Owns the weights and the KV pool. The pool is one tensor (layout in ``kernels/__init__.py``) so transfer
backends register a single region and pack/unpack ops index it directly.

Under model parallelism (``engine.parallel``) every rank runs a subclass holding its share of the weights
and a KV pool of the same layout with fewer layers (pipeline) or KV heads (tensor): ``layout`` says which.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from duet.engine.attention import AttentionBackend, AttentionMetadata
from duet.engine.block_table import BlockTables
from duet.engine.config import EngineConfig
from duet.engine.cuda_graphs import DecodeGraphs
from duet.engine.loader import build_model
from duet.engine.model_config import ModelConfig
from duet.engine.models.decoder import LayerHook
from duet.engine.models.layers import TPGroup
from duet.engine.parallel.layout import ParallelLayout
from duet.engine.request import Request
from duet.engine.sampler import PromptLogprobs, SampleResult, Sampler
from duet.engine.scheduler import ScheduledChunk, SchedulerOutput
from duet.engine.structured_output.masks import MaskFiller
from duet.engine import envs
from duet.kernels.extension import use_extension
from duet.kernels.kv_blocks import gather_kv_blocks, scatter_kv_blocks
from duet.transfer.kv_port import KVPort

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 256 << 20


@dataclass
class StepInputs:
    """One step's flat model inputs, on the CPU. Under model parallelism rank 0 broadcasts exactly this."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token (-1 = padding)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    sample_rows: torch.Tensor  # [num_samples] int64: token rows whose logits are wanted
    max_seqlen_q: int
    decode_only: bool
    scratch_blocks: int = 0
    """> 0: attend over a zeroed scratch cache of this many blocks instead of the pool (``prompt_logits``)."""

    def metadata(self, device: torch.device) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping.to(device),
            block_tables=self.block_tables.to(device),
            cu_seqlens_q=self.cu_seqlens_q.to(device),
            seq_lens=self.seq_lens.to(device),
            max_seqlen_q=self.max_seqlen_q,
            decode_only=self.decode_only,
        )


@dataclass
class PromptRows:
    """Logit rows of one step that score prompt tokens (requests asking for ``prompt_logprobs``)."""

    request: Request
    start: int
    """Prompt position scored by the first row (row i scores position start + i, from the position before)."""
    num_rows: int


@dataclass
class RunnerOutput:
    """What one ``execute`` produced."""

    samples: dict[str, SampleResult]
    """Request id -> the token sampled for it (chunks that reached the request's last known token)."""
    prompt_logprobs: dict[str, PromptLogprobs]
    """Request id -> prompt logprobs of the positions this step scored."""


@dataclass(frozen=True)
class KVShard:
    """Which part of the model's KV this runner's pool holds (what a per-rank transfer layout needs)."""

    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    layer_start: int
    """Pool layer 0 is model layer ``layer_start``; the pool holds [layer_start, layer_end)."""
    layer_end: int
    kv_head_start: int
    """Pool head 0 is the model's KV head ``kv_head_start``."""
    num_kv_heads: int


class ModelRunner(KVPort):
    def __init__(
        self, config: EngineConfig, model_config: ModelConfig, max_model_len: int,
        layout: ParallelLayout = ParallelLayout(), tp_group: TPGroup | None = None,
        device: torch.device | None = None,
    ):
        self.config = config
        self.model_config = model_config
        self.layout = layout
        use_extension(not envs.disable_extension())
        self.device = device if device is not None else config.torch_device()
        self.dtype = config.torch_dtype(model_config.dtype)
        self.block_size = config.block_size
        mc = model_config
        self.layer_start, self.layer_end = layout.layer_range(mc.num_layers)
        self.kv_head_start, self.num_local_kv_heads = layout.kv_head_range(mc.num_kv_heads)
        self.model = build_model(
            model_config, self.dtype, self.device, max_model_len, config.show_progress and layout.rank == 0,
            layout, tp_group, config.load_format,
        )
        self.backend = AttentionBackend(config.attention_backend, self.device)
        self.num_blocks = self._agree_num_blocks(self._choose_num_blocks())
        # [num_local_layers, 2, num_blocks, block_size, num_local_kv_heads, head_dim]
        self.kv_cache = torch.zeros(
            self.layer_end - self.layer_start, 2, self.num_blocks, self.block_size, self.num_local_kv_heads,
            mc.head_dim, dtype=self.dtype, device=self.device,
        )
        self.sampler = Sampler(config.seed)
        self.masks = MaskFiller(mc.vocab_size, unpack=self.device.type == "cpu")
        self._kv_out: list[torch.Tensor] = []
        self._block_tables = BlockTables()  # rows kept between steps
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.graphs: DecodeGraphs | None = None
        if self._can_capture_graphs():
            self.graphs = DecodeGraphs(
                self.model, self.kv_cache, self.backend, min(config.cuda_graph_max_batch, config.max_num_seqs),
                self.max_blocks_per_seq,
            )
        logger.info(
            "model runner: %s on %s (%s), %d KV blocks of %d tokens (%.1f MiB), attention=%s",
            mc.architecture, self.device, str(self.dtype).removeprefix("torch."), self.num_blocks,
            self.block_size, self.kv_cache.numel() * self.kv_cache.element_size() / 2**20, self.backend.name,
        )

    def _can_capture_graphs(self) -> bool:
        """Decode CUDA graphs need: CUDA, the Triton backend, one process, a dense model (engine/cuda_graphs.py)."""
        return (
            self.config.cuda_graphs and self.device.type == "cuda" and self.backend.name == "triton"
            and self.layout.world_size == 1 and not self.model_config.is_moe
        )

    @property
    def bytes_per_block(self) -> int:
        """KV bytes of one block in this runner's pool (its layers and KV heads only)."""
        mc = self.model_config
        elem = torch.empty((), dtype=self.dtype).element_size()
        num_layers = self.layer_end - self.layer_start
        return num_layers * 2 * self.block_size * self.num_local_kv_heads * mc.head_dim * elem

    @property
    def tp_rank(self) -> int:
        return self.layout.tp_rank

    @property
    def tp_size(self) -> int:
        return self.layout.tp_size

    def kv_shard(self) -> KVShard:
        """What ``kv_cache`` holds, for building a transfer KV layout of this rank."""
        L = self.layout
        return KVShard(
            L.tp_rank, L.tp_size, L.pp_rank, L.pp_size, self.layer_start, self.layer_end,
            self.kv_head_start, self.num_local_kv_heads,
        )

    def close(self) -> None:
        """Release what the runner started (worker processes under model parallelism); idempotent."""
        self.masks.close()

    # ---- KVPort: KV in and out of the engine, in the whole model's layout (disaggregation) ---------------
    # A transfer slab always holds every layer and every KV head, whatever this engine's parallel layout:
    # servers with different tensor / pipeline sizes exchange the same bytes, each side slicing or merging.

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.kv_cache.dtype

    @property
    def kv_device(self) -> torch.device:
        return self.device

    def slab_shape(self, num_blocks: int) -> tuple[int, ...]:
        """[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] of the whole model."""
        mc = self.model_config
        return (mc.num_layers, 2, num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)

    def plan_gather(self, block_ids: list[torch.Tensor]) -> None:
        """Before a step run with a layer hook: the hook will read these block lists (``gather_layer``).

        block_ids  # each [n_i] int64 on ``self.device``
        """
        self._kv_out = block_ids

    def gather_layer(self, layer: int, index: int, out: torch.Tensor) -> None:
        """From the layer hook of model layer ``layer``: its KV of the ``index``-th planned block list.

        out  # [1, 2, n_index, block_size, num_kv_heads, head_dim], contiguous
        """
        gather_kv_blocks(self.kv_cache, self._kv_out[index], layer, layer + 1, out=out)

    def scatter_layers(self, slab: torch.Tensor, block_ids: torch.Tensor, layer_start: int, layer_end: int) -> None:
        """Between steps: store arrived KV of model layers [layer_start, layer_end) into ``block_ids``.

        slab  # [layer_end - layer_start, 2, n, block_size, num_kv_heads, head_dim], contiguous
        block_ids  # [n] int64 on ``self.device``, distinct
        """
        scatter_kv_blocks(slab, block_ids, layer_start, layer_end, self.kv_cache)

    def _agree_num_blocks(self, num_blocks: int) -> int:
        """Every rank's pool must have the same number of blocks; one process needs no agreement."""
        return num_blocks

    def _choose_num_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        budget = cfg.kv_cache_memory_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.device)
                used_elsewhere = total - free
                budget = int(total * cfg.gpu_memory_utilization) - used_elsewhere - (1 << 30)
            else:
                budget = CPU_DEFAULT_KV_BYTES
        num = budget // self.bytes_per_block
        if num < 1:
            raise ValueError(
                f"kv_cache_memory_bytes: {budget} bytes hold no KV block of {self.bytes_per_block} bytes"
            )
        return int(num)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, layer_hook: LayerHook | None = None) -> RunnerOutput:
        """Compute every scheduled chunk; sample a token for each chunk that reaches its request's end and score
        the prompt positions of requests that want prompt logprobs.

        Grammar masks of the sampled rows are filled on the mask thread while the model runs.
        """
        step, sample_reqs, prompt_rows = self._build_step(sched.chunks)
        out = RunnerOutput({}, {})
        if step is None:
            return out
        masks = self.masks.submit([r.grammar for r in sample_reqs])
        logits = self.run(step, layer_hook)
        num_samples = len(sample_reqs)
        if num_samples:
            token_mask = masks.result() if masks is not None else None
            results = self.sampler(logits[:num_samples], sample_reqs, token_mask, inplace=True)
            out.samples = {req.request_id: r for req, r in zip(sample_reqs, results)}
        offset = num_samples
        for pr in prompt_rows:
            req = pr.request
            targets = req.prompt_token_ids[pr.start:pr.start + pr.num_rows]
            out.prompt_logprobs[req.request_id] = self.sampler.prompt_logprobs(
                logits[offset:offset + pr.num_rows], targets, req.params.prompt_logprobs, pr.start)
            offset += pr.num_rows
        return out

    def _build_step(self, chunks: list[ScheduledChunk]) -> tuple[StepInputs | None, list[Request], list[PromptRows]]:
        """The flat inputs of ``chunks`` (None when they hold no token), the requests sampled, in row order, and
        the prompt-scoring rows, which follow the sampled rows in ``sample_rows``.

        Per-token work is numpy over the whole step and per-request work a few list comprehensions, so a large
        decode batch costs little host time next to its forward.
        """
        reqs = [c.request for c in chunks]
        starts = [c.start for c in chunks]
        counts = [c.num_tokens for c in chunks]
        num_seqs, num_tokens, max_seqlen_q = len(chunks), sum(counts), max(counts, default=0)
        if not num_tokens:
            return None, [], []
        decode_only = max_seqlen_q == 1 and num_tokens == num_seqs
        if decode_only:
            input_ids = [req.token_id(s) for req, s in zip(reqs, starts)]
        else:
            input_ids = []
            for req, s, k in zip(reqs, starts, counts):
                input_ids.extend(req.token_slice(s, s + k))
        table = self._block_tables.gather(reqs)  # [num_seqs, width] int32

        bs = self.block_size
        start_arr = np.array(starts, dtype=np.int64)
        end_arr = start_arr + np.array(counts, dtype=np.int64)
        cu = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(counts, out=cu[1:])
        if decode_only:
            seq_idx, positions = np.arange(num_seqs), start_arr
        else:
            seq_idx = np.repeat(np.arange(num_seqs), counts)  # [num_tokens]: sequence of each token
            positions = np.arange(num_tokens) - np.repeat(cu[:-1] - start_arr, counts)
        slots = table[seq_idx, positions // bs].astype(np.int64) * bs + positions % bs
        # ScheduledChunk.samples for every chunk at once: the chunk ends at the request's last known token.
        sample_idx = np.flatnonzero(end_arr == np.array([r.num_tokens for r in reqs], dtype=np.int64))
        sample_rows = cu[1:][sample_idx] - 1
        prompt_rows: list[PromptRows] = []
        if any(r.wants_prompt_logprobs for r in reqs):
            sample_rows, prompt_rows = self._prompt_rows(reqs, starts, counts, cu, sample_rows)
        step = StepInputs(
            input_ids=torch.from_numpy(np.array(input_ids, dtype=np.int64)),
            positions=torch.from_numpy(positions),
            slot_mapping=torch.from_numpy(slots),
            block_tables=torch.from_numpy(table),
            cu_seqlens_q=torch.from_numpy(cu.astype(np.int32)),
            seq_lens=torch.from_numpy(end_arr.astype(np.int32)),
            sample_rows=torch.from_numpy(sample_rows),
            max_seqlen_q=max_seqlen_q,
            decode_only=decode_only,
        )
        return step, [reqs[i] for i in sample_idx.tolist()], prompt_rows

    @staticmethod
    def _prompt_rows(reqs: list[Request], starts: list[int], counts: list[int], cu: np.ndarray,
                     sample_rows: np.ndarray) -> tuple[np.ndarray, list[PromptRows]]:
        """``sample_rows`` extended by the rows that score prompt tokens not scored yet.

        Token row j of a chunk starting at position s predicts position s + j + 1; positions already scored
        (a recompute after preemption) are skipped.
        """
        extra, plans = [sample_rows], []
        for i, (req, s, k) in enumerate(zip(reqs, starts, counts)):
            if not req.wants_prompt_logprobs:
                continue
            lo = max(s, req.num_prompt_logprob_rows)  # first logit row (= position) to compute
            hi = min(s + k, req.num_prompt_tokens - 1)
            if lo < hi:
                extra.append(np.arange(cu[i] + lo - s, cu[i] + hi - s, dtype=np.int64))
                plans.append(PromptRows(req, lo + 1, hi - lo))
        return np.concatenate(extra), plans

    def run(self, step: StepInputs, layer_hook: LayerHook | None = None) -> torch.Tensor | None:
        """Run the model on one step; logits [num_samples, vocab] float32 of ``sample_rows`` (None if none)."""
        dev = self.device
        g = self.graphs
        if (g is not None and step.decode_only and not step.scratch_blocks and layer_hook is None
                and g.fits(len(step.input_ids), step.block_tables.shape[1])):
            hidden = g.run(step.input_ids, step.positions, step.slot_mapping, step.block_tables, step.seq_lens)
        else:
            kv = self.kv_cache
            if step.scratch_blocks:
                kv = torch.zeros_like(kv[:, :, :step.scratch_blocks])
            hidden = self.model(
                step.input_ids.to(dev), step.positions.to(dev), kv, step.metadata(dev), self.backend, layer_hook
            )
        if not len(step.sample_rows):
            return None
        return self.model.compute_logits(hidden[step.sample_rows.to(dev)])

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:  # [num_tokens, vocab] float32
        """Logits of every position of one prompt, using a scratch block table (for tests and scoring)."""
        n = len(token_ids)
        num_blocks = -(-n // self.block_size)
        if num_blocks > self.num_blocks:
            raise ValueError(f"prompt of {n} tokens does not fit the KV pool")
        pos = torch.arange(n)
        blocks = torch.arange(num_blocks, dtype=torch.int32)
        step = StepInputs(
            input_ids=torch.tensor(token_ids, dtype=torch.int64),
            positions=pos,
            slot_mapping=blocks.long()[pos // self.block_size] * self.block_size + pos % self.block_size,
            block_tables=blocks.unsqueeze(0),
            cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
            seq_lens=torch.tensor([n], dtype=torch.int32),
            sample_rows=pos,
            max_seqlen_q=n,
            decode_only=n == 1,
            scratch_blocks=num_blocks,
        )
        return self.run(step)
