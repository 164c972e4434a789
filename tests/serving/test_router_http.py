"""Router + prefill + decode processes on 127.0.0.1, driven by the real ``openai`` client.

Every disaggregated result is checked against the colocated server (``engine.serve --role both``) and against
``engine.LLM`` in this process. Both KV transports (NIXL and ZeroMQ) run the same checks.
"""
from __future__ import annotations

import concurrent.futures as futures
import json
import urllib.error
import urllib.request
from dataclasses import asdict

import openai
import pytest

from duet.engine import LLM, SamplingParams
from duet.engine.launcher import ServerProcess, free_port, query_server
from duet.engine.protocol import StatsRequest
from tests.metrics.exposition import VLLM_ENGINE_FAMILIES, VLLM_REQUEST_FAMILIES, check_vllm_families, samples

NUM_BLOCKS = "96"


def mixed_prompts(n: int) -> list[list[int]]:
    return [[5 + (i * 31 + j * 7) % 480 for j in range(2 + (i * 13) % 70)] for i in range(n)]


def server_stats(proc: ServerProcess) -> dict[str, float]:
    [stats] = query_server(proc.address, [StatsRequest(1)], 1, timeout_s=20)
    return asdict(stats.values)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def colocated(model):
    proc = ServerProcess("serve", model, "--num-kv-blocks", NUM_BLOCKS, "--served-model-name", "llama").wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module", params=["nixl", "zmq"])
