"""Runs the model for one ``SchedulerOutput``: builds flat inputs and attention metadata, samples.

Owns the weights and the KV pool. The pool is one tensor (layout in ``kernels/__init__.py``) so transfer
backends register a single region and pack/unpack ops index it directly.
"""
from __future__ import annotations

import logging

import torch

from engine.attention import AttentionBackend, AttentionMetadata
from engine.config import EngineConfig
from engine.loader import build_model
from engine.model_config import ModelConfig
from engine.models.decoder import LayerHook
from engine.request import Request
from engine.sampler import SampleResult, Sampler
from engine.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 256 << 20


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int):
        self.config = config
        self.model_config = model_config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(model_config.dtype)
        self.block_size = config.block_size
        self.model = build_model(model_config, self.dtype, self.device, max_model_len, config.show_progress)
        self.backend = AttentionBackend(config.attention_backend, self.device)
        self.num_blocks = self._choose_num_blocks()
        mc = model_config
        # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_cache = torch.zeros(
            mc.num_layers, 2, self.num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim,
            dtype=self.dtype, device=self.device,
        )
        self.sampler = Sampler(config.seed)
        logger.info(
            "model runner: %s on %s (%s), %d KV blocks of %d tokens (%.1f MiB), attention=%s",
            mc.architecture, self.device, str(self.dtype).removeprefix("torch."), self.num_blocks,
            self.block_size, self.kv_cache.numel() * self.kv_cache.element_size() / 2**20, self.backend.name,
        )

    @property
    def bytes_per_block(self) -> int:
        mc = self.model_config
        elem = torch.empty((), dtype=self.dtype).element_size()
        return mc.num_layers * 2 * self.block_size * mc.num_kv_heads * mc.head_dim * elem

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
    def execute(self, sched: SchedulerOutput, layer_hook: LayerHook | None = None) -> dict[str, SampleResult]:
        """Compute every scheduled chunk; return the sampled token of each chunk that reaches its end."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        bs = self.block_size
        for chunk in sched.chunks:
            req = chunk.request
            start, end = chunk.start, chunk.start + chunk.num_tokens
            input_ids.extend(req.token_slice(start, end))
            positions.extend(range(start, end))
            blocks = req.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            cu.append(cu[-1] + chunk.num_tokens)
            seq_lens.append(end)
            tables.append(blocks)
            if chunk.samples:
                sample_rows.append(cu[-1] - 1)
                sample_reqs.append(req)
        if not input_ids:
            return {}
        dev = self.device
        width = max(len(t) for t in tables)
        table = torch.zeros(len(tables), width, dtype=torch.int32)
        for i, t in enumerate(tables):
            table[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=table.to(dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            max_seqlen_q=max(c.num_tokens for c in sched.chunks),
            decode_only=all(c.num_tokens == 1 for c in sched.chunks),
        )
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            self.kv_cache, meta, self.backend, layer_hook,
        )
        if not sample_reqs:
            return {}
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=dev)])
        results = self.sampler(logits, sample_reqs)
        return {req.request_id: r for req, r in zip(sample_reqs, results)}

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:  # [num_tokens, vocab] float32
        """Logits of every position of one prompt, using a scratch block table (for tests and scoring)."""
        n = len(token_ids)
        num_blocks = -(-n // self.block_size)
        if num_blocks > self.num_blocks:
            raise ValueError(f"prompt of {n} tokens does not fit the KV pool")
        dev = self.device
        pos = torch.arange(n, device=dev)
        blocks = torch.arange(num_blocks, dtype=torch.int32, device=dev)
        meta = AttentionMetadata(
            slot_mapping=(blocks.long()[pos // self.block_size] * self.block_size + pos % self.block_size),
            block_tables=blocks.unsqueeze(0),
            cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
            max_seqlen_q=n, decode_only=n == 1,
        )
        scratch = torch.zeros_like(self.kv_cache[:, :, :num_blocks])
        hidden = self.model(torch.tensor(token_ids, device=dev), pos, scratch, meta, self.backend)
        return self.model.compute_logits(hidden)
