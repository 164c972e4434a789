"""KV layout validation, the compatibility hash, and the check made before any KV moves."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from duet.transfer.compat import IncompatiblePeer, KVLayout, check_compatible


def _layout(**overrides) -> KVLayout:
    fields = dict(model="meta-llama/Llama-3.1-8B@abc123", dtype="bfloat16", num_layers=32, num_kv_heads=8,
                  head_dim=128, block_size=16)
    return KVLayout(**{**fields, **overrides})


def test_hash_is_stable_and_ignores_tp_rank():
    a = _layout(tp_size=2, tp_rank=0)
    b = _layout(tp_size=2, tp_rank=1)
    assert a.compat_hash() == b.compat_hash()
    assert len(a.compat_hash()) == 32
    check_compatible(a, b)
    # Same value in a fresh interpreter (no dependence on hash randomization or dict order).
    code = ("from transfer.compat import KVLayout; print(KVLayout(model='meta-llama/Llama-3.1-8B@abc123', "
            "dtype='bfloat16', num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, tp_size=2).compat_hash())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PYTHONHASHSEED": "123", "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == a.compat_hash(), out.stderr


@pytest.mark.parametrize("field, value", [
    ("model", "other"), ("dtype", "float16"), ("num_layers", 31), ("num_kv_heads", 4), ("head_dim", 64),
    ("block_size", 32), ("tp_size", 2),
])
def test_every_canonical_field_changes_the_hash_and_is_named(field, value):
    local, remote = _layout(), _layout(**{field: value})
    assert local.compat_hash() != remote.compat_hash()
    with pytest.raises(IncompatiblePeer, match=field) as info:
        check_compatible(local, remote)
    assert info.value.fields == {field: (getattr(local, field), value)}


def test_several_differences_are_all_named():
    with pytest.raises(IncompatiblePeer) as info:
        check_compatible(_layout(), _layout(dtype="float32", block_size=32))
    assert set(info.value.fields) == {"dtype", "block_size"}
    assert "dtype: local='bfloat16' remote='float32'" in str(info.value)


@pytest.mark.parametrize("overrides", [
    {"model": ""}, {"dtype": "int4"}, {"num_layers": 0}, {"head_dim": -1}, {"block_size": 1.5},
    {"num_kv_heads": True}, {"layout": "NHD"}, {"tp_rank": 2, "tp_size": 2}, {"tp_rank": -1},
    {"num_kv_heads": 6, "tp_size": 4},
])
def test_validation(overrides):
    with pytest.raises(ValueError):
        _layout(**overrides)


def test_from_cache_and_block_bytes():
    # [layers, 2, blocks, block_size, heads, head_dim]
    kv_cache = torch.empty(4, 2, 10, 16, 2, 64, dtype=torch.bfloat16)
    layout = KVLayout.from_cache("m", kv_cache, tp_rank=1, tp_size=4)
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_size) == (4, 8, 64, 16)
    assert layout.dtype == "bfloat16" and layout.num_kv_heads_per_rank == 2
    assert layout.block_bytes == kv_cache[0, 0, 0].numel() * kv_cache.element_size()
    replicated = KVLayout.from_cache("m", kv_cache[:, :, :, :, :1], tp_size=4, num_kv_heads=2)
    assert replicated.num_kv_heads_per_rank == 1
    with pytest.raises(ValueError):
        KVLayout.from_cache("m", torch.empty(4, 3, 10, 16, 2, 64))


def test_layout_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _layout().num_layers = 1  # type: ignore[misc]
