"""Paged prefill attention in Triton: variable-length batches of new tokens over a cached prefix + themselves.

Contract: same result as ``kernels.reference.paged_attention``. Sequence s owns query rows
``cu_seqlens_q[s]:cu_seqlens_q[s + 1]`` (``q_len`` tokens), which are its last ``q_len`` positions; their
K/V are already in the paged cache (the engine stores K/V before attention). Query token i sits at
position ``p = seq_len - q_len + i`` and attends to cache positions ``0..p``. Softmax is in float32.

Grid and tiling
---------------
Grid ``(cdiv(max_seqlen_q, TOKENS_PER_TILE), num_kv_heads, num_seqs)``. One program owns
``TOKENS_PER_TILE`` consecutive query tokens of one sequence times *all* ``group`` query heads of one
KV head, laid out as the ``BLOCK_M = TOKENS_PER_TILE * GROUP_PAD`` rows of a single Q tile (row r is
token ``r // GROUP_PAD``, head ``r % GROUP_PAD``). Every K/V tile loaded from the paged cache therefore
feeds ``group`` heads' worth of tensor-core work instead of being re-read per query head, which is what
makes GQA prefill cheaper than MHA prefill. Programs whose tokens lie past their sequence's ``q_len``
exit at once; ``max_seqlen_q`` comes from the host so sizing the grid needs no device sync.

The program walks KV positions in ``BLOCK_N`` tiles, looking each token's physical block up in the
block table (``position // block_size``), so tile size and cache block size are independent. The walk
has two phases: tiles that end at or before the tile's first query position are visible to every row and
run without any mask; the remaining tiles up to the tile's last query position apply the causal mask.
Tile indices run in reverse program order so the heaviest (latest-token) tiles start first and the
causal imbalance does not leave a long tail of busy SMs.
"""
from __future__ import annotations

import math

import torch

from duet.kernels.triton_utils import (
    check_device,
    check_last_dim_contiguous,
    check_power_of_two,
    dot,
    dot_options,
    is_interpreted,
    next_power_of_2,
    require_triton,
    tl,
    triton,
)

