"""Rotary position embedding (neox style, rotate halves) for q and k in one Triton launch.

Contract: same result as ``engine.models.layers.RotaryEmbedding`` (rotate in float32 with the float32
cos/sin tables, round to the input dtype), up to float32 rounding.

Grid ``(num_tokens,)``: one program rotates every q and k head of one token, so the cos/sin rows of its
position are read once. The tile is ``[HEADS_PAD, HALF_PAD]`` over heads x half the head dim. q and k may
be strided views (slices of the fused QKV output); outputs are new contiguous tensors.
"""
from __future__ import annotations

import torch

from duet.kernels.triton_utils import (check_device, check_last_dim_contiguous, next_power_of_2, require_triton, tl,
                                       triton)

_NAME = "apply_rotary"


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, token, num_heads, stride_t, stride_h, cos, sin, half,
                  HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)[:, None]
    offs = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < num_heads) & (offs < half)
    src = src_ptr + token * stride_t + heads * stride_h + offs
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    dst = dst_ptr + (token * num_heads + heads) * (2 * half) + offs
    tl.store(dst, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr,  # [num_tokens, num_q_heads | num_k_heads, head_dim] (strided)
    q_out_ptr, k_out_ptr,  # the same shapes, contiguous
    pos_ptr,  # [num_tokens] int64
    cos_ptr, sin_ptr,  # [max_positions, head_dim // 2] float32, contiguous
    num_q_heads, num_k_heads, half,
    stride_qt, stride_qh, stride_kt, stride_kh,
    Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    pos = tl.load(pos_ptr + token)
    offs = tl.arange(0, HALF_PAD)[None, :]
    cos = tl.load(cos_ptr + pos * half + offs, mask=offs < half, other=0.0)  # [1, HALF_PAD]
    sin = tl.load(sin_ptr + pos * half + offs, mask=offs < half, other=0.0)
    _rotate_heads(q_ptr, q_out_ptr, token, num_q_heads, stride_qt, stride_qh, cos, sin, half, Q_HEADS_PAD, HALF_PAD)
    _rotate_heads(k_ptr, k_out_ptr, token, num_k_heads, stride_kt, stride_kh, cos, sin, half, K_HEADS_PAD, HALF_PAD)


def apply_rotary(
    positions: torch.Tensor,  # [num_tokens] int64
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim], last dim contiguous
    k: torch.Tensor,  # [num_tokens, num_k_heads, head_dim], last dim contiguous
    cos: torch.Tensor,  # [max_positions, head_dim // 2] float32
    sin: torch.Tensor,  # [max_positions, head_dim // 2] float32
) -> tuple[torch.Tensor, torch.Tensor]:  # rotated q, k: contiguous, their input dtypes
    """Rotate q and k at ``positions`` (must be < max_positions: not checked, that would need a sync)."""
    require_triton(_NAME)
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"{_NAME}: q {tuple(q.shape)} and k {tuple(k.shape)} must be [tokens, heads, head_dim]")
    head_dim = q.shape[2]
    if head_dim % 2 or cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim // 2:
        raise ValueError(f"{_NAME}: cos/sin must be [max_positions, head_dim // 2 = {head_dim // 2}]")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"{_NAME}: cos and sin must be contiguous float32")
    if positions.shape != (q.shape[0],) or positions.dtype != torch.int64:
        raise ValueError(f"{_NAME}: positions must be int64 [num_tokens={q.shape[0]}]")
    check_device(_rotary_kernel, _NAME, q, k, positions, cos, sin)
    check_last_dim_contiguous(_NAME, q=q, k=k)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.shape[0] == 0:
        return q_out, k_out
    half = head_dim // 2
    _rotary_kernel[(q.shape[0],)](
        q, k, q_out, k_out, positions, cos, sin, q.shape[1], k.shape[1], half,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        Q_HEADS_PAD=next_power_of_2(q.shape[1]), K_HEADS_PAD=next_power_of_2(k.shape[1]),
        HALF_PAD=next_power_of_2(half), num_warps=4,
    )
    return q_out, k_out
