"""A layer's small ops on the CPU, one compiled call each: RMSNorm, residual add + RMSNorm, rotary, SiLU-and-mul,
KV store (``torch.ops.duet.*``, csrc/layer_ops.cpp).

Each replaces a chain of 3-20 torch ops whose per-op overhead is a large part of a small CPU decode step; the
results are those of ``kernels.reference`` (same float32 math and roundings, up to the order of the RMSNorm
sum). When the extension is missing or disabled the wrappers run those references and log one warning.
Inputs are CPU tensors; rows may be strided (slices of a fused projection), the last dimension contiguous.
"""
from __future__ import annotations

import torch

from duet.kernels import extension, reference

_OPS = ("rms_norm", "add_rms_norm", "rotary_embedding", "silu_and_mul", "store_kv")


def extension_available() -> bool:
    return extension.load_error() is None and extension.ops_defined(_OPS)


def _use_extension(device: torch.device) -> bool:
    return extension.use(_OPS, device, "CPU layer ops")


def _rows_ok(*tensors: torch.Tensor) -> bool:
    return all(t.dim() in (2, 3) and t.stride(-1) == 1 for t in tensors)


def rms_norm(
    x: torch.Tensor,  # [num_tokens, dim] or [num_tokens, num_heads, dim]
    weight: torch.Tensor,  # [dim]
    eps: float,
) -> torch.Tensor:  # x's shape and dtype, contiguous
    if _rows_ok(x) and _use_extension(x.device):
        out = torch.empty(x.shape, dtype=x.dtype)
        torch.ops.duet.rms_norm(x, weight, eps, out)
        return out
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor,  # [num_tokens, dim]
    residual: torch.Tensor,  # [num_tokens, dim]: overwritten with x + residual when compiled
    weight: torch.Tensor,  # [dim]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (rms_norm(x + residual), x + residual)
    """The caller gives up ``residual``: the compiled op writes the sum into it (no new tensor)."""
    if _rows_ok(x, residual) and _use_extension(x.device):
        out = torch.empty(x.shape, dtype=x.dtype)
        torch.ops.duet.add_rms_norm(x, residual, weight, eps, out)
        return out, residual
    return reference.add_rms_norm(x, residual, weight, eps)


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]: rotated in place when compiled
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]: rotated in place when compiled
    cos: torch.Tensor,  # [max_positions, head_dim // 2] float32
    sin: torch.Tensor,  # [max_positions, head_dim // 2] float32
) -> tuple[torch.Tensor, torch.Tensor]:  # rotated q, k
    if _rows_ok(q, k) and _use_extension(q.device):
        torch.ops.duet.rotary_embedding(positions, q, k, cos, sin)
        return q, k
    return reference.rotary_embedding(positions, q, k, cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * width] -> [num_tokens, width]
    if x.dim() == 2 and x.stride(-1) == 1 and _use_extension(x.device):
        out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
        torch.ops.duet.silu_and_mul(x, out)
        return out
    return reference.silu_and_mul(x)


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written
    slot_mapping: torch.Tensor,  # [num_tokens] int64; -1 = padding, skipped
) -> None:
    if key.dtype == k_cache.dtype and slot_mapping.dtype == torch.int64 and _use_extension(key.device):
        torch.ops.duet.store_kv(key, value, k_cache, v_cache, slot_mapping)
    else:
        reference.store_kv(key, value, k_cache, v_cache, slot_mapping)


# Shape-only implementations for tracing (the ops write into their arguments and return nothing), registered at
# import whenever the ops are (kernels.extension imports this module for torch).
if extension.ops_defined(_OPS):
    extension.register_fakes({name: lambda *args, **kwargs: None for name in _OPS})
