"""Attention metadata and the backend that turns it into KV stores and paged attention calls.

The runner builds one ``AttentionMetadata`` per step; every layer reuses it. Two backends share one
contract: ``torch`` (on CPU tensors the compiled ops of ``kernels.cpu_attention`` and ``kernels.cpu_layers``,
which run the references of ``kernels.reference`` when the extension is not built; elsewhere the references)
and ``triton`` (the Triton kernels in ``kernels/``, the CUDA path).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from duet.engine import envs
from duet.kernels import cpu_attention, cpu_layers, reference

logger = logging.getLogger(__name__)


@dataclass
class AttentionMetadata:
    """Where this step's tokens live in the paged cache. Sequences are packed back to back."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token (-1 = padding)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32: new tokens of seq s are cu[s]:cu[s+1]
    seq_lens: torch.Tensor  # [num_seqs] int32: cached + new tokens of each sequence
    max_seqlen_q: int
    decode_only: bool
    """Every sequence has exactly one new token (enables the decode kernel)."""


class AttentionBackend:
    """Stores new K/V and computes paged attention for one layer. Stateless; shared by all layers."""

    def __init__(self, name: str, device: torch.device):
        if name == "auto":
            name = envs.attention_backend()
        if name == "auto":
            name = "triton" if device.type == "cuda" else "torch"
        if name == "triton":
            from duet.kernels import decode_attention, kv_store, prefill_attention

            self._store = kv_store.store_kv
            self._decode = decode_attention.paged_decode_attention
            self._prefill = prefill_attention.paged_prefill_attention
        elif name == "torch" and device.type == "cpu":
            self._store = cpu_layers.store_kv
            self._decode = cpu_attention.paged_decode_attention
            self._prefill = cpu_attention.paged_prefill_attention
        elif name == "torch":
            self._store = reference.store_kv
            self._decode = reference.batched_paged_decode_attention
            self._prefill = reference.paged_attention
        else:
            raise ValueError(f"attention backend must be auto, triton or torch, got {name!r}")
        self.name = name
        logger.debug("attention backend: %s", name)

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        self._store(key, value, k_cache, v_cache, meta.slot_mapping)
        if meta.decode_only:
            return self._decode(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
        if self.name == "torch":
            return self._prefill(query, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens, scale)
        return self._prefill(
            query, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens, scale, meta.max_seqlen_q
        )
