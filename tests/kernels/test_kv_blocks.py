"""duet::gather_kv_blocks / scatter_kv_blocks (csrc/) against the torch references, plus the fallback path.

Pools are filled with random bytes viewed as the dtype under test (NaNs and denormals included), and
results are compared as bytes: the ops must copy, never convert.
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
from duet.kernels import kv_blocks, reference

REPO_ROOT = Path(__file__).resolve().parents[2]
DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.uint8]
POOL = (4, 2, 12, 16, 2, 8)  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]


def random_pool(shape, dtype, device, generator) -> torch.Tensor:
    """Random bit patterns (as bytes) viewed as `dtype`."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for size in shape:
        numel *= size
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).view(shape).to(device)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.equal(as_bytes(actual), as_bytes(expected))


def staging_for(kv_cache, num_ids, layer_start, layer_end) -> torch.Tensor:
    return kv_cache.new_empty((layer_end - layer_start, 2, num_ids, *kv_cache.shape[3:]))


@pytest.fixture(scope="module")
def ops():
    """torch.ops.duet, or a skip when the extension is deliberately disabled (see test_extension_built)."""
    if envs.disable_extension():
        pytest.skip("DUET_DISABLE_EXTENSION=1")
    if not kv_blocks.extension_available():
        pytest.skip("extension not built: test_extension_built reports the failure")
    return torch.ops.duet


def test_extension_built():
    if envs.disable_extension():
        pytest.skip("DUET_DISABLE_EXTENSION=1")
    assert kv_blocks.extension_available(), (
        "the duet C++ extension (kernels._C) did not build or load; reinstall with "
        "`pip install --no-build-isolation -e .` and read the build output"
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer_start,layer_end", [(0, 4), (1, 3), (3, 4), (2, 2)])
def test_round_trip_is_bitwise(ops, device, dtype, layer_start, layer_end):
    gen = torch.Generator().manual_seed(0)
    src = random_pool(POOL, dtype, device, gen)
    dst = random_pool(POOL, dtype, device, gen)
    dst_before = dst.clone()
    num_blocks = POOL[2]
    staging = staging_for(src, 5, layer_start, layer_end)
    for _ in range(3):  # the same staging buffer reused with fresh shuffled ids each time
        ids = torch.randperm(num_blocks, generator=gen)[:5].to(device)
        ops.gather_kv_blocks(src, ids, layer_start, layer_end, staging)
        assert_bitwise_equal(staging, reference.gather_kv_blocks(src, ids, layer_start, layer_end))
        ops.scatter_kv_blocks(staging, ids, layer_start, layer_end, dst)
        expected = dst_before.clone()
        reference.scatter_kv_blocks(staging, ids, layer_start, layer_end, expected)
        assert_bitwise_equal(dst, expected)
        # What was scattered gathers back unchanged.
        again = staging_for(dst, 5, layer_start, layer_end)
        ops.gather_kv_blocks(dst, ids, layer_start, layer_end, again)
        assert_bitwise_equal(again, staging)
        dst_before = dst.clone()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_gather_matches_index_select(ops, device, index_dtype):
    gen = torch.Generator().manual_seed(1)
    kv_cache = random_pool((6, 2, 20, 16, 4, 32), torch.bfloat16, device, gen)
    ids = torch.tensor([7, 0, 19, 3, 3, 11], dtype=index_dtype, device=device)  # repeats are fine to gather
    out = staging_for(kv_cache, ids.numel(), 1, 5)
    ops.gather_kv_blocks(kv_cache, ids, 1, 5, out)
    per_layer = torch.stack([torch.index_select(kv_cache[layer], 1, ids) for layer in range(1, 5)])
    assert_bitwise_equal(out, per_layer)
    assert_bitwise_equal(out, reference.gather_kv_blocks(kv_cache, ids, 1, 5))


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_touches_nothing_else(ops, device):
    gen = torch.Generator().manual_seed(2)
    kv_cache = torch.full((5, 2, 16, 4, 2, 8), float("nan"), dtype=torch.float32, device=device)  # poison
    ids = torch.tensor([9, 2, 14], device=device)
    staging = random_pool((2, 2, 3, 4, 2, 8), torch.float32, device, gen)
    ops.scatter_kv_blocks(staging, ids, 2, 4, kv_cache)
    written = torch.zeros(kv_cache.shape[:3], dtype=torch.bool, device=device)  # [layers, 2, blocks]
    written[2:4, :, ids] = True
    assert torch.isnan(kv_cache[~written]).all(), "scatter wrote outside its blocks"
    assert_bitwise_equal(kv_cache[2:4].index_select(2, ids), staging)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [5, 16])
