"""RMSNorm in Triton: one launch instead of the half-dozen elementwise kernels the torch version makes.

Contract: same result as ``engine.models.layers.RMSNorm`` (normalise in float32, round to the input dtype,
then multiply by the weight in that dtype), up to float32 rounding of the reduction.

Grid ``(num_rows,)``: one program normalises one row of ``dim`` elements held whole in registers
(``dim`` <= 16384). Rows are either the tokens of a ``[num_tokens, dim]`` activation or the (token, head)
pairs of a ``[num_tokens, num_heads, head_dim]`` view (Qwen3's per-head q/k norm), whose token and head
strides are passed through: q and k are usually slices of the fused QKV output.
"""
from __future__ import annotations

import torch

from duet.kernels.triton_utils import (check_device, check_last_dim_contiguous, next_power_of_2, require_triton, tl,
                                       triton)

_NAME = "rms_norm"
MAX_DIM = 16384


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [num_tokens, num_heads, dim] (strided), or [num_tokens, dim] with num_heads = 1
    w_ptr,  # [dim]
    out_ptr,  # [num_tokens, num_heads, dim] contiguous
    num_heads,
    dim,
    eps,
    stride_xt, stride_xh,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    token = row // num_heads
    head = row % num_heads
    offs = tl.arange(0, BLOCK)
    mask = offs < dim
    x = tl.load(x_ptr + token * stride_xt + head * stride_xh + offs, mask=mask, other=0.0).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    # Two roundings, as in torch: the normalised row to the output dtype, then the product with the weight.
    # A product of two values of a 16-bit float type is exact in float32, so only the final cast rounds.
    y = (x * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * dim + offs, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [num_tokens, dim] or [num_tokens, num_heads, dim], last dim contiguous
    weight: torch.Tensor,  # [dim], x's dtype
    eps: float,
) -> torch.Tensor:  # x's shape, contiguous, x's dtype
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dimension. Raises ``ValueError`` on bad shapes."""
    require_triton(_NAME)
    if x.dim() not in (2, 3) or weight.shape != (x.shape[-1],):
        raise ValueError(f"{_NAME}: x must be [tokens, dim] or [tokens, heads, dim] and weight [dim], "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"{_NAME}: weight dtype {weight.dtype} != x dtype {x.dtype}")
    dim = x.shape[-1]
    if dim > MAX_DIM:
        raise ValueError(f"{_NAME}: dim {dim} > {MAX_DIM}")
    check_device(_rms_norm_kernel, _NAME, x, weight)
    check_last_dim_contiguous(_NAME, x=x, weight=weight)
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    num_rows = x3.shape[0] * x3.shape[1]
    if num_rows == 0:
        return out
    block = next_power_of_2(dim)
    _rms_norm_kernel[(num_rows,)](
        x3, weight, out, x3.shape[1], dim, eps, x3.stride(0), x3.stride(1),
        BLOCK=block, num_warps=max(1, min(16, block // 256)),
    )
    return out
