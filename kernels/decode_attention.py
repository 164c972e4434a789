"""Paged decode attention in Triton: one new query token per sequence over its whole paged KV context.

Contract: same result as ``kernels.reference.paged_decode_attention`` (softmax in float32).

Grid and tiling
---------------
Main kernel, grid ``(num_seqs, num_kv_heads, num_splits)``. One program owns one KV head of one
sequence and *all* ``group = num_heads // num_kv_heads`` query heads that read it, so each K/V byte is
loaded from memory once for the whole group (decode is bound by K/V bandwidth, not FLOPs). The group's
queries are one ``[GROUP_PAD, head_dim]`` tile, padded to at least 16 rows because ``tl.dot`` needs 16
along every dimension; the padded rows cost tensor-core work that is free next to the memory traffic.
The program walks its context range in ``BLOCK_N``-token tiles. Each token's physical block is looked
up in the block table (``position // block_size``), so the tile size is independent of the cache's block
size and one tile may span several (non-contiguous) blocks; rows within a tile are ``head_dim``-contiguous
loads. Scores and the running (max, sum, acc) stay in float32 (online softmax, base-2 exponentials).

Split-K (flash-decoding): with few sequences, ``num_seqs * num_kv_heads`` programs leave most SMs
idle while each walks a long context. Splitting each context into ``num_splits`` contiguous ranges of
whole tiles gives every range its own program, which writes an un-normalised partial (max, sum, acc)
in float32; a second kernel, grid ``(num_seqs, num_heads)``, rescales the partials to a common max and
normalises. Splits past a short sequence's end write (-inf, 0, 0) and drop out of the reduction.
``num_splits=None`` picks the count from static shapes only (batch, KV heads, block-table width), never
from ``seq_lens`` values, so the launch needs no device-to-host sync and is CUDA-graph capturable.

A sequence with ``seq_len == 0`` (a CUDA-graph padding slot) gets zeros, as in the reference.
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
    num_parallel_units,
    require_triton,
    tl,
    triton,
)

_NAME = "paged_decode_attention"
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Below this many context tokens per split, the extra reduction pass and per-program set-up cost more
# than the added parallelism wins (a starting point, to be tuned on the GPU with bench.attention).
MIN_TOKENS_PER_SPLIT = 256
# Bounds the partial buffers and the reduction tile ([MAX_SPLITS, head_dim] fp32 per program).
MAX_SPLITS = 32


@triton.jit
def _decode_kernel(
    query_ptr,  # [num_seqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    out_ptr,  # [num_seqs, num_heads, head_dim]            written when not IS_SPLIT
    part_max_ptr,  # [num_seqs, num_heads, num_splits] fp32      written when IS_SPLIT (log2 domain)
    part_sum_ptr,  # [num_seqs, num_heads, num_splits] fp32
    part_acc_ptr,  # [num_seqs, num_heads, num_splits, head_dim] fp32, un-normalised
    qk_scale,  # softmax scale * log2(e): scores go straight into exp2
    num_heads,
    num_splits,
    stride_q_seq, stride_q_head,
    stride_o_seq, stride_o_head,
    stride_k_block, stride_k_token, stride_k_head,
    stride_v_block, stride_v_token, stride_v_head,
    stride_bt_seq,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    # Whole tiles per split, so only the sequence's last tile is ever partial.
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + offs_g
    head_ok = offs_g < GROUP
    q = tl.load(
        query_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=head_ok[:, None], other=0.0,
    )  # [GROUP_PAD, HEAD_DIM]

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    bt_row = block_tables_ptr + seq * stride_bt_seq
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid = offs_n < end
        # Masked so table entries past the sequence (garbage or -1) are never dereferenced.
        block_ids = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        token = offs_n % BLOCK_SIZE
        k = tl.load(
            k_cache_ptr + block_ids[:, None] * stride_k_block + token[:, None] * stride_k_token
            + kv_head * stride_k_head + offs_d[None, :],
            mask=valid[:, None], other=0.0,
        )  # [BLOCK_N, HEAD_DIM]
        v = tl.load(
            v_cache_ptr + block_ids[:, None] * stride_v_block + token[:, None] * stride_v_token
            + kv_head * stride_v_head + offs_d[None, :],
            mask=valid[:, None], other=0.0,
        )
        s = dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * qk_scale  # [GROUP_PAD, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        # Every tile holds at least one valid token, so m_new is finite and exp2 never sees inf - inf.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
        m_i = m_new

    if IS_SPLIT:
        part = (seq * num_heads + heads) * num_splits + split  # [GROUP_PAD]
        tl.store(part_max_ptr + part, m_i, mask=head_ok)
        tl.store(part_sum_ptr + part, l_i, mask=head_ok)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=head_ok[:, None])
    else:
        # l_i == 0 only for an empty sequence; dividing by 1 then leaves the zeros the reference gives.
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + seq * stride_o_seq + heads[:, None] * stride_o_head + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None],
        )


@triton.jit
def _reduce_splits_kernel(
    part_max_ptr,  # [num_seqs, num_heads, num_splits] fp32 (log2 domain)
    part_sum_ptr,  # [num_seqs, num_heads, num_splits] fp32
    part_acc_ptr,  # [num_seqs, num_heads, num_splits, head_dim] fp32
    out_ptr,  # [num_seqs, num_heads, head_dim]
    num_heads,
    num_splits,
    stride_o_seq, stride_o_head,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    split_ok = offs_s < num_splits
    part = (seq * num_heads + head) * num_splits + offs_s  # [SPLITS_PAD]
    m = tl.load(part_max_ptr + part, mask=split_ok, other=float("-inf"))
    l = tl.load(part_sum_ptr + part, mask=split_ok, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=split_ok[:, None], other=0.0)
    m_all = tl.max(m, axis=0)
    # All splits empty (seq_len == 0): use 0 as the common max so weights are exp2(-inf) = 0, not NaN.
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.math.exp2(m - m_all)  # [SPLITS_PAD]; 0 for empty splits
    l_all = tl.sum(w * l, axis=0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(l_all > 0.0, l_all, 1.0)
    tl.store(out_ptr + seq * stride_o_seq + head * stride_o_head + offs_d, out.to(out_ptr.dtype.element_ty))


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_tokens: int, num_units: int) -> int:
    """Splits per sequence so that ``num_seqs * num_kv_heads * splits`` programs fill ``num_units``.

    ``max_context_tokens`` is the block-table capacity (an upper bound on every ``seq_len``), so the
    choice depends on shapes only. Each split keeps at least ``MIN_TOKENS_PER_SPLIT`` tokens of that
    bound, and there are never more than ``MAX_SPLITS``.
    """
    num_programs = max(1, num_seqs * num_kv_heads)
    if num_programs >= num_units:
        return 1
    splits = min(
        math.ceil(num_units / num_programs),
        math.ceil(max_context_tokens / MIN_TOKENS_PER_SPLIT),
        MAX_SPLITS,
    )
    return max(1, splits)


def _tile_config(head_dim: int, interpreted: bool) -> tuple[int, int]:
    """(BLOCK_N, num_warps). Untuned GPU defaults: 64-token tiles keep K+V of one tile (2 x 64 x 128
    bf16 = 32 KiB) in registers at head_dim 128; halve at 256. The interpreter runs one numpy op per
    Triton op, so small tiles there only matter for making tests cross tile boundaries."""
    if interpreted:
        return 16, 1
    return (64 if head_dim <= 128 else 32), 4


def _validate(query, k_cache, v_cache, block_tables, seq_lens, out, num_splits) -> None:
    if query.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"{_NAME}: query must be 3-D and caches 4-D, got {tuple(query.shape)}, {tuple(k_cache.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{_NAME}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if query.dtype not in _SUPPORTED_DTYPES or k_cache.dtype != query.dtype or v_cache.dtype != query.dtype:
        raise ValueError(f"{_NAME}: query and cache dtypes must be equal and one of {_SUPPORTED_DTYPES}")
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"{_NAME}: cache head_dim {k_cache.shape[3]} != query head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{_NAME}: num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
    check_power_of_two(_NAME, "head_dim", head_dim, 16)
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"{_NAME}: block_tables must be int32 [num_seqs={num_seqs}, max_blocks]")
    if seq_lens.shape != (num_seqs,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"{_NAME}: seq_lens must be int32 [num_seqs={num_seqs}]")
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype):
        raise ValueError(f"{_NAME}: out must match query's shape and dtype")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"{_NAME}: num_splits must be None or an int >= 1, got {num_splits!r}")


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]: one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, the new token included (its K/V already stored)
    scale: float,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim]; allocated when None
    num_splits: int | None = None,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """Decode attention over the paged cache; ``out`` is written in full and returned.

    ``num_splits`` forces the split-K factor (1 = single pass); None chooses from the device's SM count
    and the static shapes. ``seq_lens[s]`` must not exceed ``block_tables.shape[1] * block_size`` and the
    table's first ``ceil(seq_len / block_size)`` entries must be valid block ids (not checked: checking
    would need a device sync). Raises ``ValueError`` on malformed arguments, ``RuntimeError`` when Triton
    is missing or the tensors are on a device the kernel cannot run on.
    """
    require_triton(_NAME)
    _validate(query, k_cache, v_cache, block_tables, seq_lens, out, num_splits)
    if out is None:
        out = torch.empty_like(query)
    device = check_device(_decode_kernel, _NAME, query, k_cache, v_cache, block_tables, seq_lens, out)
    check_last_dim_contiguous(
        _NAME, query=query, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, out=out
    )
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    interpreted = is_interpreted(_decode_kernel)
    block_n, num_warps = _tile_config(head_dim, interpreted)
    dot_precision, dot_upcast = dot_options(query.dtype, interpreted)
    if num_splits is None:
        num_splits = choose_num_splits(
            num_seqs, num_kv_heads, block_tables.shape[1] * block_size, num_parallel_units(device)
        )
    is_split = num_splits > 1
    if is_split:
        part_max = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=device)
    else:
        part_max = part_sum = part_acc = out  # never touched: IS_SPLIT is a compile-time False
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens, out, part_max, part_sum, part_acc,
        scale * math.log2(math.e), num_heads, num_splits,
        query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        BLOCK_SIZE=block_size,
        GROUP=group,
        GROUP_PAD=max(16, next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        IS_SPLIT=is_split,
        DOT_PRECISION=dot_precision,
        DOT_UPCAST=dot_upcast,
        num_warps=num_warps,
    )
    if is_split:
        _reduce_splits_kernel[(num_seqs, num_heads)](
            part_max, part_sum, part_acc, out, num_heads, num_splits,
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim,
            SPLITS_PAD=next_power_of_2(num_splits),
            num_warps=num_warps,
        )
    return out
