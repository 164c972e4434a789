"""kernels.cpu_linear: oneDNN with a packed weight computes torch's linear (the reference), and the models use it."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from duet.kernels import cpu_linear

needs_onednn = pytest.mark.skipif(not cpu_linear.onednn_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 64, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_equals_torch(dtype, tol, num_tokens, with_bias):
    g = torch.Generator().manual_seed(num_tokens)
    weight = torch.randn(200, 96, generator=g).to(dtype)  # [out, in]: neither a multiple of the vector width
    bias = torch.randn(200, generator=g).to(dtype) if with_bias else None
    x = torch.randn(num_tokens, 96, generator=g).to(dtype)
    packed = cpu_linear.pack(weight)
    assert packed is not None
    out = cpu_linear.linear(x, weight, bias, packed)
    ref = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert out.shape == (num_tokens, 200) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item() if num_tokens else 0)


def test_inputs_the_packed_weight_cannot_take_use_the_dense_one():
    weight = torch.randn(32, 16)
    packed = cpu_linear.pack(weight)
    x = torch.randn(16, 8).t()  # [8, 16], not contiguous
    torch.testing.assert_close(cpu_linear.linear(x, weight, None, packed), F.linear(x, weight))
    x3 = torch.randn(2, 3, 16)  # 3-D
    torch.testing.assert_close(cpu_linear.linear(x3, weight, None, packed), F.linear(x3, weight))
    assert cpu_linear.pack(torch.randn(32, 16, dtype=torch.float64)) is None  # a dtype oneDNN does not pack


@needs_onednn
def test_a_cpu_model_packs_every_projection(llama_dir):
    from duet.engine.loader import build_model
    from duet.engine.model_config import ModelConfig

    model = build_model(ModelConfig.from_pretrained(llama_dir), torch.float32, torch.device("cpu"), 64,
                        show_progress=False)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for packed in (attn.qkv_packed, attn.o_packed, mlp.gate_up_packed, mlp.down_packed, model.lm_head_packed):
        assert packed is not None and packed.is_mkldnn
