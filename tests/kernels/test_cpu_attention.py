"""The compiled CPU paged attention ops (``kernels.cpu_attention``) against ``kernels.reference``.

Random, shuffled block tables with spare blocks of unrelated data and -1 past each sequence; ragged lengths
that end mid-block; GQA groups 1/2/4/8 (and 16, MQA); head dims 64/80/128 (and 16, smaller than a vector);
prefill over cached prefixes (prefix hits, earlier chunks) with chunks that start and end mid-block, single
new tokens inside a prefill call, and empty sequences. The instruction sets this machine does not pick by
itself run in a subprocess under ``ATEN_CPU_CAPABILITY``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from duet.engine import envs
from duet.kernels import cpu_attention, reference
from tests.kernels.test_prefill_attention import TOLERANCE, make_paged_kv, relative_error, seeded

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ops():
    if envs.disable_extension():
        pytest.skip("DUET_DISABLE_EXTENSION=1")
    if not cpu_attention.extension_available():
        pytest.skip("extension not built: tests/kernels/test_kv_blocks.py::test_extension_built reports why")
    return torch.ops.duet


def run_decode(ops, dtype, group, num_kv_heads, head_dim, block_size, seq_lens, num_splits):
    gen = seeded(("decode", dtype, group, num_kv_heads, head_dim, block_size, seq_lens))  # same for any split
    k_cache, v_cache, tables = make_paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype, gen, "cpu")
    query = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = torch.full_like(query, float("nan"))  # anything not written stays NaN and fails
    result = cpu_attention.paged_decode_attention(query, k_cache, v_cache, tables, lens, head_dim ** -0.5, out=out,
                                                  num_splits=num_splits)
    ref = reference.paged_decode_attention(query, k_cache, v_cache, tables, lens, head_dim ** -0.5)
    assert result is out and torch.isfinite(out).all()
    assert relative_error(out, ref) < TOLERANCE[dtype]
    return out


DECODE_LENS = [1, 17, 50, 0, 96, 33]  # 0: an empty (padding) sequence gets zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_decode_matches_reference(ops, dtype, group, head_dim):
    run_decode(ops, dtype, group, 2, head_dim, 16, DECODE_LENS, 0)


# (dtype, group, num_kv_heads, head_dim, block_size, seq_lens, num_splits): split partitions (forced, more
# partitions than a short sequence has blocks), float16, MQA, a head_dim below one vector, big blocks.
DECODE_CASES = [
    (torch.float32, 2, 4, 64, 16, [300, 1, 47], 3),
    (torch.float32, 4, 2, 80, 32, [70, 2, 31, 0], 8),
    (torch.bfloat16, 8, 1, 128, 16, [513, 64], 5),
    (torch.float16, 2, 2, 64, 16, [45, 60, 1], 2),
    (torch.float32, 16, 1, 16, 8, [40, 9], 0),
    (torch.float32, 3, 2, 32, 64, [130, 5], 2),
    (torch.bfloat16, 1, 4, 64, 128, [257, 128], 0),
    (torch.float32, 7, 1, 80, 16, [100, 33], 0),  # passes of 4, 2 and 1 heads; rows padded to whole vectors
]


@pytest.mark.parametrize("dtype,group,num_kv_heads,head_dim,block_size,seq_lens,num_splits", DECODE_CASES)
def test_decode_cases(ops, dtype, group, num_kv_heads, head_dim, block_size, seq_lens, num_splits):
    run_decode(ops, dtype, group, num_kv_heads, head_dim, block_size, seq_lens, num_splits)


def test_decode_split_is_the_same_attention(ops):
    """Automatic splitting (one long sequence on one vs several threads) and forced splits agree."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_decode(ops, torch.float32, 2, 2, 64, 16, [2000], 1)
        torch.set_num_threads(max(threads, 2))
        auto = run_decode(ops, torch.float32, 2, 2, 64, 16, [2000], 0)
    finally:
        torch.set_num_threads(threads)
    split = run_decode(ops, torch.float32, 2, 2, 64, 16, [2000], 7)
    assert relative_error(auto, one) < 1e-6 and relative_error(split, one) < 1e-6


