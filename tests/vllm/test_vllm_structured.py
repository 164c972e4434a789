"""``engine.serve --executor vllm``: structured outputs and tools reach vLLM's own SamplingParams (vLLM runs the
grammar), through Duet's front end. Same checks as the native executor's (tests/router/structured_checks.py).
Skipped where vLLM is not importable."""
from __future__ import annotations


import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from duet.engine.launcher import ServerProcess
from tests.router.structured_checks import (
    check_json_schema_requests,
    check_required_tool_call,
    check_required_tool_call_streamed,
)

pytestmark = pytest.mark.timeout(900)

SERVE = ("--dtype", "float32", "--block-size", "32", "--num-kv-blocks", "64", "--max-model-len", "512")
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_LOGGING_LEVEL": "WARNING"}


@pytest.fixture(scope="module")
def client(tiny_model):
    model = tiny_model("llama", hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=32)
    proc = ServerProcess("serve", model, "--executor", "vllm", *SERVE, "--served-model-name", "llama", env=VLLM_ENV)
    try:
        proc.wait_ready(600)
        yield openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    finally:
        proc.stop(30)


def test_fifty_json_schema_requests_validate(client):
    check_json_schema_requests(client, "llama", num=50, concurrency=8)


def test_tool_choice_required_streamed_and_not(client):
    check_required_tool_call(client, "llama", seed=1)
    check_required_tool_call_streamed(client, "llama", seed=2)


def test_logit_bias_allowed_tokens_and_guided_choice(client):
    r = client.completions.create(model="llama", prompt=[[0, 40, 41]], max_tokens=3, temperature=0, logprobs=0,
                                  logit_bias={"300": 100})
    assert r.choices[0].logprobs.tokens and len(set(r.choices[0].logprobs.tokens)) == 1
    r = client.completions.create(model="llama", prompt="Pick:", max_tokens=20, temperature=1.0, seed=0,
                                  extra_body={"guided_choice": ["left", "right"]})
    assert r.choices[0].text in ("left", "right")
    r = client.completions.create(model="llama", prompt="x y z", max_tokens=1, extra_body={"prompt_logprobs": 1})
    prompt_logprobs = r.choices[0].model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and all(p is not None for p in prompt_logprobs[1:])