@pytest.mark.parametrize("storage_offset_bytes", [0, 1, 2, 4, 8])
def test_unaligned_and_odd_sized_blocks(ops, device, head_dim, storage_offset_bytes):
    """Byte chunks of 3 * 1 * head_dim (15 or 48) bytes from bases shifted by 0-8 bytes: on CUDA these pick
    every vector width of the kernel, from 16 bytes down to single bytes."""
    gen = torch.Generator().manual_seed(3)
    shape = (3, 2, 7, 3, 1, head_dim)
    numel = 3 * 2 * 7 * 3 * head_dim
    buffer = random_pool((numel + storage_offset_bytes,), torch.uint8, device, gen)
    kv_cache = buffer[storage_offset_bytes:].view(shape)
    ids = torch.tensor([6, 0, 4], device=device)
    out = staging_for(kv_cache, 3, 0, 3)
    ops.gather_kv_blocks(kv_cache, ids, 0, 3, out)
    assert_bitwise_equal(out, reference.gather_kv_blocks(kv_cache, ids, 0, 3))
    pool = torch.zeros_like(kv_cache)
    ops.scatter_kv_blocks(out, ids, 0, 3, pool)
    expected = torch.zeros_like(kv_cache)
    reference.scatter_kv_blocks(out, ids, 0, 3, expected)
    assert_bitwise_equal(pool, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_calls_are_no_ops(ops, device):
    kv_cache = torch.ones(POOL, device=device)
    no_ids = torch.empty(0, dtype=torch.int64, device=device)
    ops.gather_kv_blocks(kv_cache, no_ids, 0, 4, staging_for(kv_cache, 0, 0, 4))
    ops.scatter_kv_blocks(staging_for(kv_cache, 0, 0, 4), no_ids, 0, 4, kv_cache)
    ops.scatter_kv_blocks(staging_for(kv_cache, 3, 1, 1), torch.tensor([0, 1, 2], device=device), 1, 1, kv_cache)
    assert bool((kv_cache == 1).all())


def _args(**overrides):
    """Valid gather arguments on CPU with some replaced: (kv_cache, block_ids, layer_start, layer_end, out)."""
    kv_cache = torch.zeros(POOL)
    args = {"kv_cache": kv_cache, "block_ids": torch.tensor([1, 5]), "layer_start": 1, "layer_end": 3}
    args["out"] = staging_for(kv_cache, 2, 1, 3)
    args.update(overrides)
    return args


INVALID_GATHERS = {
    "kv_cache 5-D": (_args(kv_cache=torch.zeros(POOL[:-1])), ValueError, r"kv_cache must be 6-D"),
    "kv_cache not K/V": (_args(kv_cache=torch.zeros(4, 3, 12, 16, 2, 8)), ValueError, r"kv_cache.size\(1\) must be 2"),
    "kv_cache strided": (
        _args(kv_cache=torch.zeros(4, 2, 12, 16, 2, 16)[..., :8]), ValueError, r"kv_cache must be contiguous"),
    "block_ids float": (_args(block_ids=torch.tensor([1.0, 5.0])), TypeError, r"block_ids must be int32 or int64"),
    "block_ids 2-D": (_args(block_ids=torch.tensor([[1, 5]])), ValueError, r"block_ids must be 1-D"),
    "block id too big": (_args(block_ids=torch.tensor([1, 12])), IndexError, r"block_ids\[1\] = 12 is out of range"),
    "block id negative": (_args(block_ids=torch.tensor([-1, 5])), IndexError, r"block_ids\[0\] = -1 is out of range"),
    "layer_end past pool": (
        _args(layer_end=5, out=staging_for(torch.zeros(POOL), 2, 1, 5)), ValueError, r"layer range .* num_layers = 4"),
    "layer_start negative": (_args(layer_start=-1), ValueError, r"layer range \[layer_start, layer_end\) = \[-1, 3\)"),
    "layers reversed": (_args(layer_start=3, layer_end=1), ValueError, r"0 <= layer_start <= layer_end"),
    "out wrong shape": (
        _args(out=torch.zeros(2, 2, 3, 16, 2, 8)), ValueError, r"out must have shape \[2, 2, 2, 16, 2, 8\]"),
    "out wrong dtype": (
        _args(out=torch.zeros(2, 2, 2, 16, 2, 8, dtype=torch.float16)), TypeError, r"out must have kv_cache's dtype"),
    "out strided": (
        _args(out=torch.zeros(2, 2, 2, 16, 2, 16)[..., ::2]), ValueError, r"out must be contiguous"),
}


@pytest.mark.parametrize("case", list(INVALID_GATHERS))
def test_invalid_gather_raises(ops, case):
    args, error, message = INVALID_GATHERS[case]
    with pytest.raises(error, match=message):
        ops.gather_kv_blocks(**args)


def test_invalid_scatter_raises(ops):
    kv_cache = torch.zeros(POOL)
    staging = staging_for(kv_cache, 3, 0, 2)
    with pytest.raises(ValueError, match=r"block_ids must be distinct .* block 4 appears twice"):
        ops.scatter_kv_blocks(staging, torch.tensor([4, 0, 4]), 0, 2, kv_cache)
    with pytest.raises(ValueError, match=r"staging must have shape"):
        ops.scatter_kv_blocks(staging, torch.tensor([4, 0]), 0, 2, kv_cache)
    with pytest.raises(ValueError, match=r"staging must not share memory with kv_cache"):
        alias = kv_cache.view(-1)[: staging.numel()].view(staging.shape)
        ops.scatter_kv_blocks(alias, torch.tensor([4, 0, 5]), 0, 2, kv_cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_devices_raise(ops):
    kv_cache = torch.zeros(POOL, device="cuda")
    out = staging_for(kv_cache, 2, 0, 1)
    with pytest.raises(ValueError, match=r"block_ids must be on kv_cache's device"):
        ops.gather_kv_blocks(kv_cache, torch.tensor([0, 1]), 0, 1, out)
    with pytest.raises(ValueError, match=r"out must be on kv_cache's device"):
        ops.gather_kv_blocks(kv_cache, torch.tensor([0, 1], device="cuda"), 0, 1, out.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(ops, device):
    gen = torch.Generator().manual_seed(4)
    kv_cache = random_pool(POOL, torch.float32, device, gen)
    ids = torch.tensor([3, 0, 8], device=device)
    out = staging_for(kv_cache, 3, 1, 3)
    torch.library.opcheck(ops.gather_kv_blocks.default, (kv_cache, ids, 1, 3, out))
    torch.library.opcheck(ops.scatter_kv_blocks.default, (out, ids, 1, 3, kv_cache.clone()))


@pytest.mark.parametrize("device", DEVICES)
def test_wrappers(device):
    """The typed wrappers, with or without the extension."""
    gen = torch.Generator().manual_seed(5)
    kv_cache = random_pool(POOL, torch.bfloat16, device, gen)
    ids = torch.tensor([2, 9, 4], device=device)
    staging = kv_blocks.gather_kv_blocks(kv_cache, ids, 0, 4)
    assert_bitwise_equal(staging, reference.gather_kv_blocks(kv_cache, ids, 0, 4))
    out = staging_for(kv_cache, 3, 0, 4)
    assert kv_blocks.gather_kv_blocks(kv_cache, ids, 0, 4, out=out) is out
    pool = torch.zeros_like(kv_cache)
    assert kv_blocks.scatter_kv_blocks(staging, ids, 0, 4, pool) is None
    assert_bitwise_equal(pool[:, :, ids], kv_cache[:, :, ids])


FALLBACK_SCRIPT = textwrap.dedent(
    """
    import torch
    import duet.kernels  # must import without the extension
    from duet.engine import envs
    from duet.kernels import extension, kv_blocks, reference

    extension.use_extension(not envs.disable_extension())  # what every engine's model runner does
    assert not kv_blocks.extension_available()
    kv_cache = torch.randn(3, 2, 8, 4, 2, 8)
    ids = torch.tensor([5, 1, 6])
    for _ in range(2):
        staging = kv_blocks.gather_kv_blocks(kv_cache, ids, 1, 3)
        assert torch.equal(staging, reference.gather_kv_blocks(kv_cache, ids, 1, 3))
        pool = torch.zeros_like(kv_cache)
        kv_blocks.scatter_kv_blocks(staging, ids, 1, 3, pool)
        assert torch.equal(pool[1:3, :, ids], kv_cache[1:3, :, ids])
        assert not pool[0].any()
    print("fallback ok")
    """
)


def test_fallback_when_disabled():
    env = {**os.environ, "DUET_DISABLE_EXTENSION": "1"}
    result = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout
    assert result.stderr.count("using the torch reference") == 1, result.stderr
