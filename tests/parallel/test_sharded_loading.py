"""Layout arithmetic and sharded loading, in one process (no process groups: nothing runs forward)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from duet.engine.loader import build_model
from duet.engine.model_config import ModelConfig
from duet.engine.parallel.layout import ParallelLayout


def _build(path: str, layout: ParallelLayout = ParallelLayout()):
    cfg = ModelConfig.from_pretrained(path)
    return build_model(cfg, torch.float32, torch.device("cpu"), 64, show_progress=False, layout=layout)


def _expected(full: dict, name: str, local: torch.nn.Parameter) -> torch.Tensor:
    """What ``local`` should hold, cut from the unsharded model's parameter of the same name."""
    t = full[name]
    stacked = hasattr(local, "expert_start")
    if stacked:
        t = t[local.expert_start:local.expert_start + local.shape[0]]
    shard = getattr(local, "tp_shard", None)
    if shard is not None:
        dim, start, _ = shard
        d = dim + 1 if stacked else dim
        t = t.narrow(d, start, local.shape[d])
    return t


def _assert_is_slice_of_full(model, full_model):
    full = dict(full_model.named_parameters(remove_duplicate=False))
    params = dict(model.named_parameters())
    assert params, "the shard holds no parameters"
    for name, p in params.items():
        assert torch.equal(p, _expected(full, name, p)), name


def test_layout_arithmetic():
    assert [ParallelLayout(pp_size=3, pp_rank=r).layer_range(7) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    # 2 KV heads over 4 ranks: ranks 0,1 read head 0 and ranks 2,3 head 1.
    assert [ParallelLayout(tp_size=4, tp_rank=r).kv_head_range(2) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [ParallelLayout(tp_size=2, tp_rank=r).kv_head_range(4) for r in range(2)] == [(0, 2), (2, 2)]
    layout = ParallelLayout.for_rank(3, tp_size=2, pp_size=2, expert_parallel=True)
    assert (layout.tp_rank, layout.pp_rank, layout.rank, layout.stage_rank(0)) == (1, 1, 3, 1)
    assert layout.expert_range(8) == (4, 4) and layout.moe_intermediate_range(64) == (0, 64)


@pytest.mark.parametrize("arch, kwargs, layout", [
    ("qwen2", {}, ParallelLayout(tp_size=2, tp_rank=1)),  # q/k/v biases split with their heads
    ("qwen3", {}, ParallelLayout(tp_size=4, tp_rank=3)),  # 2 KV heads replicated over 4 ranks
    ("mixtral", {}, ParallelLayout(tp_size=2, tp_rank=1)),  # every expert's columns split
    ("qwen3_moe", {}, ParallelLayout(tp_size=2, tp_rank=1, expert_parallel=True)),  # whole experts
    ("llama", dict(num_layers=3), ParallelLayout(pp_size=2, pp_rank=1)),  # last stage: layer 2 only
    ("mistral", dict(tie_word_embeddings=True), ParallelLayout(pp_size=2, pp_rank=1)),  # tied lm_head alone
])
def test_shard_holds_its_slice_of_the_checkpoint(tiny_model, arch, kwargs, layout):
    path = tiny_model(arch, **kwargs)
    model = _build(path, layout)
    _assert_is_slice_of_full(model, _build(path))
    mc = model.config
    attn = next(m.self_attn for m in model.model.layers if hasattr(m, "self_attn"))
    assert attn.num_heads == mc.num_heads // layout.tp_size
    assert attn.num_kv_heads == max(1, mc.num_kv_heads // layout.tp_size)
    if layout.pp_size > 1:
        assert model.model.embed_tokens is None and model.lm_head is not None
        assert sum(hasattr(m, "self_attn") for m in model.model.layers) == 1


def test_kv_heads_replicated_are_the_ones_the_query_heads_read(tiny_model):
    path = tiny_model("qwen3")  # 4 query heads, 2 KV heads
    full = _build(path).model.layers[0].self_attn
    d = full.head_dim
    for rank in range(4):
        attn = _build(path, ParallelLayout(tp_size=4, tp_rank=rank)).model.layers[0].self_attn
        kv_head = rank // 2  # query head `rank` belongs to KV group rank // (4 query / 2 KV heads)
        assert torch.equal(attn.k_proj.weight, full.k_proj.weight[kv_head * d:(kv_head + 1) * d])
        assert torch.equal(attn.q_proj.weight, full.q_proj.weight[rank * d:(rank + 1) * d])


def _fuse_experts(src: Path, dst: Path) -> None:
    """Rewrite a checkpoint's per-expert tensors as transformers-5 fused ones (gate_up_proj, down_proj)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    num_experts = cfg["num_local_experts"]
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        w = {kind: torch.stack([tensors[f"{p}.{e}.{kind}.weight"] for e in range(num_experts)])
             for kind in ("w1", "w2", "w3")}
        out[f"{p}.gate_up_proj"] = torch.cat([w["w1"], w["w3"]], dim=1)  # [E, 2I, H]
        out[f"{p}.down_proj"] = w["w2"]  # [E, H, I]
    save_file(out, str(dst / "model.safetensors"))


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_fused_expert_tensors_shard_like_per_expert_ones(tiny_model, tmp_path, expert_parallel):
    path = Path(tiny_model("mixtral"))
    fused = tmp_path / "fused"
    _fuse_experts(path, fused)
    layout = ParallelLayout(tp_size=2, tp_rank=1, expert_parallel=expert_parallel)
    a = dict(_build(str(path), layout).named_parameters())
    b = dict(_build(str(fused), layout).named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
