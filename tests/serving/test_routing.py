"""The router's placement over several real servers: prefix affinity, failures, conditional disaggregation,
zones, admission control and run-time registration."""
from __future__ import annotations

import concurrent.futures as futures
import json
import os
import signal
import time
import urllib.error
import urllib.request
from dataclasses import asdict

import pytest

from duet.engine.launcher import ServerProcess, query_server
from duet.engine.protocol import StatsRequest

BS = 16


def stats(proc: ServerProcess) -> dict[str, float]:
    [s] = query_server(proc.address, [StatsRequest(1)], 1, timeout_s=20)
    return asdict(s.values)


def post(url: str, body: dict, headers: dict | None = None, timeout: float = 120) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def complete(url: str, prompt: list[int], max_tokens: int = 8, headers: dict | None = None) -> list[int]:
    status, body, _ = post(url, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                                 "logprobs": 0}, headers)
    assert status == 200, body
    return body["choices"][0]["logprobs"]["tokens"]


def metric(url: str, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{" if labels else name) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


def start(procs: list[ServerProcess]) -> list[ServerProcess]:
    for p in procs:
        if p.role in ("router", "serve"):
            p.wait_ready()
    return procs


def stop(procs: list[ServerProcess]) -> None:
    for p in procs:
        p.stop()


def conversations(n: int, turns: int, seed: int) -> list[list[list[int]]]:
    """Per conversation, the new user tokens of each turn (the prompt grows with every reply)."""
    return [[[5 + (seed * 131 + c * 37 + t * 17 + j * 7) % 480 for j in range(20 + 3 * t)] for t in range(turns)]
            for c in range(n)]


def run_trace(url: str, convs, max_tokens: int = 6) -> tuple[list[list[list[str]]], int]:
    """All conversations' turn t, then turn t+1...; each prompt extends the conversation's previous prompt.

    Returns the replies and the achievable prefix-hit tokens: for every follow-up turn, the full blocks of
    the previous prompt (whose KV the previous turn computed), capped so one token is left to compute.
    """
    prompts = [[] for _ in convs]
    replies = [[] for _ in convs]
    achievable = 0
    for t in range(len(convs[0])):
        for c, conv in enumerate(convs):
            previous = prompts[c]
            prompts[c] = previous + conv[t]
            if previous:
                achievable += min(len(previous) // BS, (len(prompts[c]) - 1) // BS) * BS
            replies[c].append(complete(url, prompts[c], max_tokens))
    return replies, achievable


def test_prefix_aware_routing_hits_the_cache_round_robin_does_not(model):
    ps = [ServerProcess("prefill", model, "--kv-transport", "zmq", "--num-kv-blocks", "256") for _ in range(2)]
    ds = [ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "256") for _ in range(2)]
    servers = ["--prefill", *(p.address for p in ps), "--decode", *(d.address for d in ds)]
    aware = ServerProcess("router", model, *servers, "--policy", "prefix_aware")
    rr = ServerProcess("router", model, *servers, "--policy", "round_robin")
    colocated = ServerProcess("serve", model, "--num-kv-blocks", "256")
    procs = start([aware, rr, colocated]) + ps + ds
    try:
        hit_rates = {}
        for name, router, seed in (("prefix_aware", aware, 1), ("round_robin", rr, 2)):
            convs = conversations(3, 4, seed)
            before = sum(stats(d)["prefix_hit_tokens"] for d in ds)
            replies, achievable = run_trace(router.url, convs)
            hits = sum(stats(d)["prefix_hit_tokens"] for d in ds) - before
            hit_rates[name] = hits / achievable
            reference, _ = run_trace(colocated.url, convs)
            assert replies == reference  # token-identical to the colocated server
        assert hit_rates["prefix_aware"] >= 0.9, hit_rates
        assert hit_rates["round_robin"] <= hit_rates["prefix_aware"] - 0.25, hit_rates
        for proc in ps + ds:
            s = stats(proc)
            assert s["free_blocks"] == s["total_blocks"]
    finally:
        stop(procs)


def test_short_prompts_stay_local_long_ones_are_disaggregated(model):
    p = ServerProcess("prefill", model, "--kv-transport", "zmq", "--num-kv-blocks", "64")
    d = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "64")
    r = ServerProcess("router", model, "--prefill", p.address, "--decode", d.address,
                      "--disagg-threshold-tokens", "48")
    procs = start([r]) + [p, d]
    try:
        short = list(range(10, 30))
        long = [5 + (i * 11) % 400 for i in range(120)]
        p0, d0 = stats(p), stats(d)
        complete(r.url, short)
        p1, d1 = stats(p), stats(d)
        assert d1["prompt_tokens_computed"] - d0["prompt_tokens_computed"] == len(short)
        assert p1["prompt_tokens_computed"] == p0["prompt_tokens_computed"]
        complete(r.url, long)
        p2, d2 = stats(p), stats(d)
        assert d2["prompt_tokens_computed"] == d1["prompt_tokens_computed"]
        assert p2["prompt_tokens_computed"] - p1["prompt_tokens_computed"] == len(long)
        assert d2["kv_transfers_received"] == d1["kv_transfers_received"] + 1
        assert metric(r.url, "duet_router_decisions_total", 'reason="disaggregated"') == 1
        assert metric(r.url, "duet_router_decisions_total", 'reason="local_prefill:below_threshold"') == 1
    finally:
        stop(procs)


def test_dead_decode_server_is_dropped_within_three_heartbeats(model):
    d1 = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "64", "--heartbeat-s", "0.2")
    d2 = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "64", "--heartbeat-s", "0.2")
    r = ServerProcess("router", model, "--decode", d1.address, d2.address, "--policy", "round_robin",
                      "--heartbeat-s", "0.2", "--missed-heartbeats", "3")
    procs = start([r]) + [d1, d2]
    try:
        for i in range(4):
            complete(r.url, [7 + i, 8, 9, 10])
        os.kill(d1.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        label = f'server="{d1.address}"'
        while metric(r.url, "duet_router_server_healthy", label) != 0:
            assert time.monotonic() - killed < 3 * 0.2 + 0.5, "router still routes to the dead server"
            time.sleep(0.05)
        for i in range(6):
            assert len(complete(r.url, [20 + i, 21, 22, 23, 24])) == 8
        s = stats(d2)
        assert s["free_blocks"] == s["total_blocks"]
    finally:
        stop(procs)


def test_zones_and_admission_control(model):
    a = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "8", "--zone", "a")
    b = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "64", "--zone", "b")
    r = ServerProcess("router", model, "--decode", a.address, b.address, "--max-queue", "2",
                      "--queue-timeout-s", "30")
    procs = start([r]) + [a, b]
    try:
        before = stats(b)["generated_tokens"]
        complete(r.url, [5, 6, 7], 4, headers={"X-Duet-Zone": "b"})
        assert stats(b)["generated_tokens"] - before == 4
        status, body, _ = post(r.url, {"prompt": [5, 6], "max_tokens": 2}, {"X-Duet-Zone": "nowhere"})
        assert status == 400 and body["error"]["param"] == "X-Duet-Zone" and "nowhere" in body["error"]["message"]
        status, body, _ = post(r.url, {"prompt": [5, 6], "max_tokens": 2}, {"X-Duet-Zone": "z" * 8000})
        assert status == 400 and body["error"]["param"] == "X-Duet-Zone" and len(body["error"]["message"]) < 200

        # Zone a holds 8 blocks = 128 tokens; each request needs 6 blocks, so one runs at a time, two wait
        # in the bounded queue and the rest are turned away with 429.
        prompt = [5 + i % 300 for i in range(40)]

        def one(i):
            return post(r.url, {"prompt": prompt + [i], "max_tokens": 50, "temperature": 0, "ignore_eos": True},
                        {"X-Duet-Zone": "a"})

        with futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
        ok = [body for status, body, _ in results if status == 200]
        rejected = [(body, headers) for status, body, headers in results if status == 429]
        assert len(ok) + len(rejected) == 8
        assert len(ok) >= 1 and len(rejected) >= 1
        assert all(body["usage"]["completion_tokens"] == 50 for body in ok)  # nothing accepted was lost
        assert all("Retry-After" in headers for _, headers in rejected)
        for proc in (a, b):
            s = stats(proc)
            assert s["free_blocks"] == s["total_blocks"]
    finally:
        stop(procs)


def test_servers_can_register_with_the_router_at_run_time(model):
    from duet.engine.launcher import free_port

    port = free_port()
    r = ServerProcess("router", model, "--registry-port", str(port))
    d = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "32",
                      "--router", f"tcp://127.0.0.1:{port}")
    procs = [r, d]
    try:
        r.wait_ready()
        assert len(complete(r.url, [5, 6, 7, 8], 5)) == 5
    finally:
        stop(procs)
