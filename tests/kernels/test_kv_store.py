"""Triton KV store against ``kernels.reference.store_kv``, and the package's behaviour without Triton."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from duet.kernels import reference
from duet.kernels.kv_store import _store_kv_kernel, store_kv
from duet.kernels.triton_utils import TRITON_AVAILABLE
from tests.kernels.test_prefill_attention import device_params, seeded

REPO_ROOT = Path(__file__).resolve().parents[2]


# (cache dtype, key dtype, num_kv_heads, head_dim, block_size, num_blocks, num_tokens, num_padding,
#  slot dtype, fused): ``fused`` takes key/value as strided views of one [tokens, q + k + v] projection
# output, the way the engine hands them over.
CASES = [
    (torch.float32, torch.float32, 2, 32, 16, 6, 20, 4, torch.int64, False),
    (torch.bfloat16, torch.bfloat16, 4, 16, 32, 4, 33, 0, torch.int64, True),
    (torch.bfloat16, torch.float32, 3, 16, 16, 5, 12, 3, torch.int32, False),  # cast on store, odd heads
    (torch.float16, torch.float16, 1, 64, 64, 3, 70, 10, torch.int64, True),
]


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed")
@pytest.mark.parametrize("device", device_params(_store_kv_kernel))
@pytest.mark.parametrize(
    "cache_dtype,key_dtype,num_kv_heads,head_dim,block_size,num_blocks,num_tokens,num_padding,slot_dtype,fused",
    CASES, ids=[f"{str(c[0])[6:]}-from-{str(c[1])[6:]}-kv{c[2]}-d{c[3]}-bs{c[4]}" for c in CASES],
)
def test_matches_reference(
    device, cache_dtype, key_dtype, num_kv_heads, head_dim, block_size, num_blocks, num_tokens, num_padding,
    slot_dtype, fused,
):
    gen = seeded((cache_dtype, key_dtype, num_kv_heads, head_dim, block_size, num_tokens, fused))
    kv_width = num_kv_heads * head_dim
    if fused:
        # Slice on the target device: moving a strided view between devices would make it contiguous.
        qkv = torch.randn(num_tokens, 3 * kv_width, generator=gen).to(key_dtype).to(device)
        key = qkv[:, kv_width:2 * kv_width].view(num_tokens, num_kv_heads, head_dim)
        value = qkv[:, 2 * kv_width:].view(num_tokens, num_kv_heads, head_dim)
        assert not key.is_contiguous()
    else:
        key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(key_dtype).to(device)
        value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(key_dtype).to(device)
    num_slots = num_blocks * block_size
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]  # distinct, scattered over blocks
    slots[torch.randperm(num_tokens, generator=gen)[:num_padding]] = -1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_before = torch.randn(shape, generator=gen).to(cache_dtype)
    v_before = torch.randn(shape, generator=gen).to(cache_dtype)
    k_expected, v_expected = k_before.clone(), v_before.clone()
    reference.store_kv(key.cpu(), value.cpu(), k_expected, v_expected, slots)

    k_cache, v_cache = k_before.to(device), v_before.to(device)
    store_kv(key, value, k_cache, v_cache, slots.to(slot_dtype).to(device))

    # A copy is exact: the whole cache must equal the reference's, bit for bit.
    assert torch.equal(k_cache.cpu(), k_expected) and torch.equal(v_cache.cpu(), v_expected)
    # And every slot that no real token targets (padding tokens included) still holds its old bytes.
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    flat = (-1, num_kv_heads, head_dim)
    assert torch.equal(k_cache.cpu().view(flat)[untouched], k_before.view(flat)[untouched])
    assert torch.equal(v_cache.cpu().view(flat)[untouched], v_before.view(flat)[untouched])
    written = slots[slots >= 0]
    assert torch.equal(k_cache.cpu().view(flat)[written], key.cpu()[slots >= 0].to(cache_dtype))


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed")
def test_rejects_malformed_arguments():
    key = torch.zeros(3, 2, 16)
    cache = torch.zeros(4, 16, 2, 16)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(key, key, cache, cache, torch.zeros(3, dtype=torch.float32))
    with pytest.raises(ValueError, match="heads/dim"):
        store_kv(torch.zeros(3, 1, 16), torch.zeros(3, 1, 16), cache, cache, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="key"):
        store_kv(key, torch.zeros(2, 2, 16), cache, cache, torch.zeros(3, dtype=torch.long))


def test_kernels_import_and_fail_clearly_without_triton():
    """``kernels`` must import on a machine without Triton; calling a kernel then raises RuntimeError."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        from duet.kernels import triton_utils
        from duet.kernels.decode_attention import paged_decode_attention
        from duet.kernels.prefill_attention import paged_prefill_attention
        from duet.kernels.kv_store import store_kv
        assert not triton_utils.TRITON_AVAILABLE
        for call in (
            lambda: store_kv(None, None, None, None, None),
            lambda: paged_decode_attention(None, None, None, None, None, 1.0),
            lambda: paged_prefill_attention(None, None, None, None, None, None, 1.0, 1),
        ):
            try:
                call()
            except RuntimeError as e:
                assert "triton is not installed" in str(e)
            else:
                raise AssertionError("no RuntimeError")
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
