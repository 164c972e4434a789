"""Plain torch references for every Duet kernel.

These are the ground truth the Triton kernels and the C++/CUDA ops are tested against, and they are also
what the engine runs on the CPU when the compiled extension is not built. Clarity beats speed here, but the attention
reference is vectorised per sequence so the CPU engine stays usable.
"""
from __future__ import annotations

import torch


def rms_norm(
    x: torch.Tensor,  # [..., dim]
    weight: torch.Tensor,  # [dim]
    eps: float,
) -> torch.Tensor:  # [..., dim], x's dtype
    """Normalise in float32, round to x's dtype, then multiply by the weight in that dtype (Llama's RMSNorm)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor,  # [..., dim]
    residual: torch.Tensor,  # [..., dim]
    weight: torch.Tensor,  # [dim]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (rms_norm(x + residual), x + residual)
    """The pre-norm residual stream: add a sub-layer's output to the stream, normalise the sum."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos: torch.Tensor,  # [max_positions, head_dim // 2] float32
    sin: torch.Tensor,  # [max_positions, head_dim // 2] float32
) -> tuple[torch.Tensor, torch.Tensor]:  # rotated q, k (new tensors, input dtypes)
    """Neox-style rotary embedding (rotate halves), computed in float32."""
    c = cos[positions].unsqueeze(1)  # [num_tokens, 1, head_dim // 2]
    s = sin[positions].unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * width] -> [num_tokens, width]
    """SwiGLU's gate: ``silu(x[:, :width]) * x[:, width:]``."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; -1 = padding, skipped
) -> None:
    """Write each token's K/V into its slot of the paged cache (in place)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_flat = k_cache.view(-1, *k_cache.shape[2:])  # [num_blocks * block_size, num_kv_heads, head_dim]
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    k_flat.index_copy_(0, slots, key[keep].to(k_cache.dtype))
    v_flat.index_copy_(0, slots, value[keep].to(v_cache.dtype))


def gather_sequence_kv(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [max_blocks_per_seq] int32 (entries past the sequence are ignored)
    seq_len: int,
) -> torch.Tensor:  # [seq_len, num_kv_heads, head_dim]
    """The first ``seq_len`` tokens of one sequence's K (or V), made contiguous."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], sequences packed back to back
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32: query tokens of seq s are cu[s]:cu[s+1]
    seq_lens: torch.Tensor,  # [num_seqs] int32: total tokens of seq s in the cache, new ones included
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new tokens over its whole paged context.

    The new tokens of sequence s are its last ``q_len`` positions (``seq_len - q_len .. seq_len - 1``) and
    their K/V must already be stored in the cache. Query token i attends to cache positions
    ``0 .. seq_len - q_len + i``. Decode is the case ``q_len == 1``; prefill with a cached prefix is
    ``q_len < seq_len``. Softmax is computed in float32.
    """
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for s, seq_len in enumerate(lens):
        q_start, q_end = cu[s], cu[s + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        k = gather_sequence_kv(k_cache, block_tables[s], seq_len).float()  # [seq_len, kv_heads, head_dim]
        v = gather_sequence_kv(v_cache, block_tables[s], seq_len).float()
        q = query[q_start:q_end].float()  # [q_len, num_heads, head_dim]
        q = q.view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [kv_heads, group, q_len, D]
        kt = k.permute(1, 2, 0).unsqueeze(1)  # [kv_heads, 1, head_dim, seq_len]
        scores = torch.matmul(q, kt) * scale  # [kv_heads, group, q_len, seq_len]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device).unsqueeze(1)  # [q_len, 1]
        k_pos = torch.arange(seq_len, device=query.device).unsqueeze(0)  # [1, seq_len]
        scores.masked_fill_(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.matmul(probs, v.permute(1, 0, 2).unsqueeze(1))  # [kv_heads, group, q_len, head_dim]
        out[q_start:q_end] = o.permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim).to(query.dtype)
    return out


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]: one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, the new token included
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """Decode attention: ``paged_attention`` with one query token per sequence."""
    num_seqs = query.shape[0]
    cu = torch.arange(num_seqs + 1, dtype=torch.int32)
    return paged_attention(query, k_cache, v_cache, block_tables, cu, seq_lens, scale)


def batched_paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """``paged_decode_attention`` for the whole batch in a few batched ops (no per-sequence loop): the torch
    fallback of ``kernels.cpu_attention`` when the extension is not built.

    Each sequence's blocks are gathered into a padded [num_seqs, max_len] context and positions past its
    length are masked; float32 softmax. A sequence of length 0 gets zeros, as in ``paged_decode_attention``.
    """
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_blocks = -(-int(seq_lens.max()) // block_size) if num_seqs else 0
    if max_blocks == 0:
        return torch.zeros_like(query)
    tables = block_tables[:, :max_blocks].long()
    # [num_seqs, max_len, kv_heads, head_dim] -> [num_seqs, kv_heads, max_len, head_dim]
    k = k_cache[tables].flatten(1, 2).transpose(1, 2).float()
    v = v_cache[tables].flatten(1, 2).transpose(1, 2).float()
    q = query.float().view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # [num_seqs, kv_heads, group, max_len]
    positions = torch.arange(k.shape[2], device=query.device)
    scores.masked_fill_((positions[None, :] >= seq_lens[:, None]).view(num_seqs, 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # an all-masked (empty) row: zeros
    out = torch.matmul(probs, v)  # [num_seqs, kv_heads, group, head_dim]
    return out.view(num_seqs, num_heads, head_dim).to(query.dtype)


def gather_kv_blocks(
    kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int64
    layer_start: int,
    layer_end: int,
) -> torch.Tensor:  # [layer_end - layer_start, 2, n, block_size, num_kv_heads, head_dim], contiguous
    """Pack the given blocks of layers ``[layer_start, layer_end)`` into one contiguous staging tensor.

    Order: layer-major, then key/value, then the blocks in ``block_ids`` order. This is the documented
    staging layout of ``torch.ops.duet.gather_kv_blocks``.
    """
    return kv_cache[layer_start:layer_end].index_select(2, block_ids.long()).contiguous()


def scatter_kv_blocks(
    staging: torch.Tensor,  # [layer_end - layer_start, 2, n, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int64
    layer_start: int,
    layer_end: int,
    kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
) -> None:
    """Inverse of ``gather_kv_blocks``: write the staged blocks back into the pool (in place)."""
    kv_cache[layer_start:layer_end].index_copy_(2, block_ids.long(), staging.to(kv_cache.dtype))
