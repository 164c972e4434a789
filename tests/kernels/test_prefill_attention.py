"""Triton paged prefill attention against ``kernels.reference.paged_attention``.

CPU cases run through the Triton interpreter with tiny shapes; the larger cases need CUDA.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from duet.kernels import reference
from duet.kernels.triton_utils import TRITON_AVAILABLE, is_interpreted

from duet.kernels.prefill_attention import _prefill_kernel, paged_prefill_attention

pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def device_params(kernel: object) -> list:
    """"cpu" runs only when the kernel was created in interpreter mode; "cuda" only with a GPU."""
    interpreted = TRITON_AVAILABLE and is_interpreted(kernel)
    return [
        pytest.param("cpu", marks=pytest.mark.skipif(not interpreted, reason="kernels compiled for CUDA")),
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    ]


def seeded(case: object) -> torch.Generator:
    """A generator seeded from the case itself, so every case draws its own reproducible inputs."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def make_paged_kv(
    seq_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
    gen: torch.Generator, device: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches ``[num_blocks, block_size, num_kv_heads, head_dim]`` and a block table
    ``[num_seqs, max_blocks]`` int32 of shuffled, non-contiguous block ids. Spare blocks hold unrelated
    data and unused table entries are -1, so reading past a sequence's blocks gives wrong results or
    faults instead of passing by luck."""
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    block_ids = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    table = torch.full((len(seq_lens), max(blocks_per_seq) + 1), -1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(blocks_per_seq):
        table[s, :n] = block_ids[used:used + n]
        used += n
    return k_cache.to(device), v_cache.to(device), table.to(device)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check_against_reference(
    device: str, dtype: torch.dtype, group: int, num_kv_heads: int, head_dim: int, block_size: int,
    seqs: list[tuple[int, int]], extra_rows: int = 0,
) -> None:
    """``seqs`` is [(seq_len, q_len)]; ``extra_rows`` padding query rows past the last sequence must
    stay untouched."""
    gen = seeded((dtype, group, num_kv_heads, head_dim, block_size, seqs))
    seq_lens = [s for s, _ in seqs]
    q_lens = [q for _, q in seqs]
    k_cache, v_cache, block_tables = make_paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype, gen, device)
    num_tokens = sum(q_lens)
    query = torch.randn(num_tokens + extra_rows, num_kv_heads * group, head_dim, generator=gen).to(dtype).to(device)
    cu_seqlens_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    out = torch.full_like(query, float("nan"))  # rows the kernel fails to write stay NaN and fail

    result = paged_prefill_attention(
        query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_t, scale, max(q_lens), out=out
    )
    ref = reference.paged_attention(query.cpu(), k_cache.cpu(), v_cache.cpu(), block_tables.cpu(),
                                    cu_seqlens_q.cpu(), seq_lens_t.cpu(), scale)
    assert result is out
    written = out[:num_tokens].cpu()
    assert torch.isfinite(written).all(), "some output rows were not written"
    assert torch.isnan(out[num_tokens:]).all(), "padding rows past cu_seqlens_q[-1] were written"
    assert relative_error(written, ref[:num_tokens]) < TOLERANCE[dtype]


# (dtype, group, num_kv_heads, head_dim, block_size, [(seq_len, q_len), ...]). Every case mixes a
# whole-prompt prefill (q_len == seq_len), a single new token (q_len == 1) and a cached prefix whose
# last block is only partly filled.
CPU_CASES = [
    (torch.float32, 1, 2, 32, 16, [(37, 37), (50, 1), (70, 23)]),
    (torch.float32, 4, 2, 16, 32, [(33, 33), (64, 1), (90, 45), (5, 5)]),
    (torch.float32, 8, 1, 32, 16, [(1, 1), (40, 17), (29, 29)]),
    (torch.bfloat16, 4, 2, 32, 16, [(45, 45), (31, 1), (60, 12)]),
    (torch.bfloat16, 8, 2, 16, 64, [(70, 70), (100, 30), (20, 1)]),
    (torch.float16, 2, 2, 32, 32, [(40, 40), (77, 9)]),
    (torch.float32, 3, 2, 16, 16, [(26, 26), (35, 11)]),  # a group that is not a power of two
]


@pytest.mark.parametrize("device", device_params(_prefill_kernel))
@pytest.mark.parametrize(
    "dtype,group,num_kv_heads,head_dim,block_size,seqs", CPU_CASES,
    ids=[f"{str(c[0])[6:]}-g{c[1]}-kv{c[2]}-d{c[3]}-bs{c[4]}" for c in CPU_CASES],
)
def test_matches_reference(device, dtype, group, num_kv_heads, head_dim, block_size, seqs):
    check_against_reference(device, dtype, group, num_kv_heads, head_dim, block_size, seqs)


@pytest.mark.parametrize("device", device_params(_prefill_kernel))
def test_skips_empty_sequences_and_leaves_padding_rows(device):
    check_against_reference(device, torch.float32, 2, 2, 16, 16, [(20, 0), (30, 7), (12, 0), (18, 18)], extra_rows=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim,group", [(64, 1), (128, 4), (128, 8), (256, 2)])
def test_large_shapes_cuda(dtype, head_dim, group):
    check_against_reference("cuda", dtype, group, 4, head_dim, 16, [(1500, 1500), (3000, 700), (41, 1), (520, 77)])


def test_rejects_malformed_arguments():
    q = torch.zeros(4, 4, 16)
    cache = torch.zeros(4, 16, 2, 16)
    table = torch.zeros(1, 4, dtype=torch.int32)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    lens = torch.tensor([4], dtype=torch.int32)
    with pytest.raises(ValueError, match="num_kv_heads"):
        paged_prefill_attention(torch.zeros(4, 3, 16), cache, cache, table, cu, lens, 1.0, 4)
    with pytest.raises(ValueError, match="head_dim"):
        paged_prefill_attention(torch.zeros(4, 4, 24), torch.zeros(4, 16, 2, 24), torch.zeros(4, 16, 2, 24),
                                table, cu, lens, 1.0, 4)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_prefill_attention(q, cache, cache, table, cu.long(), lens, 1.0, 4)
    with pytest.raises(ValueError, match="dtype"):
        paged_prefill_attention(q, cache.half(), cache.half(), table, cu, lens, 1.0, 4)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        paged_prefill_attention(q, cache, cache, table, cu, lens, 1.0, -1)
