"""Every supported architecture against Hugging Face transformers (float32, tiny random checkpoints)."""
from __future__ import annotations

import pytest
import torch
import transformers

from duet.engine import LLM, SamplingParams

ARCHS = {
    "llama": dict(rope_scaling="llama3"),
    "mistral": dict(tie_word_embeddings=True),
    "qwen2": {},
    "qwen3": {},
    "mixtral": {},
    "qwen3_moe": {},
}
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 and more numbers to make this longer.",
    "café naïve 東京 🙂",
]


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_setup(request, tiny_model):
    arch = request.param
    path = tiny_model(arch, **ARCHS[arch])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path, show_progress=False, num_kv_blocks=64)
    return arch, path, hf, llm


def test_architecture_is_the_expected_one(arch_setup):
    arch, _, hf, llm = arch_setup
    assert llm.engine.model_config.architecture == hf.config.architectures[0]
    if arch == "llama":
        assert llm.engine.model_config.rope.rope_type == "llama3"
    if arch == "mistral":
        assert llm.engine.model_config.tie_word_embeddings


def test_prefill_logits_match_transformers(arch_setup):
    _, _, hf, llm = arch_setup
    tok = llm.tokenizer
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        ours = llm.engine.runner.prompt_logits(ids).cpu()  # the engine may run on a GPU, the reference on CPU
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < 1e-4


def test_batched_greedy_matches_transformers_generate(arch_setup):
    _, _, hf, llm = arch_setup
    free_before = llm.engine.num_free_blocks
    tok = llm.tokenizer
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompt_ids}) == len(PROMPTS), "prompts must have different lengths"
    outs = llm.generate(prompt_ids, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    hf.generation_config.eos_token_id = None  # ignore_eos on both sides
    for ids, out in zip(prompt_ids, outs):
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.token_ids == ref[0, len(ids):].tolist()
        assert out.finish_reason == "length"
    assert llm.engine.num_free_blocks == free_before
