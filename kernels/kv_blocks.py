"""Pack a request's KV blocks into one contiguous staging slab, and unpack a slab into the paged pool.

A prefill server gathers the blocks of a layer range into a slab (one kernel launch) and posts one
transfer write for it; the decode server scatters the arrived slab into its own blocks. Staging layout::

    staging  # [layer_end - layer_start, 2, len(block_ids), block_size, num_kv_heads, head_dim]

layer-major, then key/value, then the blocks in ``block_ids`` order: exactly
``kernels.reference.gather_kv_blocks``. The compiled ops ``torch.ops.duet.gather_kv_blocks`` /
``scatter_kv_blocks`` (csrc/, built into ``kernels._C``) do the work; when the extension is missing or
disabled (``kernels.extension.use_extension(False)``, which engines call for ``DUET_DISABLE_EXTENSION=1``) these wrappers run the torch references instead and log one
warning per process (``kernels.extension``). Both paths copy bytes, so results are bitwise identical.

A pool that is a strided view rather than a contiguous tensor (vLLM's head-major CPU blocks seen through
``as_strided``, see ``transfer.vllm_kv_port``) takes the reference path: the compiled ops index raw memory
and require a contiguous pool. The bytes produced are the same either way.

Block ids: int32 or int64, on the pool's device, each in ``[0, num_blocks)``. The CPU op raises on an
out-of-range id and, for scatter, on a repeated id; on CUDA an out-of-range id is a device-side assert
(like ``index_select``) and repeated scatter ids leave that block with the bytes of one of them.
"""
from __future__ import annotations

import torch

from duet.kernels import extension, reference

_OPS = ("gather_kv_blocks", "scatter_kv_blocks")


def extension_available() -> bool:
    """True when the compiled ``torch.ops.duet`` KV block ops are loaded (and not disabled)."""
    return extension.load_error() is None and extension.ops_defined(_OPS)


def _use_extension(device: torch.device) -> bool:
    return extension.use(_OPS, device, "KV block ops")


def gather_kv_blocks(
    kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int64 (or int32)
    layer_start: int,
    layer_end: int,
    out: torch.Tensor | None = None,  # [layer_end - layer_start, 2, n, block_size, num_kv_heads, head_dim]
) -> torch.Tensor:  # out (allocated when not given)
    """Copy blocks ``block_ids`` of layers ``[layer_start, layer_end)`` into one contiguous slab."""
    if out is None:
        out = kv_cache.new_empty((max(layer_end - layer_start, 0), 2, block_ids.numel(), *kv_cache.shape[3:]))
    if kv_cache.is_contiguous() and _use_extension(kv_cache.device):
        torch.ops.duet.gather_kv_blocks(kv_cache, block_ids, layer_start, layer_end, out)
    else:
        out.copy_(reference.gather_kv_blocks(kv_cache, block_ids, layer_start, layer_end))
    return out


def scatter_kv_blocks(
    staging: torch.Tensor,  # [layer_end - layer_start, 2, n, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor,  # [n] int64 (or int32), distinct
    layer_start: int,
    layer_end: int,
    kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], written
) -> None:
    """Inverse of ``gather_kv_blocks``: write the slab's blocks into the pool in place."""
    if kv_cache.is_contiguous() and _use_extension(kv_cache.device):
        torch.ops.duet.scatter_kv_blocks(staging, block_ids, layer_start, layer_end, kv_cache)
    else:
        reference.scatter_kv_blocks(staging, block_ids, layer_start, layer_end, kv_cache)


def _check_fake_args(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, layer_start: int, layer_end: int, staging: torch.Tensor
) -> None:
    """What the C++ checks say about shapes and dtypes, for tracing (values of block_ids are unknown)."""
    torch._check(kv_cache.dim() == 6 and kv_cache.shape[1] == 2, lambda: "kv_cache must be [L, 2, B, S, H, D]")
    torch._check(block_ids.dim() == 1, lambda: "block_ids must be 1-D")
    torch._check(block_ids.dtype in (torch.int32, torch.int64), lambda: "block_ids must be int32 or int64")
    torch._check(
        0 <= layer_start <= layer_end <= kv_cache.shape[0], lambda: "need 0 <= layer_start <= layer_end <= L"
    )
    expected = (layer_end - layer_start, 2, block_ids.shape[0], *kv_cache.shape[3:])
    torch._check(tuple(staging.shape) == expected, lambda: f"staging must have shape {expected}")
    torch._check(staging.dtype == kv_cache.dtype, lambda: "staging must have kv_cache's dtype")


def _gather_fake(kv_cache, block_ids, layer_start, layer_end, out) -> None:
    _check_fake_args(kv_cache, block_ids, layer_start, layer_end, out)


def _scatter_fake(staging, block_ids, layer_start, layer_end, kv_cache) -> None:
    _check_fake_args(kv_cache, block_ids, layer_start, layer_end, staging)


# Fake (meta) implementations, so torch.compile and FakeTensor can trace through the ops; registered at import
# whenever the ops are (kernels.extension imports this module for torch).
if extension.ops_defined(_OPS):
    extension.register_fakes({"gather_kv_blocks": _gather_fake, "scatter_kv_blocks": _scatter_fake})
