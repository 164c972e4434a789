"""Triton paged decode attention against ``kernels.reference.paged_decode_attention``.

Covers the single-pass path (``num_splits`` 1 or chosen automatically; the interpreter always picks 1)
and the split-K path (forced split counts, including more splits than a sequence has tiles).
"""
from __future__ import annotations

import pytest
import torch

from duet.kernels import reference
from duet.kernels.decode_attention import (
    MAX_SPLITS,
    _decode_kernel,
    choose_num_splits,
    paged_decode_attention,
)
from duet.kernels.triton_utils import TRITON_AVAILABLE
from tests.kernels.test_prefill_attention import (
    TOLERANCE,
    device_params,
    make_paged_kv,
    relative_error,
    seeded,
)

pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed")


def check_against_reference(
    device: str, dtype: torch.dtype, group: int, num_kv_heads: int, head_dim: int, block_size: int,
    seq_lens: list[int], num_splits: int | None,
) -> None:
    gen = seeded((dtype, group, num_kv_heads, head_dim, block_size, seq_lens, num_splits))
    k_cache, v_cache, block_tables = make_paged_kv(
        seq_lens, block_size, num_kv_heads, head_dim, dtype, gen, device
    )
    query = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype).to(device)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    out = torch.full_like(query, float("nan"))  # anything the kernel fails to write stays NaN and fails

    result = paged_decode_attention(
        query, k_cache, v_cache, block_tables, seq_lens_t, scale, out=out, num_splits=num_splits
    )
    ref = reference.paged_decode_attention(
        query.cpu(), k_cache.cpu(), v_cache.cpu(), block_tables.cpu(), seq_lens_t.cpu(), scale
    )
    assert result is out
    assert torch.isfinite(out).all(), "some output elements were not written"
    assert relative_error(out.cpu(), ref) < TOLERANCE[dtype]


# (dtype, group, num_kv_heads, head_dim, block_size, seq_lens, num_splits). Lengths are ragged, end
# mid-block, and include 1 (only the new token) and 0 (a padding sequence: zeros, as in the reference).
CPU_CASES = [
    (torch.float32, 1, 2, 32, 16, [1, 17, 50, 96], None),
    (torch.float32, 1, 2, 32, 16, [1, 17, 50, 96], 3),
    (torch.float32, 4, 2, 16, 32, [33, 5, 64, 0], 1),
    (torch.float32, 4, 2, 16, 32, [33, 5, 64, 0], 4),
    (torch.float32, 8, 1, 32, 16, [70, 2, 31], 8),  # more splits than the short sequences have tiles
    (torch.float32, 16, 1, 16, 16, [40, 9], 2),  # MQA: all 16 query heads share one KV head
    (torch.bfloat16, 4, 2, 32, 64, [100, 3, 64], None),
    (torch.bfloat16, 8, 2, 16, 16, [81, 16, 7], 3),
    (torch.float16, 2, 2, 32, 32, [45, 60], 2),
    (torch.float32, 3, 2, 16, 16, [26, 0, 35], 2),  # a group that is not a power of two
]


@pytest.mark.parametrize("device", device_params(_decode_kernel))
@pytest.mark.parametrize(
    "dtype,group,num_kv_heads,head_dim,block_size,seq_lens,num_splits", CPU_CASES,
    ids=[f"{str(c[0])[6:]}-g{c[1]}-kv{c[2]}-d{c[3]}-bs{c[4]}-split{c[6]}" for c in CPU_CASES],
)
def test_matches_reference(device, dtype, group, num_kv_heads, head_dim, block_size, seq_lens, num_splits):
    check_against_reference(device, dtype, group, num_kv_heads, head_dim, block_size, seq_lens, num_splits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim,group", [(64, 1), (128, 4), (128, 8), (256, 2)])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_large_shapes_cuda(dtype, head_dim, group, num_splits):
    check_against_reference("cuda", dtype, group, 4, head_dim, 16, [2000, 1, 517, 4096, 33], num_splits)


@pytest.mark.parametrize("device", device_params(_decode_kernel))
def test_allocates_out_when_not_given(device):
    gen = seeded("alloc")
    k_cache, v_cache, block_tables = make_paged_kv([20], 16, 1, 16, torch.float32, gen, device)
    query = torch.randn(1, 2, 16, generator=gen).to(device)
    seq_lens = torch.tensor([20], dtype=torch.int32, device=device)
    out = paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, 0.25)
    ref = reference.paged_decode_attention(
        query.cpu(), k_cache.cpu(), v_cache.cpu(), block_tables.cpu(), seq_lens.cpu(), 0.25
    )
    assert out.shape == query.shape and relative_error(out.cpu(), ref) < 1e-5


def test_choose_num_splits():
    # Enough programs to fill the device, or the interpreter's single unit: never split.
    assert choose_num_splits(num_seqs=64, num_kv_heads=8, max_context_tokens=32768, num_units=132) == 1
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_context_tokens=32768, num_units=1) == 1
    # One sequence on an H100 (132 SMs): fill the SMs.
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_context_tokens=32768, num_units=132) == 17
    # Short contexts: at least MIN_TOKENS_PER_SPLIT tokens per split.
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_context_tokens=512, num_units=132) == 2
    assert choose_num_splits(num_seqs=1, num_kv_heads=1, max_context_tokens=1 << 20, num_units=132) == MAX_SPLITS


def test_rejects_malformed_arguments():
    q = torch.zeros(1, 4, 16)
    cache = torch.zeros(4, 16, 2, 16)
    table = torch.zeros(1, 4, dtype=torch.int32)
    lens = torch.tensor([4], dtype=torch.int32)
    with pytest.raises(ValueError, match="num_kv_heads"):
        paged_decode_attention(torch.zeros(1, 3, 16), cache, cache, table, lens, 1.0)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(torch.zeros(1, 4, 8), torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8),
                               table, lens, 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(q, cache, cache, table.long(), lens, 1.0)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention(q, cache, cache, table, lens.long(), 1.0)
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(q, cache, cache, table, lens, 1.0, num_splits=0)
    with pytest.raises(ValueError, match="out"):
        paged_decode_attention(q, cache, cache, table, lens, 1.0, out=torch.zeros(1, 4, 16, dtype=torch.half))