_NAME = "paged_prefill_attention"
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _attend_tile(
    acc, m_i, l_i,  # running state: [BLOCK_M, HEAD_DIM], [BLOCK_M], [BLOCK_M] fp32
    q,  # [BLOCK_M, HEAD_DIM]
    q_pos,  # [BLOCK_M] absolute position of each row's token
    start_n, kv_end,  # this KV tile starts at start_n; positions >= kv_end are masked (CAUSAL only)
    k_base, v_base,  # cache pointers already offset to this program's KV head
    bt_row,  # this sequence's block-table row
    qk_scale,
    stride_k_block, stride_k_token, stride_v_block, stride_v_token,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if CAUSAL:
        kv_ok = offs_n < kv_end
        block_ids = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=kv_ok, other=0).to(tl.int64)
    else:
        block_ids = tl.load(bt_row + offs_n // BLOCK_SIZE).to(tl.int64)
    token = offs_n % BLOCK_SIZE
    k_ptrs = k_base + block_ids[:, None] * stride_k_block + token[:, None] * stride_k_token + offs_d[None, :]
    v_ptrs = v_base + block_ids[:, None] * stride_v_block + token[:, None] * stride_v_token + offs_d[None, :]
    if CAUSAL:
        k = tl.load(k_ptrs, mask=kv_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=kv_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * qk_scale  # [BLOCK_M, BLOCK_N]
    if CAUSAL:
        s = tl.where(kv_ok[None, :] & (offs_n[None, :] <= q_pos[:, None]), s, float("-inf"))
    # Position 0 is in the first tile every program visits and every row sees it, so m_new is finite.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    query_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    cu_seqlens_q_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    out_ptr,  # [num_tokens, num_heads, head_dim]
    qk_scale,  # softmax scale * log2(e): scores go straight into exp2
    stride_q_token, stride_q_head,
    stride_o_token, stride_o_head,
    stride_k_block, stride_k_token, stride_k_head,
    stride_v_block, stride_v_token, stride_v_head,
    stride_bt_seq,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # TOKENS_PER_TILE * GROUP_PAD
    TOKENS_PER_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)

    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    first_token = tile * TOKENS_PER_TILE
    if first_token >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # cached prefix before the new tokens

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    token = first_token + offs_m // GROUP_PAD
    g = offs_m % GROUP_PAD
    heads = kv_head * GROUP + g
    row_ok = (token < q_len) & (g < GROUP)
    q_pos = context_len + token
    q = tl.load(
        query_ptr + (q_start + token)[:, None] * stride_q_token + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=row_ok[:, None], other=0.0,
    )  # [BLOCK_M, HEAD_DIM]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = k_cache_ptr + kv_head * stride_k_head
    v_base = v_cache_ptr + kv_head * stride_v_head
    bt_row = block_tables_ptr + seq * stride_bt_seq

    # Phase 1: whole tiles at or before the first row's position, visible to every row: no masks.
    last_token = tl.minimum(first_token + TOKENS_PER_TILE, q_len) - 1
    unmasked_end = ((context_len + first_token + 1) // BLOCK_N) * BLOCK_N
    for start_n in range(0, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, start_n, unmasked_end, k_base, v_base, bt_row, qk_scale,
            stride_k_block, stride_k_token, stride_v_block, stride_v_token,
            BLOCK_SIZE, HEAD_DIM, BLOCK_N, False, DOT_PRECISION, DOT_UPCAST,
        )
    # Phase 2: the diagonal band, up to the last valid row's position.
    kv_end = context_len + last_token + 1
    for start_n in range(unmasked_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, start_n, kv_end, k_base, v_base, bt_row, qk_scale,
            stride_k_block, stride_k_token, stride_v_block, stride_v_token,
            BLOCK_SIZE, HEAD_DIM, BLOCK_N, True, DOT_PRECISION, DOT_UPCAST,
        )

    out = acc / l_i[:, None]
    tl.store(
        out_ptr + (q_start + token)[:, None] * stride_o_token + heads[:, None] * stride_o_head + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None],
    )


def _tile_config(head_dim: int, group_pad: int, interpreted: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M rows, BLOCK_N, num_warps, num_stages). Untuned GPU starting points: 128 x 64 tiles as in
    FlashAttention-2 for head_dim <= 128, halved at 256 so K/V tiles still fit shared memory. In the
    interpreter every Triton op is a numpy call, so time grows with the tile count: 32 x 16 keeps CPU
    tests fast while small test shapes still cross several tile and block boundaries."""
    if interpreted:
        block_m, block_n, num_warps, num_stages = 32, 16, 1, 1
    elif head_dim <= 64:
        block_m, block_n, num_warps, num_stages = 128, 64, 4, 3
    elif head_dim <= 128:
        block_m, block_n, num_warps, num_stages = 128, 64, 8, 3
    else:
        block_m, block_n, num_warps, num_stages = 64, 32, 8, 2
    return max(block_m, group_pad), block_n, num_warps, num_stages


def _validate(query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, max_seqlen_q, out) -> None:
    if query.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"{_NAME}: query must be 3-D and caches 4-D, got {tuple(query.shape)}, {tuple(k_cache.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{_NAME}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if query.dtype not in _SUPPORTED_DTYPES or k_cache.dtype != query.dtype or v_cache.dtype != query.dtype:
        raise ValueError(f"{_NAME}: query and cache dtypes must be equal and one of {_SUPPORTED_DTYPES}")
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"{_NAME}: cache head_dim {k_cache.shape[3]} != query head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{_NAME}: num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
    check_power_of_two(_NAME, "head_dim", head_dim, 16)
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if seq_lens.dim() != 1 or seq_lens.dtype != torch.int32:
        raise ValueError(f"{_NAME}: seq_lens must be int32 [num_seqs]")
    if cu_seqlens_q.shape != (num_seqs + 1,) or cu_seqlens_q.dtype != torch.int32:
        raise ValueError(f"{_NAME}: cu_seqlens_q must be int32 [num_seqs + 1 = {num_seqs + 1}]")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"{_NAME}: block_tables must be int32 [num_seqs={num_seqs}, max_blocks]")
    if not isinstance(max_seqlen_q, int) or max_seqlen_q < 0:
        raise ValueError(f"{_NAME}: max_seqlen_q must be an int >= 0, got {max_seqlen_q!r}")
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype):
        raise ValueError(f"{_NAME}: out must match query's shape and dtype")


def paged_prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], sequences packed back to back
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32: query rows of seq s are cu[s]:cu[s+1]
    seq_lens: torch.Tensor,  # [num_seqs] int32: tokens of seq s in the cache, the new ones included
    scale: float,
    max_seqlen_q: int,  # >= every q_len; host-side so the grid needs no device sync
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]; allocated when None
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new tokens over its paged context; returns ``out``.

    Rows ``0 .. cu_seqlens_q[-1]`` of ``out`` are written; rows past that (batch padding) are left as
    they were. The caller guarantees ``q_len <= seq_len``, ``q_len <= max_seqlen_q`` and valid block ids
    for the first ``ceil(seq_len / block_size)`` table entries (not checked: that would need a device
    sync). Raises ``ValueError`` on malformed arguments, ``RuntimeError`` when Triton is missing or the
    tensors are on a device the kernel cannot run on.
    """
    require_triton(_NAME)
    _validate(query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, max_seqlen_q, out)
    if out is None:
        out = torch.empty_like(query)
    check_device(_prefill_kernel, _NAME, query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out)
    check_last_dim_contiguous(
        _NAME, query=query, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, out=out
    )
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or max_seqlen_q == 0:
        return out
    group = num_heads // num_kv_heads
    group_pad = next_power_of_2(group)
    interpreted = is_interpreted(_prefill_kernel)
    block_m, block_n, num_warps, num_stages = _tile_config(head_dim, group_pad, interpreted)
    dot_precision, dot_upcast = dot_options(query.dtype, interpreted)
    tokens_per_tile = block_m // group_pad
    grid = (triton.cdiv(max_seqlen_q, tokens_per_tile), num_kv_heads, num_seqs)
    _prefill_kernel[grid](
        query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out,
        scale * math.log2(math.e),
        query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        BLOCK_SIZE=block_size,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        TOKENS_PER_TILE=tokens_per_tile,
        BLOCK_N=block_n,
        DOT_PRECISION=dot_precision,
        DOT_UPCAST=dot_upcast,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