def cluster(request, model):
    kind = request.param
    p = ServerProcess("prefill", model, "--kv-transport", kind, "--num-kv-blocks", NUM_BLOCKS,
                      "--metrics-port", str(free_port()))
    d = ServerProcess("decode", model, "--kv-transport", kind, "--num-kv-blocks", NUM_BLOCKS,
                      "--metrics-port", str(free_port()))
    r = ServerProcess("router", model, "--prefill", p.address, "--decode", d.address, "--served-model-name", "llama",
                      "--disagg-threshold-tokens", "0", "--debug-traces")
    try:
        r.wait_ready()
        yield kind, p, d, r
    finally:
        for proc in (r, p, d):
            proc.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy_completions(url: str, prompts: list[list[int]], max_tokens: int) -> list[list[str]]:
    c = client(url)

    def one(p):
        r = c.completions.create(model="llama", prompt=p, max_tokens=max_tokens, temperature=0,
                                 logprobs=0, extra_body={"ignore_eos": True})
        return r.choices[0].logprobs.tokens, r.choices[0].text, r.usage.completion_tokens

    with futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_sixteen_concurrent_requests_match_colocated_and_llm(cluster, colocated, model):
    kind, p, d, r = cluster
    prompts = mixed_prompts(16)
    d_before, p_before = server_stats(d), server_stats(p)
    disagg = greedy_completions(r.url, prompts, 12)
    coloc = greedy_completions(colocated.url, prompts, 12)
    ref = LLM(model, show_progress=False, num_kv_blocks=96).generate(
        prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [x[1] for x in disagg] == [x[1] for x in coloc] == [o.text for o in ref]
    assert [x[0] for x in disagg] == [x[0] for x in coloc]
    assert all(x[2] == 12 for x in disagg)
    d_after, p_after = server_stats(d), server_stats(p)
    # The KV arrived over the transport and decode computed no prompt token of these requests.
    assert d_after["kv_bytes_received"] > d_before["kv_bytes_received"]
    assert d_after["kv_transfers_received"] - d_before["kv_transfers_received"] == 16
    assert d_after["prompt_tokens_computed"] == d_before["prompt_tokens_computed"]
    assert p_after["prompt_tokens_computed"] > p_before["prompt_tokens_computed"]
    assert d_after["kv_fallbacks"] == d_before["kv_fallbacks"]
    for stats in (d_after, p_after):
        assert stats["free_blocks"] == stats["total_blocks"]


def test_seeded_sampling_continues_across_the_hand_off(cluster, colocated):
    """A seeded sampled request gives the colocated server's tokens: D continues P's random stream."""
    _, _, d, r = cluster
    prompt = mixed_prompts(3)[2]
    before = server_stats(d)

    def sample(url: str, seed: int) -> list[str]:
        out = client(url).completions.create(model="llama", prompt=prompt, max_tokens=16, temperature=1.0, seed=seed,
                                             logprobs=0, extra_body={"ignore_eos": True})
        return out.choices[0].logprobs.tokens

    runs = {seed: (sample(r.url, seed), sample(colocated.url, seed)) for seed in (11, 12)}
    for disagg, coloc in runs.values():
        assert disagg == coloc
    assert runs[11][1] != runs[12][1]  # the sampling is random: the seeds matter
    after = server_stats(d)
    assert after["kv_transfers_received"] - before["kv_transfers_received"] == 2  # both went through P/D
    assert after["prompt_tokens_computed"] == before["prompt_tokens_computed"]


def test_openai_client_features_through_the_router(cluster, colocated):
    _, p, d, r = cluster
    c, ref = client(r.url), client(colocated.url)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, who are you?"}]
    a = c.chat.completions.create(model="llama", messages=chat, max_tokens=10, temperature=0)
    b = ref.chat.completions.create(model="llama", messages=chat, max_tokens=10, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.role == "assistant"

    stream = c.completions.create(model="llama", prompt="Streaming test prompt", max_tokens=9, temperature=0,
                                  stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9 and not chunks[-1].choices
    whole = ref.completions.create(model="llama", prompt="Streaming test prompt", max_tokens=9, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert text == whole.choices[0].text

    chat_stream = list(c.chat.completions.create(model="llama", messages=chat, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chat_stream if ch.choices) == \
        b.choices[0].message.content

    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="llama", prompt="x", max_tokens=-1)
    assert "max_tokens" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="llama", prompt=[999999], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-model", prompt="x", max_tokens=2)

    with urllib.request.urlopen(r.url + "/health", timeout=10) as resp:
        assert resp.status == 200
    models = json.loads(urllib.request.urlopen(r.url + "/v1/models", timeout=10).read())
    assert models["data"][0]["id"] == "llama"
    for proc in (p, d):
        stats = server_stats(proc)
        assert stats["free_blocks"] == stats["total_blocks"]


def test_router_metrics_read_like_vllms(cluster, colocated):
    """Router and colocated ``/metrics`` through prometheus_client's parser: vLLM's names, types and labels
    (the recorded vLLM exposition), per-server engine families from the servers' stats, the router's own."""
    kind, p, d, r = cluster
    prompt = list(range(5, 45))
    for url in (r.url, colocated.url):
        client(url).completions.create(model="llama", prompt=prompt, max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
    text = urllib.request.urlopen(colocated.url + "/metrics", timeout=10).read().decode()
    check_vllm_families(text, VLLM_ENGINE_FAMILIES + VLLM_REQUEST_FAMILIES + ("vllm:prefix_cache_queries",))

    text = urllib.request.urlopen(r.url + "/metrics", timeout=30).read().decode()
    fams = check_vllm_families(text, VLLM_ENGINE_FAMILIES + VLLM_REQUEST_FAMILIES + ("vllm:admission_rejections",))
    ids = {s[0]["engine"]: s[0]["role"] for s in samples(text, "duet_router_server_healthy")}
    assert sorted(ids.values()) == ["decode", "prefill"]
    engines = {lb["engine"] for lb, _ in samples(text, "vllm:num_requests_running")}
    assert engines == set(ids), "one vllm:num_requests_running series per server, engine = its id"
    decode_id = next(e for e, role in ids.items() if role == "decode")
    received = [v for lb, v in samples(text, "duet_kv_received_bytes_total") if lb["engine"] == decode_id]
    assert received and received[0] > 0
    assert [v for lb, v in samples(text, "duet_router_decisions_total") if lb["reason"] == "disaggregated"][0] >= 1
    assert samples(text, "duet_handoff_seconds_count")[0][1] >= 1
    assert fams["duet_prefill_compute_seconds"] == ("histogram", {"model_name"})
    usage = {lb["role"]: v for lb, v in samples(text, "duet_router_kv_cache_usage_perc")}
    assert set(usage) == {"prefill", "decode"} and all(0 <= v <= 1 for v in usage.values())
    assert not [n for n in fams if n.startswith("duet_server_")], "a server stat without a name in the table"
    ttft = samples(text, "vllm:time_to_first_token_seconds_count")
    assert ttft[0][0] == {"model_name": "llama", "engine": "router"} and ttft[0][1] >= 1

    # Each server's own --metrics-port: the same engine families, the same engine id as the router shows.
    for proc, role in ((p, "prefill"), (d, "decode")):
        port = proc.proc.args[proc.proc.args.index("--metrics-port") + 1]
        own = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        own_fams = check_vllm_families(own, VLLM_ENGINE_FAMILIES)
        [(labels, _)] = samples(own, "vllm:num_requests_running")
        assert ids[labels["engine"]] == role and labels["model_name"] == proc.proc.args[proc.proc.args.index(
            "--model") + 1]
        assert own_fams["process_cpu_seconds"][0] == "counter"
        assert not [n for n in own_fams if n.startswith("duet_server_") and "stats_errors" not in n]


def test_request_trace_spans_router_prefill_and_decode(cluster):
    _, p, d, r = cluster
    done = client(r.url).completions.create(model="llama", prompt=list(range(5, 40)), max_tokens=3, temperature=0)
    trace = json.loads(urllib.request.urlopen(f"{r.url}/debug/requests/{done.id}", timeout=30).read())["stages"]
    router, prefill, decode = trace["router"], trace[p.address], trace[d.address]
    assert router["received"] <= router["placed:disaggregated"] <= router["first_token"] <= router["finished"]
    assert prefill["prefill_admitted"] <= prefill["layer_0_computed"] <= prefill["layer_0_sent"]
    assert decode["decode_admitted"] <= decode["kv_layer_0_received"] <= decode["kv_complete"]
    assert decode["kv_complete"] <= decode["first_token_sent"] <= decode["finished"] <= router["finished"] + 1
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{r.url}/debug/requests/no-such-id", timeout=30)
    assert err.value.code == 404
