"""vLLM's per-layer KV caches as a ``KVPort``: Duet's gather and scatter ops over views of vLLM's blocks.

vLLM keeps one tensor per attention layer. ``pool_views`` shows its keys and its values each as a
``[1, 1, num_blocks, block_size, num_kv_heads, head_dim]`` view (strided where vLLM's blocks are head-major or
its keys transposed), so the slabs produced and consumed here are exactly the native engine's
(``transfer.kv_port``): a native server is a valid peer of a vLLM one.
"""
from __future__ import annotations

import re

import torch

from duet.kernels.kv_blocks import gather_kv_blocks, scatter_kv_blocks
from duet.transfer.kv_port import KVPort

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_order(names: list[str]) -> list[str]:
    """Layer names sorted by the layer index in them (``model.layers.12.self_attn.attn`` -> 12)."""
    def key(item: tuple[int, str]) -> tuple[int, int]:
        pos, name = item
        m = _LAYER_INDEX.search(name)
        return (int(m.group(1)) if m else pos, pos)

    return [name for _, name in sorted(enumerate(names), key=key)]


CACHE_LAYOUTS = ("flash", "cpu_vec")


def pool_views(kv: torch.Tensor, num_kv_heads: int, head_dim: int,
               layout: str = "cpu_vec") -> tuple[torch.Tensor, torch.Tensor]:
    """One vLLM layer cache as its keys and its values, each ``[1, 1, num_blocks, block_size, heads, head_dim]``
    (views, no copy), so that a slab layer ``[1, 2, n, block_size, heads, head_dim]`` is one gather of each.

    vLLM 0.32 gives a layer's cache as ``[num_blocks, heads, block_size, 2 * head_dim]`` (logical order; the
    memory order is its ``KVCacheLayout``: ``HND`` is that order, ``NHD`` is ``[blocks, block_size, heads, ...]``
    seen through a permutation, so any strides are fine here). What the last dimension holds depends on the
    attention backend (``layout``):

    - ``flash`` (FlashAttention on GPU): the keys then the values, each ``[head_dim]`` per token and head;
    - ``cpu_vec`` (vLLM's CPU attention, ``vec`` ISA): per block and head, the keys as ``[head_dim, block_size]``
      (transposed), then the values as ``[block_size, head_dim]``; the tensor must be contiguous.

    Older vLLMs' ``[2, num_blocks, block_size, heads, head_dim]`` caches are read as they are.
    """
    if layout not in CACHE_LAYOUTS:
        raise ValueError(f"layout must be one of {CACHE_LAYOUTS}, got {layout!r}")
    if kv.dim() == 5 and kv.shape[0] == 2 and kv.shape[3] == num_kv_heads and kv.shape[4] == head_dim:
        return kv[0:1].unsqueeze(0), kv[1:2].unsqueeze(0)
    if kv.dim() == 4 and kv.shape[1] == num_kv_heads and kv.shape[3] == 2 * head_dim:
        if layout == "flash":  # [B, H, N, 2D] -> keys / values [B, N, H, D], as vLLM's FlashAttention reads them
            per_token = kv.transpose(1, 2)
            return (per_token[..., :head_dim].unsqueeze(0).unsqueeze(0),
                    per_token[..., head_dim:].unsqueeze(0).unsqueeze(0))
        if kv.is_contiguous():
            num_blocks, heads, block_size, _ = kv.shape
            size = (1, 1, num_blocks, block_size, heads, head_dim)
            block, head = heads * 2 * block_size * head_dim, 2 * block_size * head_dim
            keys = kv.as_strided(size, (0, 0, block, 1, head, block_size))
            values = kv.as_strided(size, (0, 0, block, head_dim, head, 1), kv.storage_offset() + block_size * head_dim)
            return keys, values
    raise ValueError(f"Duet's connector does not know vLLM KV caches of shape {tuple(kv.shape)} strides "
                     f"{tuple(kv.stride())} (num_kv_heads={num_kv_heads}, head_dim={head_dim}, layout={layout})")


class VllmKVPort(KVPort):
    def __init__(self, views: list[tuple[torch.Tensor, torch.Tensor]]):
        """``views``: per layer, in model order, (keys, values) from ``pool_views``."""
        self.views = views
        keys = views[0][0]
        self._shape = (len(views), keys.shape[3], keys.shape[4], keys.shape[5])  # layers, block, heads, head_dim
        self._planned: list[torch.Tensor] = []

    def slab_shape(self, num_blocks: int) -> tuple[int, ...]:
        num_layers, block_size, heads, head_dim = self._shape
        return (num_layers, 2, num_blocks, block_size, heads, head_dim)

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.views[0][0].dtype

    @property
    def kv_device(self) -> torch.device:
        return self.views[0][0].device

    @property
    def num_cache_blocks(self) -> int:
        return int(self.views[0][0].shape[2])

    def plan_gather(self, block_ids: list[torch.Tensor]) -> None:
        self._planned = block_ids

    def gather_layer(self, layer: int, index: int, out: torch.Tensor) -> None:
        for kv, view in enumerate(self.views[layer]):
            gather_kv_blocks(view, self._planned[index], 0, 1, out=out[:, kv:kv + 1])

    def scatter_layers(self, slab: torch.Tensor, block_ids: torch.Tensor, layer_start: int, layer_end: int) -> None:
        for layer in range(layer_start, layer_end):
            for kv, view in enumerate(self.views[layer]):
                scatter_kv_blocks(slab[layer - layer_start:layer - layer_start + 1, kv:kv + 1], block_ids, 0, 1, view)
