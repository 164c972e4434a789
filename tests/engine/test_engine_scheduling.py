"""Prefix caching, preemption and chunked prefill change nothing in the outputs; no block leaks."""
from __future__ import annotations

import pytest

from duet.engine import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(llama_dir):
    """Outputs of a roomy engine with the prefix cache off: the baseline every variant must equal."""
    llm = LLM(llama_dir, show_progress=False, enable_prefix_caching=False, num_kv_blocks=256)
    return llm


def prompt_ids(llm, n: int, seed: int) -> list[int]:
    vocab = llm.engine.model_config.vocab_size
    return [(seed * 7919 + i * 104729) % (vocab - 10) + 5 for i in range(n)]


def test_prefix_cache_reuses_a_64_token_prefix(llama_dir, reference):
    llm = LLM(llama_dir, show_progress=False, enable_prefix_caching=True, num_kv_blocks=256)
    free0 = llm.engine.num_free_blocks
    prefix = prompt_ids(llm, 64, 1)
    first = prefix + prompt_ids(llm, 9, 2)
    second = prefix + prompt_ids(llm, 13, 3)
    out1 = llm.generate([first], GREEDY)[0]
    stats = llm.engine.block_manager.stats
    hits_before = stats.hit_tokens
    out2 = llm.generate([second], GREEDY)[0]
    assert stats.hit_tokens - hits_before == 64
    assert out2.num_cached_tokens == 64
    ref1, ref2 = reference.generate([first, second], GREEDY)
    assert out1.token_ids == ref1.token_ids
    assert out2.token_ids == ref2.token_ids
    assert llm.engine.num_free_blocks == free0


def test_preemption_under_a_small_pool_keeps_outputs(llama_dir, reference):
    # 6 prompts x (20 prompt + 16 output) tokens need ~18 blocks at once; give 10 so requests get preempted.
    llm = LLM(llama_dir, show_progress=False, num_kv_blocks=10, enable_prefix_caching=False)
    prompts = [prompt_ids(llm, 20 + i, 10 + i) for i in range(6)]
    outs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    refs = reference.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == [r.token_ids for r in refs]
    assert llm.engine.num_free_blocks == 10


def test_preemption_with_prefix_cache_on(llama_dir, reference):
    llm = LLM(llama_dir, show_progress=False, num_kv_blocks=10, enable_prefix_caching=True)
    prompts = [prompt_ids(llm, 24, 40 + i % 2) + [7 + i] for i in range(5)]
    outs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    refs = reference.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == [r.token_ids for r in refs]
    assert llm.engine.num_free_blocks == 10


def test_chunked_prefill_of_a_prompt_longer_than_the_budget(llama_dir, reference):
    llm = LLM(llama_dir, show_progress=False, max_num_batched_tokens=32, num_kv_blocks=64)
    long_prompt = prompt_ids(llm, 150, 5)
    short = prompt_ids(llm, 7, 6)
    steps = 0
    engine = llm.engine
    engine.add_request("long", long_prompt, GREEDY)
    engine.add_request("short", short, GREEDY)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
        assert steps < 200
    assert steps > 150 // 32  # the long prompt really was split
    ref_long, ref_short = reference.generate([long_prompt, short], GREEDY)
    assert done["long"].token_ids == ref_long.token_ids
    assert done["short"].token_ids == ref_short.token_ids
    assert engine.num_free_blocks == 64


def test_abort_in_every_state_frees_blocks(llama_dir):
    llm = LLM(llama_dir, show_progress=False, max_num_batched_tokens=16, num_kv_blocks=32)
    engine = llm.engine
    engine.add_request("running", prompt_ids(llm, 10, 1), GREEDY)
    engine.add_request("chunking", prompt_ids(llm, 60, 2), GREEDY)
    engine.add_request("waiting", prompt_ids(llm, 10, 3), GREEDY)
    engine.step()
    engine.step()
    states = {rid: engine.get_request(rid).status.value for rid in ("running", "chunking", "waiting")}
    assert "running" in states.values()
    for rid in ("running", "chunking", "waiting"):
        assert engine.abort_request(rid)
    outs = engine.step()
    assert {o.request_id for o in outs} == {"running", "chunking", "waiting"}
    assert all(o.finished and o.finish_reason == "abort" for o in outs)
    assert not engine.abort_request("unknown")
    assert engine.num_free_blocks == 32
