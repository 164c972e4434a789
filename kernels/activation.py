"""SwiGLU's ``silu(gate) * up`` in Triton, on the fused gate/up projection output: one launch, one pass.

Contract: same result as ``F.silu(gate) * up`` in the input dtype (silu computed in float32 and rounded,
then the product rounded), up to float32 rounding of ``exp``.

Grid ``(num_tokens, cdiv(width, BLOCK))``: each program handles ``BLOCK`` columns of one token's row of
``[num_tokens, 2 * width]`` (gate in the first half, up in the second).
"""
from __future__ import annotations

import torch

from duet.kernels.triton_utils import check_device, require_triton, tl, triton

_NAME = "silu_and_mul"
BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, width, stride_x, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < width
    gate = tl.load(x_ptr + token * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + token * stride_x + width + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + token * width + offs, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * width] -> [num_tokens, width]
    """``silu(x[:, :width]) * x[:, width:]``; rows of ``x`` may be strided, columns must be contiguous."""
    require_triton(_NAME)
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"{_NAME}: x must be [tokens, 2 * width], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"{_NAME}: x must have a contiguous last dimension")
    check_device(_silu_and_mul_kernel, _NAME, x)
    width = x.shape[1] // 2
    out = torch.empty(x.shape[0], width, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    _silu_and_mul_kernel[(x.shape[0], triton.cdiv(width, BLOCK))](x, out, width, x.stride(0), BLOCK=BLOCK, num_warps=4)
    return out
