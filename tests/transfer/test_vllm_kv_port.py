"""vLLM's GPU KV cache layouts (FlashAttention, ``HND`` and ``NHD`` memory order), built here as tensors: the
hand-off's port reads what vLLM's FlashAttention would read and writes back only the blocks it is given.

The reference is vLLM's own view of its cache (``flash_attn.py``: ``kv_cache.transpose(1, 2).split(head_size,
dim=-1)`` turns the logical ``[blocks, heads, block_size, 2 * head_dim]`` layer cache into keys and values of
``[blocks, block_size, heads, head_dim]``); no vLLM import is needed.
"""
from __future__ import annotations

import pytest
import torch

from duet.transfer.vllm_kv_port import VllmKVPort, pool_views

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 2, 6, 4, 2, 8


def flash_layer_cache(memory_order: str, gen: torch.Generator) -> torch.Tensor:
    """A layer cache in vLLM 0.32's logical shape [blocks, heads, block_size, 2 * head_dim] with the memory
    order of its ``HND`` (identity) or ``NHD`` ([blocks, block_size, heads, 2 * head_dim]) layout."""
    if memory_order == "HND":
        return torch.randn(NUM_BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM, generator=gen)
    physical = torch.randn(NUM_BLOCKS, BLOCK_SIZE, HEADS, 2 * HEAD_DIM, generator=gen)
    return physical.permute(0, 2, 1, 3)


def vllm_keys_values(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What vLLM's FlashAttention backend reads: keys and values, each [blocks, block_size, heads, head_dim]."""
    return kv.transpose(1, 2).split(HEAD_DIM, dim=-1)


@pytest.mark.parametrize("memory_order", ["HND", "NHD"])
def test_flash_layouts_pack_and_scatter_like_vllm_reads_them(memory_order):
    gen = torch.Generator().manual_seed(3)
    caches = [flash_layer_cache(memory_order, gen) for _ in range(NUM_LAYERS)]
    port = VllmKVPort([pool_views(kv, HEADS, HEAD_DIM, "flash") for kv in caches])
    assert port.slab_shape(3) == (NUM_LAYERS, 2, 3, BLOCK_SIZE, HEADS, HEAD_DIM)
    ids = torch.tensor([4, 0, 2])
    slab = torch.empty(port.slab_shape(len(ids)))
    port.plan_gather([ids])
    for layer in range(NUM_LAYERS):
        port.gather_layer(layer, 0, out=slab[layer:layer + 1])
        keys, values = vllm_keys_values(caches[layer])
        assert torch.equal(slab[layer, 0], keys[ids]) and torch.equal(slab[layer, 1], values[ids])

    # Scatter into another engine's cache of the same layout: exactly those blocks change, to the same bytes.
    other = [flash_layer_cache(memory_order, torch.Generator().manual_seed(9)) for _ in range(NUM_LAYERS)]
    before = [kv.clone() for kv in other]
    dest = torch.tensor([1, 5, 3])
    VllmKVPort([pool_views(kv, HEADS, HEAD_DIM, "flash") for kv in other]).scatter_layers(slab, dest, 0, NUM_LAYERS)
    for layer in range(NUM_LAYERS):
        keys, values = vllm_keys_values(other[layer])
        assert torch.equal(keys[dest], slab[layer, 0]) and torch.equal(values[dest], slab[layer, 1])
        untouched = [b for b in range(NUM_BLOCKS) if b not in dest.tolist()]
        assert torch.equal(other[layer][untouched], before[layer][untouched])


def test_unknown_layouts_are_refused_naming_the_shape():
    with pytest.raises(ValueError, match="shape"):
        pool_views(torch.zeros(NUM_BLOCKS, HEADS, BLOCK_SIZE, 3 * HEAD_DIM), HEADS, HEAD_DIM, "flash")
    with pytest.raises(ValueError, match="layout"):
        pool_views(torch.zeros(NUM_BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM), HEADS, HEAD_DIM, "paged-mystery")
    strided = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, HEADS, 2 * HEAD_DIM).permute(0, 2, 1, 3)
    with pytest.raises(ValueError, match="strides"):  # the CPU vec layout needs its contiguous bytes
        pool_views(strided, HEADS, HEAD_DIM, "cpu_vec")
