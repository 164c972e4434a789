"""The compiled CPU layer ops (``kernels.cpu_layers``) against ``kernels.reference`` (the torch layers' math).

Inputs are slices of a fused projection output (strided rows), 2-D token rows and 3-D (token, head) rows, an
odd width that leaves a vector tail, float32 (tight: only the RMSNorm sum's order may differ) and bfloat16 /
float16 (the same roundings as torch, so one unit in the last place at most).
"""
from __future__ import annotations

import pytest
import torch

from duet.engine import envs
from duet.kernels import cpu_layers, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.fixture(scope="module")
def ops():
    if envs.disable_extension():
        pytest.skip("DUET_DISABLE_EXTENSION=1")
    if not cpu_layers.extension_available():
        pytest.skip("extension not built: tests/kernels/test_kv_blocks.py::test_extension_built reports why")
    return torch.ops.duet


def fused(num_tokens: int, widths: list[int], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Column slices of one [num_tokens, sum(widths)] buffer, as q / k / v are slices of the QKV output."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(num_tokens, sum(widths), generator=g).to(dtype)
    return list(buf.split(widths, dim=-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,dim", [(1, 512), (7, 72), (300, 64)])
def test_rms_norm(ops, dtype, num_tokens, dim):
    x, _ = fused(num_tokens, [dim, 8], dtype, seed=dim)
    weight = torch.rand(dim, generator=torch.Generator().manual_seed(1)).to(dtype) + 0.5
    out = cpu_layers.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(out, reference.rms_norm(x, weight, 1e-6), **TOL[dtype])
    heads = x[:, :dim - dim % 8].view(num_tokens, 8, -1)  # per-head norm rows (Qwen3's q/k norm)
    w = weight[:heads.shape[-1]].contiguous()
    torch.testing.assert_close(cpu_layers.rms_norm(heads, w, 1e-6), reference.rms_norm(heads, w, 1e-6), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_writes_the_sum_into_residual(ops, dtype):
    x, residual = fused(5, [40, 40], dtype, seed=2)
    weight = torch.rand(40, generator=torch.Generator().manual_seed(3)).to(dtype)
    expected_out, expected_sum = reference.add_rms_norm(x, residual.clone(), weight, 1e-5)
    out, summed = cpu_layers.add_rms_norm(x, residual, weight, 1e-5)
    assert summed is residual
    torch.testing.assert_close(summed, expected_sum, rtol=0, atol=0)
    torch.testing.assert_close(out, expected_out, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 18])
def test_rotary_in_place_on_fused_slices(ops, dtype, head_dim):
    q, k, v = fused(9, [4 * head_dim, 2 * head_dim, 2 * head_dim], dtype, seed=head_dim)
    q, k, v = (t.view(9, -1, head_dim) for t in (q, k, v))
    angles = torch.rand(50, head_dim // 2, generator=torch.Generator().manual_seed(4)) * 6
    cos, sin = angles.cos(), angles.sin()
    positions = torch.tensor([0, 3, 49, 7, 7, 1, 20, 11, 2])
    expected_q, expected_k = reference.rotary_embedding(positions, q, k, cos, sin)
    v_before = v.clone()
    out_q, out_k = cpu_layers.rotary_embedding(positions, q, k, cos, sin)
    assert out_q is q and out_k is k
    torch.testing.assert_close(q, expected_q, **TOL[dtype])
    torch.testing.assert_close(k, expected_k, **TOL[dtype])
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1408, 37])
def test_silu_and_mul(ops, dtype, width):
    gate_up, _ = fused(6, [2 * width, 3], dtype, seed=width)
    torch.testing.assert_close(cpu_layers.silu_and_mul(gate_up), reference.silu_and_mul(gate_up), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv(ops, dtype):
    _, k, v = fused(6, [16, 2 * 8, 2 * 8], dtype, seed=5)
    k, v = k.view(6, 2, 8), v.view(6, 2, 8)
    slots = torch.tensor([3, -1, 17, 0, 31, 8])
    caches = [torch.zeros(4, 8, 2, 8, dtype=dtype) for _ in range(4)]
    reference.store_kv(k, v, caches[0], caches[1], slots)
    cpu_layers.store_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])


def test_bad_arguments_are_named(ops):
    x = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        ops.rms_norm(x, torch.ones(7), 1e-6, torch.empty_like(x))
    with pytest.raises(TypeError, match="out must have x's dtype"):
        ops.rms_norm(x, torch.ones(8), 1e-6, torch.empty(3, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.rms_norm(torch.zeros(8), torch.ones(8), 1e-6, torch.zeros(8))
    with pytest.raises(ValueError, match="residual must have x's shape"):
        ops.add_rms_norm(x, torch.zeros(2, 8), torch.ones(8), 1e-6, torch.empty_like(x))
    q, k = torch.zeros(2, 4, 8), torch.zeros(2, 2, 8)
    table = torch.zeros(10, 4)
    with pytest.raises(IndexError, match=r"positions\[1\] = 10 is outside the table of 10 positions"):
        ops.rotary_embedding(torch.tensor([0, 10]), q, k, table, table)
    with pytest.raises(ValueError, match="cos must be a contiguous CPU tensor"):
        ops.rotary_embedding(torch.tensor([0, 1]), q, k, torch.zeros(10, 3), torch.zeros(10, 3))
    with pytest.raises(ValueError, match="x must be"):
        ops.silu_and_mul(torch.zeros(3, 7), torch.zeros(3, 3))
    cache = torch.zeros(4, 8, 2, 8)
    with pytest.raises(IndexError, match=r"slot_mapping\[0\] = 32 is outside \[-1, 32\)"):
        ops.store_kv(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), cache, cache.clone(), torch.tensor([32]))
    with pytest.raises(TypeError, match="key must have k_cache's dtype"):
        ops.store_kv(torch.zeros(1, 2, 8, dtype=torch.bfloat16), torch.zeros(1, 2, 8), cache, cache.clone(),
                     torch.tensor([0]))
