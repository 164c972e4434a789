"""Tests for engine.tools.make_tiny_model: the checkpoints it writes load back through transformers."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from duet.engine.tools.make_tiny_model import main, make_tiny_model

ARCH_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
# One tensor name per arch that only that family's checkpoints have.
ARCH_MARKER_TENSORS = {
    "llama": "model.layers.0.mlp.gate_proj.weight",
    "mistral": "model.layers.0.mlp.gate_proj.weight",
    "qwen2": "model.layers.0.self_attn.q_proj.bias",
    "qwen3": "model.layers.0.self_attn.q_norm.weight",
    "mixtral": "model.layers.0.block_sparse_moe.experts.3.w1.weight",
    "qwen3_moe": "model.layers.0.mlp.experts.3.gate_proj.weight",
}
ROUND_TRIP_TEXTS = [
    "The morning train left the station at 6:45.",
    "café naïve 東京 🙂 Zürich señora",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # done\n",
    "unseen words: quixotic, zephyr, 42.195 km, ¿qué?, Ελλάδα",
]


def _load_all_tensors(out: pathlib.Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, root / arch) for arch in ARCH_CLASSES}


@pytest.mark.parametrize("arch", sorted(ARCH_CLASSES))
def test_checkpoint_loads_into_transformers(arch: str, tiny_dirs: dict[str, pathlib.Path]) -> None:
    out = tiny_dirs[arch]
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert ARCH_MARKER_TENSORS[arch] in _load_all_tensors(out)

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__ == ARCH_CLASSES[arch]
    assert model.config.architectures == [ARCH_CLASSES[arch]]
    assert model.config.model_type == arch
    # transformers picks the tokenizer class from model_type (qwen2 gets Qwen2Tokenizer, which rebuilds
    # the pipeline); it must still agree with a plain tokenizer.json reader and add no tokens.
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer)
    raw_tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.encode(text) == raw_tokenizer.encode(text).ids

    input_ids = torch.tensor([[0, 50, 60, 70, 80, 90]])  # [batch, seq]
    with torch.no_grad():
        logits = model(input_ids).logits  # [batch, seq, vocab]
    assert logits.shape == (1, 6, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # Sharp enough that greedy decoding is not decided by float noise.
    assert logits.std() > 2.0


def test_moe_config_keys(tiny_dirs: dict[str, pathlib.Path]) -> None:
    mixtral = json.loads((tiny_dirs["mixtral"] / "config.json").read_text())
    assert (mixtral["num_local_experts"], mixtral["num_experts_per_tok"], mixtral["intermediate_size"]) == (4, 2, 128)
    qwen3_moe = json.loads((tiny_dirs["qwen3_moe"] / "config.json").read_text())
    assert (qwen3_moe["num_experts"], qwen3_moe["num_experts_per_tok"], qwen3_moe["moe_intermediate_size"]) == (4, 2, 128)
    assert qwen3_moe["norm_topk_prob"] is True and qwen3_moe["decoder_sparse_step"] == 1
    assert qwen3_moe["mlp_only_layers"] == []
    assert AutoConfig.from_pretrained(tiny_dirs["qwen3_moe"]).num_experts == 4


def test_tokenizer_round_trip_and_special_tokens(tiny_dirs: dict[str, pathlib.Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["qwen3"])
    assert 400 <= len(tokenizer) <= 512
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer.encode(text)
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    for token in ("<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"):
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]


def test_chat_template(tiny_dirs: dict[str, pathlib.Path]) -> None:
    out = tiny_dirs["llama"]
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|bos|><|im_start|>system\nBe brief.<|im_end|>\n"
                        "<|im_start|>user\nHi 🙂<|im_end|>\n<|im_start|>assistant\n")
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert without_prompt == rendered.removesuffix("<|im_start|>assistant\n")
    token_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert token_ids == tokenizer.encode(rendered, add_special_tokens=False)
    assert token_ids.count(tokenizer.bos_token_id) == 1


def test_generation_config(tiny_dirs: dict[str, pathlib.Path]) -> None:
    out = tiny_dirs["qwen2"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    generation = GenerationConfig.from_pretrained(out)
    assert generation.bos_token_id == tokenizer.bos_token_id
    assert generation.eos_token_id == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert generation.do_sample and generation.temperature == 0.8
    assert (generation.top_p, generation.top_k) == (0.95, 50)


def test_sharding_writes_index(tmp_path: pathlib.Path) -> None:
    out = make_tiny_model("mixtral", tmp_path / "sharded", max_shard_size="200KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and "model.safetensors" not in shards
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map.values()) == set(shards)
    assert set(weight_map) == set(_load_all_tensors(out))
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    # Rewriting the same directory unsharded must not leave the old index and shards behind.
    make_tiny_model("mixtral", out)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_same_seed_same_files(tmp_path: pathlib.Path) -> None:
    first = make_tiny_model("qwen2", tmp_path / "a", seed=7)
    second = make_tiny_model("qwen2", tmp_path / "b", seed=7)
    other = make_tiny_model("qwen2", tmp_path / "c", seed=8)
    tensors_a, tensors_b, tensors_c = (_load_all_tensors(p) for p in (first, second, other))
    assert tensors_a.keys() == tensors_b.keys()
    assert all(torch.equal(tensors_a[name], tensors_b[name]) for name in tensors_a)
    assert not torch.equal(tensors_a["lm_head.weight"], tensors_c["lm_head.weight"])
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_llama3_rope_scaling_reloads_and_applies(tmp_path: pathlib.Path) -> None:
    out = make_tiny_model("llama", tmp_path / "llama3", rope_scaling="llama3", rope_theta=50000.0)
    rope = AutoConfig.from_pretrained(out).rope_parameters
    assert rope == {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    model = AutoModelForCausalLM.from_pretrained(out)
    head_dim = model.config.head_dim
    unscaled = 1.0 / (50000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    inv_freq = model.model.rotary_emb.inv_freq  # [head_dim // 2]
    assert torch.allclose(inv_freq[0], unscaled[0])  # short wavelengths are kept
    assert torch.allclose(inv_freq[-1], unscaled[-1] / 8.0)  # long ones are divided by the factor


def test_options_tie_dtype_vocab_and_cli(tmp_path: pathlib.Path) -> None:
    main(["--arch", "qwen3", "--out", str(tmp_path / "cli"), "--tie-word-embeddings", "--dtype", "bfloat16",
          "--vocab-size", "640", "--head-dim", "32", "--num-layers", "1", "--seed", "3"])
    out = tmp_path / "cli"
    tensors = _load_all_tensors(out)
    assert "lm_head.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].shape == (640, 64)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    config = json.loads((out / "config.json").read_text())
    assert (config["dtype"], config["torch_dtype"], config["tie_word_embeddings"]) == ("bfloat16", "bfloat16", True)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("kwargs", [
    {"arch": "gpt2"},
    {"arch": "llama", "vocab_size": 100},
    {"arch": "llama", "num_heads": 4, "num_kv_heads": 3},
    {"arch": "mixtral", "num_experts": 2, "experts_per_token": 3},
    {"arch": "llama", "dtype": "int8"},
    {"arch": "llama", "rope_scaling": "yarn"},
])
def test_rejects_bad_arguments(kwargs: dict, tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError):
        make_tiny_model(out_dir=tmp_path / "bad", **kwargs)
