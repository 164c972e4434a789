"""Attention metadata and the backend that turns it into KV stores and paged attention calls.

The runner builds one ``AttentionMetadata`` per step; every layer reuses it. Two backends share one
contract: ``torch`` (the references in ``kernels.reference``, the CPU path) and ``triton`` (the kernels in
``kernels/``, the CUDA path).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine import envs
from kernels import reference

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
            from kernels import decode_attention, kv_store, prefill_attention

            self._store = kv_store.store_kv
            self._decode = decode_attention.paged_decode_attention
            self._prefill = prefill_attention.paged_prefill_attention
        elif name == "torch":
            self._store = reference.store_kv
            self._decode = None
            self._prefill = None
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
        if self.name == "torch":
            if meta.decode_only:
                return batched_decode_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
            return reference.paged_attention(
                query, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens, scale
            )
        if meta.decode_only:
            return self._decode(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
        return self._prefill(
            query, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens, scale, meta.max_seqlen_q
        )


def batched_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """Decode attention for the torch backend: the whole batch in a few batched ops (no per-sequence loop).

    Each sequence's blocks are gathered into a padded [num_seqs, max_len] context and positions past its
    length are masked; same math as ``kernels.reference.paged_decode_attention`` (float32 softmax).
    """
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_blocks = -(-int(seq_lens.max()) // block_size)
    tables = block_tables[:, :max_blocks].long()
    # [num_seqs, max_len, kv_heads, head_dim] -> [num_seqs, kv_heads, max_len, head_dim]
    k = k_cache[tables].flatten(1, 2).transpose(1, 2).float()
    v = v_cache[tables].flatten(1, 2).transpose(1, 2).float()
    q = query.float().view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # [num_seqs, kv_heads, group, max_len]
    positions = torch.arange(k.shape[2], device=query.device)
    scores.masked_fill_((positions[None, :] >= seq_lens[:, None]).view(num_seqs, 1, 1, -1), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [num_seqs, kv_heads, group, head_dim]
    return out.view(num_seqs, num_heads, head_dim).to(query.dtype)
