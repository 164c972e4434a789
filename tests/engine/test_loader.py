"""Checkpoint loading: sharded files, dtypes, and clear errors naming the file and tensor."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from duet.engine import LLM, SamplingParams


def test_sharded_checkpoint_loads_and_matches_single_file(tiny_model, tmp_path):
    single = tiny_model("qwen2")
    sharded = tiny_model("qwen2", max_shard_size="100KB")
    assert any(p.name == "model.safetensors.index.json" for p in __import__("pathlib").Path(sharded).iterdir())
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    a = LLM(single, show_progress=False, num_kv_blocks=16).generate(["shard test"], p)[0]
    b = LLM(sharded, show_progress=False, num_kv_blocks=16).generate(["shard test"], p)[0]
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_dtypes_run(llama_dir, dtype):
    llm = LLM(llama_dir, show_progress=False, num_kv_blocks=16, dtype=dtype)
    assert llm.engine.runner.kv_cache.dtype == getattr(torch, dtype)
    out = llm.generate(["dtype test"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_unsupported_architecture(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        LLM(d, show_progress=False)


def test_missing_files(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LLM(d, show_progress=False)
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(tmp_path), show_progress=False)


def test_shape_mismatch_names_file_and_tensor(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model\.safetensors.*{name}"):
        LLM(d, show_progress=False)


def test_missing_tensor_is_named(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.norm.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        LLM(d, show_progress=False)


def test_model_identity_tells_weights_apart_not_locations(tmp_path):
    """Servers compare this string at handshake: same weights anywhere -> equal; other weights -> different."""
    from duet.engine.loader import model_identity
    from duet.engine.tools.make_tiny_model import make_tiny_model

    a = make_tiny_model("llama", tmp_path / "a" / "llama", seed=0)
    b = make_tiny_model("llama", tmp_path / "b" / "llama", seed=1)  # same directory name, other weights
    copy = shutil.copytree(a, tmp_path / "c" / "llama")
    ident = model_identity(a, "LlamaForCausalLM")
    assert ident.startswith("LlamaForCausalLM:llama:")
    assert model_identity(copy, "LlamaForCausalLM") == ident
    assert model_identity(b, "LlamaForCausalLM") != ident
    no_weights = make_tiny_model("llama", tmp_path / "d" / "llama", weights=False)
    assert model_identity(no_weights, "LlamaForCausalLM") != ident  # config alone
