"""Tensor, pipeline and expert parallel engines against the single-process engine on the same checkpoint.

Acceptance: logits of each prompt within 1e-4 of one process, greedy generations identical. Each case
starts its worker processes once (module-scoped) and closes them afterwards.
"""
from __future__ import annotations

import pytest

from duet.engine import LLM, SamplingParams
from tests.parallel.helpers import child_pids

# (arch, checkpoint kwargs, parallel kwargs)
CASES = {
    "llama-tp2": ("llama", dict(rope_scaling="llama3"), dict(tensor_parallel_size=2)),
    "llama-pp2": ("llama", dict(rope_scaling="llama3"), dict(pipeline_parallel_size=2)),
    "qwen3-tp2": ("qwen3", {}, dict(tensor_parallel_size=2)),
    "qwen3-pp2-3layers": ("qwen3", dict(num_layers=3), dict(pipeline_parallel_size=2)),
    "mixtral-tp2-ep": ("mixtral", {}, dict(tensor_parallel_size=2, expert_parallel=True)),
    "qwen3_moe-tp2-ep": ("qwen3_moe", {}, dict(tensor_parallel_size=2, expert_parallel=True)),
    "mixtral-tp2-sliced-experts": ("mixtral", {}, dict(tensor_parallel_size=2)),
    "qwen2-tp2-bias": ("qwen2", {}, dict(tensor_parallel_size=2)),
    "mistral-pp2-tied": ("mistral", dict(tie_word_embeddings=True), dict(pipeline_parallel_size=2)),
    # Four ranks: TP x PP together, one KV head replicated on both TP ranks, 3 layers split 2 + 1.
    "llama-tp2-pp2-mqa": (
        "llama", dict(num_kv_heads=1, num_layers=3), dict(tensor_parallel_size=2, pipeline_parallel_size=2)
    ),
}
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 and more numbers to make this longer.",
]
# A small token budget chunks the long prompt over several steps, some of which sample nothing.
ENGINE_KW = dict(show_progress=False, num_kv_blocks=32, max_num_batched_tokens=16)

_references: dict[str, LLM] = {}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tiny_model):
    arch, ckpt_kw, parallel_kw = CASES[request.param]
    path = tiny_model(arch, **ckpt_kw)
    if path not in _references:
        _references[path] = LLM(path, **ENGINE_KW)
    llm = LLM(path, **ENGINE_KW, **parallel_kw)
    try:
        yield _references[path], llm
    finally:
        llm.close()


def test_prompt_logits_match_single_process(pair):
    ref, llm = pair
    for prompt in PROMPTS:
        ids = ref.tokenizer.encode(prompt)
        expected = ref.engine.runner.prompt_logits(ids)
        got = llm.engine.runner.prompt_logits(ids)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() < 1e-4


def test_greedy_generation_matches_single_process(pair):
    ref, llm = pair
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    free_before = llm.engine.num_free_blocks
    expected = [o.token_ids for o in ref.generate(PROMPTS, params)]
    got = [o.token_ids for o in llm.generate(PROMPTS, params)]
    assert got == expected
    assert all(len(t) == 16 for t in got)
    assert llm.engine.num_free_blocks == free_before


def test_rank0_kv_pool_holds_its_share(pair):
    ref, llm = pair
    runner, mc = llm.engine.runner, llm.engine.model_config
    shard = runner.kv_shard()
    tp_size = llm.engine.config.tensor_parallel_size
    assert (shard.tp_rank, shard.tp_size) == (runner.tp_rank, runner.tp_size) == (0, tp_size)
    assert shard.num_kv_heads == max(1, mc.num_kv_heads // shard.tp_size)
    assert runner.kv_cache.shape == (
        shard.layer_end - shard.layer_start, 2, runner.num_blocks, runner.block_size, shard.num_kv_heads, mc.head_dim,
    )
    assert runner.num_blocks == ref.engine.runner.num_blocks


def test_close_leaves_no_child_processes(pair):
    _, llm = pair
    assert child_pids(), "the parallel engine should have worker processes"
    llm.close()
    llm.close()  # idempotent
    assert not child_pids()
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2, temperature=0))
