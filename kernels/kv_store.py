"""KV cache store in Triton: write each new token's K and V into its slot of the paged cache.

Contract: same effect as ``kernels.reference.store_kv``. Slot ``s`` is token ``s % block_size`` of block
``s // block_size``; slot -1 marks a padding token, which is skipped (its cache bytes stay untouched).

Grid and tiling
---------------
Grid ``(num_tokens,)``: one program copies one token's whole ``[num_kv_heads, head_dim]`` K and V rows
(a few KiB at most: 8 x 128 bf16 = 2 KiB each), which is enough work per program for a pure copy and
keeps the slot lookup and padding test to one per token. The tile is ``[HEADS_PAD, DIM_PAD]`` with
masks, so any head count and head size work; ``head_dim`` is unit-stride on both sides so the row
copies vectorise, while token and head strides are passed through (``key``/``value`` are usually views
into a fused QKV projection output, not contiguous tensors).
"""
from __future__ import annotations

import torch

from duet.kernels.triton_utils import (
    check_device,
    check_last_dim_contiguous,
    next_power_of_2,
    require_triton,
    tl,
    triton,
)

_NAME = "store_kv"


@triton.jit
def _store_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int32 or int64; -1 = padding
    stride_key_token, stride_key_head,
    stride_value_token, stride_value_head,
    stride_k_block, stride_k_token, stride_k_head,
    stride_v_block, stride_v_token, stride_v_head,
    num_kv_heads,
    head_dim,
    BLOCK_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, DIM_PAD)
    mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < head_dim)
    row = offs_h[:, None]
    col = offs_d[None, :]
    k = tl.load(key_ptr + token * stride_key_token + row * stride_key_head + col, mask=mask)
    v = tl.load(value_ptr + token * stride_value_token + row * stride_value_head + col, mask=mask)
    k_dst = k_cache_ptr + block * stride_k_block + offset * stride_k_token + row * stride_k_head + col
    v_dst = v_cache_ptr + block * stride_v_block + offset * stride_v_token + row * stride_v_head + col
    tl.store(k_dst, k, mask=mask)
    tl.store(v_dst, v, mask=mask)


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64; -1 = padding, skipped
) -> None:
    """Write ``key[t]``/``value[t]`` into slot ``slot_mapping[t]`` of the caches, in place.

    K/V are cast to the cache dtype (an extra copy when the dtypes differ). Slots must be below
    ``num_blocks * block_size`` and distinct among non-padding tokens (not checked: that would need a
    device sync). Raises ``ValueError`` on malformed arguments, ``RuntimeError`` when Triton is missing or
    the tensors are on a device the kernel cannot run on.
    """
    require_triton(_NAME)
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"{_NAME}: key {tuple(key.shape)} and value {tuple(value.shape)} must be equal 3-D shapes")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"{_NAME}: k_cache and v_cache must be 4-D with equal shapes and dtypes")
    if key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"{_NAME}: key heads/dim {tuple(key.shape[1:])} != cache heads/dim {tuple(k_cache.shape[2:])}"
        )
    if slot_mapping.shape != (key.shape[0],) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{_NAME}: slot_mapping must be int32/int64 [num_tokens={key.shape[0]}]")
    check_device(_store_kv_kernel, _NAME, key, value, k_cache, v_cache, slot_mapping)
    check_last_dim_contiguous(_NAME, key=key, value=value, k_cache=k_cache, v_cache=v_cache)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.dtype != k_cache.dtype:
        # Cast in torch so rounding is torch's round-to-nearest-even on every path: the Triton
        # interpreter truncates fp32 -> bf16. The engine stores in the cache dtype, so this is rare.
        key, value = key.to(k_cache.dtype), value.to(k_cache.dtype)
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_kv_heads,
        head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        HEADS_PAD=next_power_of_2(num_kv_heads),
        DIM_PAD=next_power_of_2(head_dim),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )
