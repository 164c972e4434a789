"""Building blocks shared by the decoder models: RMSNorm, rotary embeddings, gated MLP.

Under tensor parallelism a projection holds a slice of the checkpoint tensor; ``mark_shard`` records which,
so the loader reads only that slice. ``TPGroup`` is what the models need from a process group.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from duet.engine.model_config import RopeConfig
from duet.engine.parallel.layout import ParallelLayout
from duet.kernels import cpu_layers, cpu_linear, reference
from duet.kernels.activation import silu_and_mul
from duet.kernels.rms_norm import rms_norm
from duet.kernels.rotary import apply_rotary
from duet.kernels.triton_utils import TRITON_AVAILABLE


def _fused_kernels(x: torch.Tensor) -> bool:
    """CUDA tensors go through the Triton kernels (one launch per op); the torch code is the reference."""
    return x.is_cuda and TRITON_AVAILABLE


def _cpu_ops(x: torch.Tensor) -> bool:
    """CPU tensors go through the compiled ops of ``kernels.cpu_layers`` (one call per op; they run the torch
    references themselves when the extension is not built)."""
    return x.is_cpu


class TPGroup(Protocol):
    def all_reduce(self, x: torch.Tensor) -> None:
        """Sum ``x`` over the tensor-parallel ranks, in place; blocks until done (deadline: the group's)."""


def mark_shard(param: nn.Parameter, dim: int, start: int, full_size: int) -> None:
    """``param`` holds [start, start + its size) along ``dim`` of a checkpoint tensor ``full_size`` long there.

    For stacked expert parameters ``dim`` counts within one expert's tensor.
    """
    param.tp_shard = (dim, start, full_size)


@torch.no_grad()
def fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several projections of the same input, concatenated along outputs.

    The projections' parameters become views into the fused tensors, so they keep their names and values
    (the loader, tests and tensor-parallel shard marks still see them) while one GEMM computes all outputs.
    Returns (weight [sum(out), in], bias [sum(out)] or None).
    """
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    start = 0
    for lin in linears:
        end = start + lin.weight.shape[0]
        lin.weight.data = weight[start:end]
        if bias is not None:
            lin.bias.data = bias[start:end]
        start = end
    return weight, bias


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        if _fused_kernels(x) and x.dim() in (2, 3) and x.stride(-1) == 1:
            return rms_norm(x, self.weight, self.eps)
        if _cpu_ops(x):
            return cpu_layers.rms_norm(x, self.weight, self.eps)
        # Normalise in float32 like the reference implementations, then cast back before the weight.
        return reference.rms_norm(x, self.weight, self.eps)

    def add_forward(
        self,
        x: torch.Tensor,  # [num_tokens, dim]: the residual stream
        residual: torch.Tensor,  # [num_tokens, dim]: a sub-layer's output, given up (the sum may be written into it)
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (self(x + residual), x + residual)
        if _cpu_ops(x):
            return cpu_layers.add_rms_norm(x, residual, self.weight, self.eps)
        summed = x + residual
        return self(summed), summed


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:  # [head_dim // 2] float32
    """Rotary inverse frequencies, with Llama-3 scaling of long wavelengths when configured."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type != "llama3":
        return inv_freq
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves) with a precomputed cos/sin table.

    On CPU tensors q and k are rotated in place (and returned); elsewhere new tensors are returned."""

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, rope)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_positions, head_dim // 2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens] int64
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if _fused_kernels(q):
            return apply_rotary(positions, q, k, self.cos, self.sin)
        if _cpu_ops(q):  # in place: q and k are slices of this layer's fresh QKV output
            return cpu_layers.rotary_embedding(positions, q, k, self.cos, self.sin)
        return reference.rotary_embedding(positions, q, k, self.cos, self.sin)


class GatedMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(
        self, hidden_size: int, intermediate_size: int,
        layout: ParallelLayout = ParallelLayout(), tp_group: TPGroup | None = None,
    ):
        super().__init__()
        # Column-parallel gate/up, row-parallel down: each rank's partial down output is summed across ranks.
        start, width = layout.tp_split(intermediate_size)
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.up_proj = nn.Linear(hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, hidden_size, bias=False)
        if width != intermediate_size:
            mark_shard(self.gate_proj.weight, 0, start, intermediate_size)
            mark_shard(self.up_proj.weight, 0, start, intermediate_size)
            mark_shard(self.down_proj.weight, 1, start, intermediate_size)
        self.tp_group = tp_group if layout.tp_size > 1 else None
        self.gate_up: torch.Tensor | None = None  # [2 * width, hidden]: see fuse()
        self.gate_up_packed = self.down_packed = None  # CPU: oneDNN-packed weights (kernels.cpu_linear)

    def fuse(self) -> None:
        """After loading, before the first forward (``build_model`` does it): one GEMM for gate and up, and
        on the CPU the weights packed for oneDNN."""
        self.gate_up, _ = fuse_linears(self.gate_proj, self.up_proj)
        self.gate_up_packed = cpu_linear.pack(self.gate_up)
        self.down_packed = cpu_linear.pack(self.down_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden]
        gate_up = cpu_linear.linear(x, self.gate_up, None, self.gate_up_packed)  # [num_tokens, 2 * width]
        if _fused_kernels(x):
            act = silu_and_mul(gate_up)
        elif _cpu_ops(x):
            act = cpu_layers.silu_and_mul(gate_up)
        else:
            act = reference.silu_and_mul(gate_up)
        out = cpu_linear.linear(act, self.down_proj.weight, None, self.down_packed)
        if self.tp_group is not None:
            self.tp_group.all_reduce(out)
        return out