def run_prefill(dtype, group, num_kv_heads, head_dim, block_size, q_lens, contexts):
    """Sequence s has contexts[s] cached tokens (a prefix hit or earlier chunks) and q_lens[s] new ones."""
    seq_lens = [c + q for c, q in zip(contexts, q_lens)]
    gen = seeded(("prefill", dtype, group, num_kv_heads, head_dim, block_size, q_lens, contexts))
    k_cache, v_cache, tables = make_paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype, gen, "cpu")
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(int(cu[-1]), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = torch.full_like(query, float("nan"))
    result = cpu_attention.paged_prefill_attention(query, k_cache, v_cache, tables, cu, lens, head_dim ** -0.5,
                                                   out=out)
    ref = reference.paged_attention(query, k_cache, v_cache, tables, cu, lens, head_dim ** -0.5)
    assert result is out and torch.isfinite(out).all()
    assert relative_error(out, ref) < TOLERANCE[dtype]


# New tokens and cached tokens per sequence: a whole prompt longer than one query tile, a prefix hit of
# whole blocks, chunks starting and ending mid-block, a single new token, a sequence with no new tokens.
PREFILL_Q_LENS = [70, 33, 21, 1, 0, 5]
PREFILL_CONTEXTS = [0, 32, 45, 60, 12, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_prefill_matches_reference(ops, dtype, group, head_dim):
    run_prefill(dtype, group, 2, head_dim, 16, PREFILL_Q_LENS, PREFILL_CONTEXTS)


PREFILL_CASES = [
    (torch.float16, 2, 2, 64, 16, [40, 17], [0, 100]),
    (torch.float32, 16, 1, 16, 8, [9, 3], [7, 0]),  # MQA: 16 heads, one tile per token
    (torch.float32, 3, 2, 32, 32, [50, 1, 2], [31, 0, 64]),  # a group that is not a power of two
    (torch.bfloat16, 1, 4, 64, 128, [200], [130]),  # blocks bigger than the query tile
    (torch.float32, 2, 4, 64, 16, [300], [0]),  # several query tiles per head, balanced across threads
]


@pytest.mark.parametrize("dtype,group,num_kv_heads,head_dim,block_size,q_lens,contexts", PREFILL_CASES)
def test_prefill_cases(ops, dtype, group, num_kv_heads, head_dim, block_size, q_lens, contexts):
    run_prefill(dtype, group, num_kv_heads, head_dim, block_size, q_lens, contexts)


def test_chunked_prefill_equals_one_prefill(ops):
    """A prompt prefilled in chunks (each chunk attends to the cached ones) gives the one-shot result."""
    gen = seeded("chunks")
    n, heads, kv_heads, head_dim = 150, 4, 2, 64
    k_cache, v_cache, tables = make_paged_kv([n], 16, kv_heads, head_dim, torch.float32, gen, "cpu")
    query = torch.randn(n, heads, head_dim, generator=gen)
    whole = cpu_attention.paged_prefill_attention(
        query, k_cache, v_cache, tables, torch.tensor([0, n], dtype=torch.int32), torch.tensor([n], dtype=torch.int32),
        0.125)
    parts, start = [], 0
    for end in (7, 16, 61, 64, 149, 150):
        cu = torch.tensor([0, end - start], dtype=torch.int32)
        parts.append(cpu_attention.paged_prefill_attention(
            query[start:end], k_cache, v_cache, tables, cu, torch.tensor([end], dtype=torch.int32), 0.125))
        start = end
    assert relative_error(torch.cat(parts), whole) < 1e-6


def test_wrappers_allocate_out(ops):
    gen = seeded("alloc")
    k_cache, v_cache, tables = make_paged_kv([20], 16, 1, 16, torch.float32, gen, "cpu")
    query = torch.randn(1, 2, 16, generator=gen)
    lens = torch.tensor([20], dtype=torch.int32)
    out = cpu_attention.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.25)
    ref = reference.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.25)
    assert out.shape == query.shape and relative_error(out, ref) < 1e-5
    assert cpu_attention.isa() in ("AVX512", "AVX2", "DEFAULT")


