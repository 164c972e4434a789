"""Echo / prompt logprobs, structured outputs and tools across the P/D hand-off (prefill server + decode server
+ router, real processes), against the colocated server on the same checkpoint.

What the hand-off must carry: the prompt logprobs are scored by the prefill server and reach the client through
the router (the decode server computes no prompt token); the first token is sampled by the prefill server under
the grammar and the decode server's matcher resumes from it (so seeded structured outputs equal colocated ones).
"""
from __future__ import annotations

from dataclasses import asdict

import openai
import pytest

from duet.engine.launcher import ServerProcess, query_server
from duet.engine.protocol import StatsRequest
from tests.router.structured_checks import PERSON, check_json_schema_requests, check_required_tool_call
from tests.router.test_openai_extras import MODEL, PROMPT, model_dir  # noqa: F401 - the checkpoint fixture

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def servers(model_dir):  # noqa: F811
    common = ("--num-kv-blocks", "512", "--max-model-len", "1024")
    p = ServerProcess("prefill", model_dir, "--kv-transport", "zmq", *common)
    d = ServerProcess("decode", model_dir, "--kv-transport", "zmq", *common)
    r = ServerProcess("router", model_dir, "--prefill", p.address, "--decode", d.address, "--served-model-name",
                      MODEL, "--disagg-threshold-tokens", "0")
    coloc = ServerProcess("serve", model_dir, "--role", "both", "--served-model-name", MODEL, *common)
    try:
        r.wait_ready(180), coloc.wait_ready(180)
        yield dict(p=p, d=d, router=r, coloc=coloc)
    finally:
        for proc in (r, p, d, coloc):
            proc.stop(60)


def clients(servers):
    make = lambda url: openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)  # noqa: E731
    return make(servers["router"].url), make(servers["coloc"].url)


def stats(proc: ServerProcess) -> dict:
    [reply] = query_server(proc.address, [StatsRequest(1)], 1, timeout_s=30)
    return asdict(reply.values)


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_logprobs_come_from_the_prefill_server(servers, max_tokens):
    pd, coloc = clients(servers)
    before = stats(servers["d"])
    got, want = (c.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=2, max_tokens=max_tokens,
                                      temperature=0) for c in (pd, coloc))
    g, w = got.choices[0], want.choices[0]
    assert g.text == w.text and g.logprobs.tokens == w.logprobs.tokens
    assert g.logprobs.token_logprobs[0] is None
    for a, b in zip(g.logprobs.token_logprobs[1:], w.logprobs.token_logprobs[1:]):
        assert abs(a - b) < 1e-4
    for a, b in zip(g.logprobs.top_logprobs[1:], w.logprobs.top_logprobs[1:]):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
    after = stats(servers["d"])
    assert after["prompt_tokens_computed"] == before["prompt_tokens_computed"]  # decode scored no prompt token
    if max_tokens:
        assert after["kv_transfers_received"] > before["kv_transfers_received"]


def test_structured_outputs_across_the_handoff(servers):
    pd, coloc = clients(servers)
    before = stats(servers["d"])
    check_json_schema_requests(pd, MODEL, num=12, concurrency=4)
    # (under concurrency the router may keep some prefills on the decode server when the prefill one is busy)
    assert stats(servers["d"])["kv_transfers_received"] > before["kv_transfers_received"]
    # Seeded: the prefill server samples the first token under the grammar, the decode server resumes the matcher
    # (and the random stream) from it, so the output equals the colocated server's token for token.
    for seed in (3, 11):
        body = dict(model=MODEL, messages=[{"role": "user", "content": f"Person {seed}, as JSON."}], max_tokens=200,
                    temperature=1.0, seed=seed,
                    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        before = stats(servers["d"])
        got = pd.chat.completions.create(**body).choices[0].message.content
        assert stats(servers["d"])["kv_transfers_received"] == before["kv_transfers_received"] + 1
        assert got == coloc.chat.completions.create(**body).choices[0].message.content


def test_required_tool_call_across_the_handoff(servers):
    pd, _ = clients(servers)
    check_required_tool_call(pd, MODEL)
