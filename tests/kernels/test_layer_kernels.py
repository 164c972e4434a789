"""Triton RMSNorm, rotary embedding and SwiGLU activation against the torch modules they replace on CUDA.

The references are the model layers' own torch paths (``engine.models.layers``), which the model tests in
tests/engine check against Hugging Face transformers. Inputs are random, drawn per case; q/k/v and gate/up
come as strided views of one fused projection output, the way the decoder hands them over.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from duet.engine.model_config import RopeConfig
from duet.engine.models.layers import RMSNorm, RotaryEmbedding
from duet.kernels.activation import _silu_and_mul_kernel, silu_and_mul
from duet.kernels.rms_norm import _rms_norm_kernel, rms_norm
from duet.kernels.rotary import _rotary_kernel, apply_rotary
from duet.kernels.triton_utils import TRITON_AVAILABLE
from tests.kernels.test_prefill_attention import device_params, seeded

pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed")

TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    atol, rtol = TOLERANCE[actual.dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", device_params(_rms_norm_kernel))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 96), (1, 1024), (5, 3, 64)], ids=str)
def test_rms_norm_matches_module(device, dtype, shape):
    g = seeded((dtype, shape))
    norm = RMSNorm(shape[-1], 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(shape[-1], generator=g))
    x = (3 * torch.randn(*shape, generator=g)).to(dtype)
    if len(shape) == 3:  # per-head norm over a strided slice of a wider projection
        wide = torch.randn(shape[0], shape[1] + 2, shape[2], generator=g).to(dtype)
        wide[:, 1:1 + shape[1]] = x
        x = wide[:, 1:1 + shape[1]]
    expected = norm(x)
    out = rms_norm(x.to(device), norm.weight.to(device), norm.eps)
    assert_close(out, expected)


def test_rms_norm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.zeros(2, 8), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(torch.zeros(2, 8), torch.ones(8, dtype=torch.float16), 1e-6)


@pytest.mark.parametrize("device", device_params(_rotary_kernel))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 32), (6, 1, 64), (3, 3, 16)])
def test_rotary_matches_module(device, dtype, heads, kv_heads, head_dim):
    g = seeded((dtype, heads, kv_heads, head_dim))
    rotary = RotaryEmbedding(head_dim, 512, RopeConfig(theta=10000.0))
    n = 9
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(n, heads, head_dim), k.view(n, kv_heads, head_dim)
    positions = torch.randint(0, 512, (n,), generator=g)
    eq, ek = rotary(positions, q.clone(), k.clone())  # on CPU the module rotates its inputs in place
    oq, ok = apply_rotary(positions.to(device), q.to(device), k.to(device), rotary.cos.to(device),
                          rotary.sin.to(device))
    assert_close(oq, eq)
    assert_close(ok, ek)


@pytest.mark.parametrize("device", device_params(_silu_and_mul_kernel))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,width", [(5, 96), (2, 3000)])
def test_silu_and_mul_matches_torch(device, dtype, tokens, width):
    g = seeded((dtype, tokens, width))
    wide = (4 * torch.randn(tokens, 2 * width + 8, generator=g)).to(dtype)
    x = wide[:, : 2 * width]  # strided rows
    gate, up = x.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    assert_close(silu_and_mul(x.to(device)), expected)
    with pytest.raises(ValueError, match="2 \\* width"):
        silu_and_mul(torch.zeros(2, 3, device=device))
