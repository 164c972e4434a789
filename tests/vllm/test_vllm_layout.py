"""Duet's view of vLLM's CPU KV blocks agrees with vLLM's own cache-write op (no servers; skipped without vLLM)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
ops = pytest.importorskip("vllm._custom_ops")

from duet.kernels.kv_blocks import gather_kv_blocks, scatter_kv_blocks
from duet.transfer.vllm_kv_port import layer_order, pool_views


@pytest.mark.parametrize("head_dim", [32, 64])
def test_pool_views_read_what_vllm_cpu_attention_wrote(head_dim):
    num_blocks, heads, block_size, n = 4, 2, 32, 40
    raw = torch.zeros(num_blocks, heads, block_size, 2 * head_dim)  # vLLM's CPU attention layer cache
    key_cache, value_cache = raw.view(num_blocks, heads, 2 * block_size, head_dim).chunk(2, dim=2)
    key = torch.randn(n, heads, head_dim)  # [num_tokens, num_kv_heads, head_dim]
    value = torch.randn(n, heads, head_dim)
    slots = torch.arange(n, dtype=torch.int64) + block_size  # tokens 0..n-1 in blocks 1, 2
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, "vec")
    keys, values = pool_views(raw, heads, head_dim)
    for t in range(n):
        assert torch.equal(keys[0, 0, 1 + t // block_size, t % block_size], key[t])
        assert torch.equal(values[0, 0, 1 + t // block_size, t % block_size], value[t])

    # A wire slab layer [1, 2, n, block_size, heads, head_dim] round-trips through gather and scatter.
    ids = torch.tensor([2, 1])
    slab = torch.empty(1, 2, 2, block_size, heads, head_dim)
    gather_kv_blocks(keys, ids, 0, 1, out=slab[:, 0:1])
    gather_kv_blocks(values, ids, 0, 1, out=slab[:, 1:2])
    assert torch.equal(slab[0, 0, 1, :, :, :].reshape(block_size, heads, head_dim), key[:block_size])
    copy = torch.zeros_like(raw)
    ck, cv = pool_views(copy, heads, head_dim)
    scatter_kv_blocks(slab[:, 0:1], ids, 0, 1, ck)
    scatter_kv_blocks(slab[:, 1:2], ids, 0, 1, cv)
    assert torch.equal(copy[1:3], raw[1:3]) and not copy[0].any() and not copy[3].any()


def test_layer_order_follows_layer_indices():
    names = ["model.layers.10.self_attn.attn", "model.layers.2.self_attn.attn", "model.layers.0.self_attn.attn"]
    assert layer_order(names) == names[::-1]
