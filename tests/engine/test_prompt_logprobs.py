"""Prompt logprobs against Hugging Face transformers: chunked prefill, prefix-cache hits, preemption."""
from __future__ import annotations

import pytest
import torch
import transformers

from duet.engine import EngineConfig, SamplingParams
from duet.engine.llm_engine import LLMEngine

PROMPT = "The quick brown fox jumps over the lazy dog, and then the dog chases the fox around the farm."
TOL = 2e-4


@pytest.fixture(scope="module")
def hf_logprobs(llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    model.eval()

    def score(ids: list[int]) -> torch.Tensor:  # [len(ids), vocab] log-softmax of the positions
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return score


def run(engine: LLMEngine, requests: list[tuple[str, list[int], SamplingParams]]) -> dict:
    for rid, ids, params in requests:
        engine.add_request(rid, ids, params)
    first, final = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                assert out.request_id not in first, "prompt logprobs are returned once"
                first[out.request_id] = out
            if out.finished:
                final[out.request_id] = out
    return {rid: (first.get(rid), final[rid]) for rid in final}


def check_against_hf(out, ids: list[int], ref: torch.Tensor, k: int) -> None:
    plp, ranks = out.prompt_logprobs, out.prompt_token_ranks
    assert len(plp) == len(ids) and plp[0] is None and ranks[0] is None
    for pos in range(1, len(ids)):
        row = ref[pos - 1]
        entry = plp[pos]
        token = ids[pos]
        assert next(iter(entry)) == token  # the prompt token first
        assert abs(entry[token] - row[token].item()) < TOL
        assert ranks[pos] == int((row > row[token]).sum()) + 1
        top_vals, top_ids = torch.topk(row, k)
        for t, v in zip(top_ids.tolist(), top_vals.tolist()):
            assert abs(entry[t] - v) < TOL
        assert len(entry) in (k, k + 1)


@pytest.mark.parametrize("chunk", [8, 256])
def test_prompt_logprobs_match_transformers_across_chunks(llama_dir, hf_logprobs, chunk):
    engine = LLMEngine(EngineConfig(model=llama_dir, show_progress=False, num_kv_blocks=64,
                                    max_num_batched_tokens=chunk, max_model_len=256))
    ids = engine.tokenizer.encode(PROMPT)
    other = engine.tokenizer.encode("Another prompt decoded alongside")
    outs = run(engine, [("a", ids, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=3)),
                        ("b", other, SamplingParams(max_tokens=5, temperature=0))])
    check_against_hf(outs["a"][0], ids, hf_logprobs(ids), 3)
    assert outs["b"][0] is None and outs["b"][1].prompt_logprobs is None


def test_prefix_cache_hit_does_not_skip_unscored_positions(llama_dir, hf_logprobs):
    engine = LLMEngine(EngineConfig(model=llama_dir, show_progress=False, num_kv_blocks=64, block_size=16,
                                    max_model_len=256))
    ids = engine.tokenizer.encode(PROMPT)
    assert len(ids) > 32
    run(engine, [("warm", ids, SamplingParams(max_tokens=1, temperature=0))])
    outs = run(engine, [("plain", ids, SamplingParams(max_tokens=1, temperature=0))])
    assert outs["plain"][1].num_cached_tokens >= 32  # the cache holds the prompt's full blocks
    outs = run(engine, [("scored", ids, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1))])
    first, final = outs["scored"]
    assert final.num_cached_tokens == 0  # no logits for a cached prefix: it was recomputed
    check_against_hf(first, ids, hf_logprobs(ids), 1)
    # The scored request's own blocks went back to the cache for everyone else.
    outs = run(engine, [("after", ids, SamplingParams(max_tokens=1, temperature=0))])
    assert outs["after"][1].num_cached_tokens >= 32


def test_preempted_request_keeps_its_prompt_logprobs(llama_dir, hf_logprobs):
    # 6 blocks of 16 tokens: the long prompt and three growing decodes cannot all stay resident.
    engine = LLMEngine(EngineConfig(model=llama_dir, show_progress=False, num_kv_blocks=8, block_size=16,
                                    max_num_batched_tokens=16, max_model_len=128))
    ids = engine.tokenizer.encode(PROMPT)
    requests = [("scored", ids, SamplingParams(max_tokens=40, temperature=0, prompt_logprobs=2, ignore_eos=True))]
    requests += [(f"d{i}", engine.tokenizer.encode(f"filler number {i}"),
                  SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)) for i in range(3)]
    outs = run(engine, requests)
    assert engine.scheduler.num_preemptions > 0
    check_against_hf(outs["scored"][0], ids, hf_logprobs(ids), 2)


def test_new_sampling_fields_and_prompt_logprobs_cross_the_wire():
    """What the P/D plumbing will carry: SamplingParams with a grammar, biases and prompt_logprobs (Generate),
    and a TokenDelta with prompt logprobs (Tokens), through the typed msgpack codec unchanged."""
    from duet.engine.protocol import FinishReason, Generate, TokenDelta, Tokens
    from duet.engine.sampling_params import StructuredOutputsParams
    from duet.transfer.wire import decode, encode

    params = SamplingParams(max_tokens=4, prompt_logprobs=2, logit_bias={5: -3.5, 7: 100.0},
                            allowed_token_ids=[5, 7, 9], bad_words=["x"], bad_words_token_ids=[[3, 4], [9]],
                            structured_outputs=StructuredOutputsParams(json='{"type": "object"}',
                                                                       disable_any_whitespace=True))
    msg = decode(encode(Generate("r1", [1, 2, 3], params)))
    assert msg.sampling == params
    delta = TokenDelta([7], [{7: -0.5}], True, FinishReason.STOP, prompt_logprobs=[None, {2: -1.5, 9: -0.25}],
                       prompt_token_ranks=[None, 3])
    assert decode(encode(Tokens("r1", delta))).delta == delta
