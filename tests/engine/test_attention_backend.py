"""The batched torch decode path (the CPU ops' fallback) against the reference paged attention."""
from __future__ import annotations

import pytest
import torch

from duet.kernels import reference


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_decode_matches_reference(group, dtype):
    g = torch.Generator().manual_seed(group)
    num_blocks, block_size, kv_heads, head_dim = 40, 16, 2, 32
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    seq_lens = torch.tensor([1, 17, 50, 0, 64], dtype=torch.int32)  # 0: an empty (padding) sequence
    tables = torch.randperm(num_blocks, generator=g)[:5 * 4].view(5, 4).to(torch.int32)
    query = torch.randn(5, kv_heads * group, head_dim, generator=g).to(dtype)
    out = reference.batched_paged_decode_attention(query, k_cache, v_cache, tables, seq_lens, head_dim ** -0.5)
    ref = reference.paged_decode_attention(query, k_cache, v_cache, tables, seq_lens, head_dim ** -0.5)
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2)
