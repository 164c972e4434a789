"""Sampling parameters: seeds, filters, penalties, stop conditions, logprobs."""
from __future__ import annotations

import math

import pytest
import torch
import transformers

from duet.engine import LLM, SamplingParams
from duet.engine.request import Request
from duet.engine.sampler import Sampler


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, show_progress=False, num_kv_blocks=128)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate(["Tell me a story"], p)[0].token_ids
    batched = llm.generate(
        ["Tell me a story", "Another prompt here", "x"],
        [p, SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True), SamplingParams(max_tokens=5, seed=9)],
    )[0].token_ids
    assert alone == batched
    other_seed = llm.generate(["Tell me a story"], SamplingParams(max_tokens=24, temperature=1.0, seed=4321,
                                                                  ignore_eos=True))[0].token_ids
    assert other_seed != alone


def _row_request(vocab: int, **kw) -> Request:
    return Request("r", [1, 2, 3], SamplingParams(**kw), eos_token_ids=(1,))


def test_top_k_top_p_min_p_keep_only_allowed_tokens():
    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(vocab)
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True)
    sampler = Sampler(seed=0)
    top5 = set(order[:5].tolist())
    cum = torch.cumsum(probs[order], 0)
    nucleus = set(order[: int((cum < 0.6).sum()) + 1].tolist())
    minp = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    for kw, allowed in ((dict(top_k=5), top5), (dict(top_p=0.6), nucleus), (dict(min_p=0.2), minp)):
        seen = set()
        for s in range(200):
            req = _row_request(vocab, temperature=1.0, seed=s, **kw)
            seen.add(sampler(logits.unsqueeze(0), [req])[0].token_id)
        assert seen <= allowed and len(seen) > 1, (kw, seen, allowed)


def test_penalties_match_their_definitions():
    vocab = 20
    logits = torch.linspace(-3, 3, vocab)
    req = _row_request(vocab, temperature=0, repetition_penalty=2.0)
    req.prompt_token_ids = [19]  # the argmax; positive logit 3.0 -> 1.5, below token 18 (2.68)
    assert Sampler()(logits.unsqueeze(0), [req])[0].token_id == 18
    req = _row_request(vocab, temperature=0, frequency_penalty=0.2, presence_penalty=0.0)
    req.prompt_token_ids = [0]
    req.output_token_ids = [19, 19, 19]  # 3.0 - 0.6 = 2.4 < 2.68
    assert Sampler()(logits.unsqueeze(0), [req])[0].token_id == 18
    req = _row_request(vocab, temperature=0, presence_penalty=0.5)
    req.output_token_ids = [19]  # 3.0 - 0.5 = 2.5 < 2.68
    assert Sampler()(logits.unsqueeze(0), [req])[0].token_id == 18


def test_logprobs_match_transformers(llm, llama_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ids = llm.tokenizer.encode("Logprobs of a short prompt")
    out = llm.generate([ids], SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == 4
    full = ids + out.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), -1)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(ids) - 1 + i]
        assert math.isclose(lp[tok], row[tok].item(), abs_tol=1e-4)
        top = torch.topk(row, 3).indices.tolist()
        assert set(top) <= set(lp)
        assert tok == top[0]  # greedy


def test_max_tokens_min_tokens_and_ignore_eos(llm):
    eos = llm.engine.eos_token_ids[0]
    ids = llm.tokenizer.encode("Counting")
    out = llm.generate([ids], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    # Make EOS the greedy choice by treating the first greedy token as a stop id: min_tokens must defer it.
    first = out.token_ids[0]
    deferred = llm.generate([ids], SamplingParams(max_tokens=7, temperature=0, stop_token_ids=[first],
                                                  min_tokens=3))[0]
    assert len(deferred.token_ids) >= 3
    assert first not in deferred.token_ids[:3]
    assert eos not in deferred.token_ids[:3]


def test_stop_token_ids_and_stop_strings(llm):
    ids = llm.tokenizer.encode("Once upon a time")
    base = llm.generate([ids], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    stop_id = base.token_ids[4]
    out = llm.generate([ids], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                             stop_token_ids=[stop_id]))[0]
    cut = base.token_ids.index(stop_id) + 1
    assert out.token_ids == base.token_ids[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id

    text = base.text
    stop_str = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip()
                    and "\ufffd" not in text[i:i + 2])
    out = llm.generate([ids], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop_str]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_str
    assert out.text == text[: text.index(stop_str)]
    kept = llm.generate([ids], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop_str],
                                              include_stop_str_in_output=True))[0]
    assert kept.text == text[: text.index(stop_str) + len(stop_str)]


def test_eos_finishes_with_stop_unless_ignored(llm, monkeypatch):
    ids = llm.tokenizer.encode("Will it end")
    first = llm.generate([ids], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0].token_ids[0]
    monkeypatch.setattr(llm.engine, "eos_token_ids", (first,))  # make the greedy first token the EOS
    out = llm.generate([ids], SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.token_ids == [first] and out.finish_reason == "stop" and out.stop_reason == first
    out = llm.generate([ids], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_extreme_parameters_never_break_the_sampler():
    logits = torch.randn(1, 50)
    for kw in (dict(temperature=1e-39), dict(temperature=3e38, min_tokens=1, max_tokens=2), dict(top_p=1e-45),
               dict(repetition_penalty=1e-39), dict(temperature=0.7, repetition_penalty=1e-30, seed=1)):
        req = Request("r", [1, 2, 3], SamplingParams(**kw), eos_token_ids=(1,))
        token = Sampler()(logits, [req])[0].token_id
        assert 0 <= token < 50, kw