def _good_args():
    gen = seeded("args")
    k_cache, v_cache, tables = make_paged_kv([20, 5], 16, 2, 16, torch.float32, gen, "cpu")
    return dict(query=torch.randn(25, 4, 16, generator=gen), k_cache=k_cache, v_cache=v_cache, block_tables=tables,
                cu_seqlens_q=torch.tensor([0, 20, 25], dtype=torch.int32),
                seq_lens=torch.tensor([20, 5], dtype=torch.int32), scale=0.25, out=torch.empty(25, 4, 16))


# (what to change, error type, message fragment). Each changes one argument of a valid prefill call.
BAD_PREFILL = [
    (dict(query=torch.zeros(25, 4)), ValueError, "query must be 3-D"),
    (dict(k_cache=torch.zeros(6, 16, 2)), ValueError, "k_cache must be 4-D"),
    (dict(v_cache=torch.zeros(6, 16, 2, 8)), ValueError, "v_cache must have k_cache's shape"),
    (dict(query=torch.zeros(25, 4, 16, dtype=torch.float64), out=torch.zeros(25, 4, 16, dtype=torch.float64)),
     TypeError, "query must be float32, bfloat16 or float16"),
    (dict(out=torch.zeros(25, 4, 16, dtype=torch.bfloat16)), TypeError, "out must have query's dtype"),
    (dict(query=torch.zeros(25, 3, 16), out=torch.zeros(25, 3, 16)), ValueError, "must be a multiple of num_kv_heads"),
    (dict(query=torch.zeros(25, 4, 8), out=torch.zeros(25, 4, 8)), ValueError, "must equal query's head_dim"),
    (dict(query=torch.zeros(25, 16, 4).transpose(1, 2)), ValueError, "query must be contiguous in its last"),
    (dict(out=torch.zeros(24, 4, 16)), ValueError, "out must have query's shape"),
    (dict(block_tables=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "block_tables must be int32"),
    (dict(seq_lens=torch.tensor([20], dtype=torch.int32)), ValueError, "seq_lens must have shape"),
    (dict(cu_seqlens_q=torch.tensor([0, 20, 25])), TypeError, "cu_seqlens_q must be int32"),
    (dict(cu_seqlens_q=torch.tensor([1, 20, 25], dtype=torch.int32)), ValueError, r"cu_seqlens_q\[0\] must be 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 20, 24], dtype=torch.int32)), ValueError, "must equal the number of query"),
    (dict(cu_seqlens_q=torch.tensor([0, 20, 19], dtype=torch.int32), query=torch.zeros(19, 4, 16),
      out=torch.zeros(19, 4, 16)), ValueError, "must be non-decreasing"),
    (dict(seq_lens=torch.tensor([19, 5], dtype=torch.int32)), ValueError, "has 20 new tokens but seq_lens"),
    (dict(seq_lens=torch.tensor([20, 5000], dtype=torch.int32)), ValueError, r"seq_lens\[1\] = 5000 must be in"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
]


@pytest.mark.parametrize("change,error,message", BAD_PREFILL, ids=[m for _, _, m in BAD_PREFILL])
def test_prefill_rejects_bad_arguments(ops, change, error, message):
    args = {**_good_args(), **change}
    with pytest.raises(error, match=message):
        ops.paged_prefill_attention(args["query"], args["k_cache"], args["v_cache"], args["block_tables"],
                                    args["cu_seqlens_q"], args["seq_lens"], args["scale"], args["out"])


def test_rejects_out_of_range_block_ids(ops):
    args = _good_args()
    tables = args["block_tables"].clone()
    tables[1, 0] = args["k_cache"].shape[0]
    with pytest.raises(IndexError, match=r"block_tables\[1, 0\] = \d+ is out of range"):
        ops.paged_prefill_attention(args["query"], args["k_cache"], args["v_cache"], tables, args["cu_seqlens_q"],
                                    args["seq_lens"], 0.25, args["out"])


def test_decode_rejects_bad_arguments(ops):
    args = _good_args()
    q, out = args["query"][:2], args["out"][:2]
    k, v, tables, lens = args["k_cache"], args["v_cache"], args["block_tables"], args["seq_lens"]
    with pytest.raises(ValueError, match="one row per sequence"):
        ops.paged_decode_attention(args["query"], k, v, tables, lens, 0.25, 0, args["out"])
    with pytest.raises(ValueError, match="num_splits must be >= 0"):
        ops.paged_decode_attention(q, k, v, tables, lens, 0.25, -1, out)
    with pytest.raises(ValueError, match="out must not share memory with the caches"):
        ops.paged_decode_attention(q, k, v, tables, lens, 0.25, 0, k.view(-1)[:q.numel()].view_as(q))
    with pytest.raises(IndexError, match="out of range"):
        ops.paged_decode_attention(q, k, v, torch.full_like(tables, -1), lens, 0.25, 0, out)


ISA_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from duet.kernels import cpu_attention
    from tests.kernels import test_cpu_attention as t
    assert cpu_attention.isa() == sys.argv[1], (cpu_attention.isa(), sys.argv[1])
    ops = torch.ops.duet
    for dtype in (torch.float32, torch.bfloat16):
        t.run_decode(ops, dtype, 4, 2, 80, 16, t.DECODE_LENS, 0)
        t.run_decode(ops, dtype, 2, 2, 64, 16, [300, 3], 3)
        t.run_prefill(dtype, 2, 2, 80, 16, t.PREFILL_Q_LENS, t.PREFILL_CONTEXTS)
        t.run_prefill(dtype, 8, 1, 64, 32, [40], [9])
    print("isa ok")
    """
)


@pytest.mark.parametrize("capability,isa", [("avx2", "AVX2"), ("default", "DEFAULT")])
def test_other_instruction_sets(ops, capability, isa):
    """The AVX2 and portable kernels, which an AVX-512 machine would otherwise never run."""
    if capability == "avx2" and cpu_attention.isa() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU or build has no AVX2 kernels")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", ISA_SCRIPT, isa], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "isa ok" in result.stdout, result.stderr[-3000:]


FALLBACK_SCRIPT = textwrap.dedent(
    """
    import torch
    from duet.engine import envs
    from duet.kernels import cpu_attention, extension, reference
    from tests.kernels.test_prefill_attention import make_paged_kv

    extension.use_extension(not envs.disable_extension())  # what every engine's model runner does
    assert not cpu_attention.extension_available() and cpu_attention.isa() == "torch"
    gen = torch.Generator().manual_seed(0)
    k, v, tables = make_paged_kv([20, 0, 9], 16, 2, 16, torch.float32, gen, "cpu")
    lens = torch.tensor([20, 0, 9], dtype=torch.int32)
    for _ in range(2):
        q = torch.randn(3, 4, 16, generator=gen)
        out = cpu_attention.paged_decode_attention(q, k, v, tables, lens, 0.25)
        ref = reference.paged_decode_attention(q, k, v, tables, lens, 0.25)
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
        cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
        q = torch.randn(9, 4, 16, generator=gen)
        out = torch.empty_like(q)
        assert cpu_attention.paged_prefill_attention(q, k, v, tables, cu, lens, 0.25, out=out) is out
        assert torch.allclose(out, reference.paged_attention(q, k, v, tables, cu, lens, 0.25), atol=1e-5)
    print("fallback ok")
    """
)


def test_fallback_when_disabled():
    env = {**os.environ, "DUET_DISABLE_EXTENSION": "1"}
    result = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "fallback ok" in result.stdout, result.stderr[-3000:]
    assert result.stderr.count("CPU attention ops: using the torch reference") == 1, result.stderr


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: nothing to run in parallel")
def test_the_kernels_run_on_torchs_threads(ops):
    """The CPU kernels' parallel regions follow torch.set_num_threads. Built without OpenMP (as they were until
    CMakeLists.txt added -fopenmp), at::parallel_for compiles its region out and every op ran on one thread."""
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            assert cpu_attention.parallel_threads() == threads
    finally:
        torch.set_num_threads(before)
