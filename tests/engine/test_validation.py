"""Bad input is refused with a ValueError naming the field; the engine keeps serving everyone else."""
from __future__ import annotations

import math

import pytest

from duet.engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, show_progress=False, num_kv_blocks=64, max_model_len=256)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(presence_penalty=5.0), "presence_penalty"),
        (dict(logprobs=50), "logprobs"),
        (dict(max_tokens="12"), "max_tokens"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_name_the_field_and_engine_keeps_serving(llm):
    engine = llm.engine
    free0 = engine.num_free_blocks
    vocab = engine.model_config.vocab_size
    engine.add_request("good", [5, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    cases = [
        ([], SamplingParams(), "prompt"),
        ("", SamplingParams(), "prompt"),
        ([1, vocab], SamplingParams(), "prompt_token_ids"),
        ([1, -1], SamplingParams(), "prompt_token_ids"),
        ([1] * 200, SamplingParams(max_tokens=100), "max_tokens"),
        ([1, 2], SamplingParams(stop_token_ids=[vocab + 5]), "stop_token_ids"),
    ]
    for i, (prompt, params, field) in enumerate(cases):
        with pytest.raises(ValueError, match=field):
            engine.add_request(f"bad{i}", prompt, params)
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("good", [1, 2], SamplingParams())
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(o for o in engine.step() if o.finished)
    assert [o.request_id for o in outs] == ["good"] and len(outs[0].token_ids) == 6
    assert engine.num_free_blocks == free0


def test_generate_validates_all_prompts_before_running_any(llm):
    free0 = llm.engine.num_free_blocks
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([[5, 6, 7], []], SamplingParams(max_tokens=3))
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.num_free_blocks == free0
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 3


def test_engine_config_is_validated(llama_dir):
    from duet.engine import EngineConfig

    for kwargs, field in ((dict(block_size=7), "block_size"), (dict(max_num_seqs=0), "max_num_seqs"),
                          (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
                          (dict(dtype="int8"), "dtype"), (dict(max_model_len=10**9), "max_model_len"),
                          (dict(load_format="pt"), "load_format"), (dict(cuda_graphs=1), "cuda_graphs"),
                          (dict(cuda_graph_max_batch=0), "cuda_graph_max_batch")):
        with pytest.raises(ValueError, match=field):
            LLM(llama_dir, show_progress=False, **kwargs)
    with pytest.raises(ValueError, match="model"):
        EngineConfig(model="")
