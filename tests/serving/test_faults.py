"""Faults with real processes and real kill -9: nothing lost, nothing leaked, nothing hangs."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import asdict

import aiohttp
import pytest

from duet.engine import LLM, SamplingParams
from duet.engine.launcher import ServerProcess, query_server
from duet.engine.protocol import Drain, StatsRequest


def stats(proc: ServerProcess) -> dict[str, float]:
    [s] = query_server(proc.address, [StatsRequest(1)], 1, timeout_s=20)
    return asdict(s.values)


def wait_until(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def no_leaks(*procs: ServerProcess) -> bool:
    """Every KV block free, nothing running, no request or transfer still tracked by the server."""
    return all((s := stats(p))["free_blocks"] == s["total_blocks"] and s["running"] == 0 and s["open_requests"] == 0
               and s["open_transfers"] == 0 for p in procs)


async def stream(url: str, prompt: list[int], max_tokens: int, on_token=None,
                 headers: dict[str, str] | None = None) -> tuple[int, list[str], str | None]:
    """Stream a greedy completion; returns (status, token strings, error message)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "logprobs": 0}
    tokens: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
            if resp.status != 200:
                return resp.status, tokens, (await resp.json())["error"]["message"]
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return 200, tokens, chunk["error"]["message"]
                for choice in chunk["choices"]:
                    tokens.extend(choice["logprobs"]["tokens"])
                if on_token is not None:
                    await on_token(len(tokens))
    return 200, tokens, None


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama", num_layers=4)


def reference(model: str, prompt: list[int], max_tokens: int) -> list[str]:
    llm = LLM(model, show_progress=False, num_kv_blocks=64)
    out = llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=0))[0]
    return [llm.tokenizer.convert_tokens_to_string([llm.tokenizer.convert_ids_to_tokens(t)]) for t in out.token_ids]


def test_kill_decode_mid_stream_migrates_to_another_decode(model):
    slow = ("--kv-transport", "zmq", "--num-kv-blocks", "64", "--debug-step-delay-s", "0.05")
    d1, d2 = ServerProcess("decode", model, *slow), ServerProcess("decode", model, *slow)
    r = ServerProcess("router", model, "--decode", d1.address, d2.address).wait_ready()
    prompt = [5 + (i * 7) % 400 for i in range(30)]
    try:
        killed = {}

        async def on_token(n):
            if n >= 8 and not killed:
                victim = d1 if stats(d1)["running"] else d2
                os.kill(victim.proc.pid, signal.SIGKILL)
                killed["proc"] = victim

        status, tokens, error = asyncio.run(stream(r.url, prompt, 40, on_token))
        assert status == 200 and error is None
        assert killed, "the request finished before the kill"
        survivor = d2 if killed["proc"] is d1 else d1
        assert len(tokens) == 40
        assert "".join(tokens) == "".join(reference(model, prompt, 40))
        wait_until(lambda: no_leaks(survivor), 10, "survivor to free its blocks")
    finally:
        for p in (r, d1, d2):
            p.stop()


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_kill_prefill_mid_transfer(model, policy):
    p = ServerProcess("prefill", model, "--kv-transport", "zmq", "--num-kv-blocks", "64", "--debug-layer-delay-s", "0.4")
    d = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "64", "--kv-failure-policy", policy,
                      "--kv-timeout-s", "20")
    r = ServerProcess("router", model, "--prefill", p.address, "--decode", d.address,
                      "--disagg-threshold-tokens", "0").wait_ready()
    prompt = [5 + (i * 3) % 400 for i in range(40)]
    try:
        async def main():
            task = asyncio.create_task(stream(r.url, prompt, 8))
            wait = time.monotonic() + 20
            while not stats(d)["kv_bytes_received"]:  # layer 0 arrived; layers 1-3 are still computing
                assert time.monotonic() < wait
                await asyncio.sleep(0.02)
            os.kill(p.proc.pid, signal.SIGKILL)
            return await task

        status, tokens, error = asyncio.run(main())
        if policy == "recompute":
            assert status == 200 and error is None
            assert "".join(tokens) == "".join(reference(model, prompt, 8))
            assert stats(d)["kv_fallbacks"] >= 1
        else:
            assert status == 503 and "KV transfer failed" in error
        wait_until(lambda: no_leaks(d), 10, "decode to free its blocks")
    finally:
        for proc in (r, p, d):
            proc.stop()


def test_injected_transfer_faults_complete_or_fail_cleanly_without_leaks(model):
    env_p = {"DUET_FAULT_FAIL_WRITE_P": "0.3"}
    env_d = {"DUET_FAULT_DROP_NOTIF_P": "0.3"}
    p = ServerProcess("prefill", model, "--kv-transport", "zmq", "--num-kv-blocks", "128", env=env_p)
    d = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "128", "--kv-timeout-s", "2",
                      env=env_d)
    r = ServerProcess("router", model, "--prefill", p.address, "--decode", d.address,
                      "--disagg-threshold-tokens", "0").wait_ready()
    prompts = [[5 + (i * 13 + j) % 400 for j in range(10 + 3 * i)] for i in range(12)]
    try:
        async def main():
            return await asyncio.gather(*(stream(r.url, pr, 6) for pr in prompts))

        results = asyncio.run(main())
        for (status, tokens, error), prompt in zip(results, prompts):
            assert status == 200 and error is None  # recompute policy: every request completes
            assert "".join(tokens) == "".join(reference(model, prompt, 6))
        s = stats(d)
        assert s["kv_fallbacks"] >= 1  # faults really happened
        wait_until(lambda: no_leaks(p, d), 15, "both servers to free their blocks")
    finally:
        for proc in (r, p, d):
            proc.stop()


def test_two_hundred_concurrent_streams(tiny_model):
    model = tiny_model("llama")
    p = ServerProcess("prefill", model, "--kv-transport", "zmq", "--num-kv-blocks", "512")
    d = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "512", "--max-num-seqs", "256")
    r = ServerProcess("router", model, "--prefill", p.address, "--decode", d.address,
                      "--disagg-threshold-tokens", "0").wait_ready()
    try:
        async def main():
            return await asyncio.gather(*(stream(r.url, [5 + (i + j) % 400 for j in range(12 + i % 20)], 6)
                                          for i in range(200)))

        results = asyncio.run(main())
        assert [e for _, _, e in results if e] == []
        assert all(status == 200 and len(tokens) == 6 for status, tokens, _ in results)
        wait_until(lambda: no_leaks(p, d), 15, "both servers to free their blocks")
    finally:
        for proc in (r, p, d):
            proc.stop()


def test_client_disconnect_frees_blocks_on_both_servers(model):
    p = ServerProcess("prefill", model, "--kv-transport", "zmq", "--num-kv-blocks", "64")
    d = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "64", "--debug-step-delay-s", "0.05")
    r = ServerProcess("router", model, "--prefill", p.address, "--decode", d.address,
                      "--disagg-threshold-tokens", "0").wait_ready()
    try:
        async def main():
            body = {"prompt": list(range(5, 45)), "max_tokens": 200, "stream": True, "ignore_eos": True}
            async with aiohttp.ClientSession() as session:
                async with session.post(r.url + "/v1/completions", json=body) as resp:
                    seen = 0
                    async for _ in resp.content:
                        seen += 1
                        if seen >= 3:
                            break  # leaving the block closes the connection mid-stream
            return seen

        assert asyncio.run(main()) >= 3
        wait_until(lambda: no_leaks(p, d), 10, "blocks to be freed after the disconnect")
        assert stats(d)["generated_tokens"] < 200
    finally:
        for proc in (r, p, d):
            proc.stop()


@pytest.mark.parametrize("how", ["sigterm", "drain_command"])
def test_drain_finishes_in_flight_requests_then_exits(model, how):
    d1 = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "64", "--debug-step-delay-s", "0.03")
    d2 = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "64")
    r = ServerProcess("router", model, "--decode", d1.address, "--decode", d2.address,
                      "--policy", "round_robin").wait_ready()
    try:
        async def main():
            async def on_token(n):
                if n == 3:
                    for proc in (d1, d2):
                        if stats(proc)["running"]:
                            if how == "sigterm":
                                proc.proc.send_signal(signal.SIGTERM)
                            else:  # the Stats reply shows the Drain before it was taken in
                                query_server(proc.address, [Drain(), StatsRequest(1)], 1)
                            main.drained = proc
            main.drained = None
            result = await stream(r.url, list(range(5, 25)), 30, on_token)
            return result, main.drained

        (status, tokens, error), drained = asyncio.run(main())
        assert drained is not None
        assert status == 200 and error is None and len(tokens) == 30  # finished, not cut
        assert drained.proc.wait(15) == 0
        for i in range(4):  # the router stopped routing to the drained server
            status, tokens, error = asyncio.run(stream(r.url, [9, 10 + i, 11], 3))
            assert status == 200 and error is None
    finally:
        for proc in (r, d1, d2):
            proc.stop()


def test_restarted_prefill_server_is_a_new_peer(model):
    from duet.engine.launcher import free_port

    port, event_port = free_port(), free_port()
    args = ("--kv-transport", "nixl", "--num-kv-blocks", "64", "--event-port", str(event_port))
    p1 = ServerProcess("prefill", model, *args, port=port)
    d = ServerProcess("decode", model, "--kv-transport", "nixl", "--num-kv-blocks", "64")
    r = ServerProcess("router", model, "--prefill", p1.address, "--decode", d.address,
                      "--disagg-threshold-tokens", "0").wait_ready()
    p2 = None
    try:
        prompt = [5 + (i * 3) % 400 for i in range(40)]
        expected = "".join(reference(model, prompt, 4))
        assert "".join(asyncio.run(stream(r.url, prompt, 4))[1]) == expected
        os.kill(p1.proc.pid, signal.SIGKILL)
        p1.proc.wait(10)
        p2 = ServerProcess("prefill", model, *args, port=port)  # same address, new epoch, new NIXL agent
        before = stats(d)
        wait_until(lambda: stats(p2)["total_blocks"] > 0, 60, "the new prefill server")
        deadline = time.monotonic() + 30
        while True:  # the router greets the new life; until then it prefills on decode
            status, tokens, error = asyncio.run(stream(r.url, prompt + [7], 4))
            assert status == 200 and error is None
            if stats(d)["kv_transfers_received"] > before["kv_transfers_received"]:
                break
            assert time.monotonic() < deadline, "the restarted prefill server never received work"
            time.sleep(0.3)
        assert stats(d)["kv_fallbacks"] == before["kv_fallbacks"]  # KV came over the new agent, no stale one
        wait_until(lambda: no_leaks(p2, d), 10, "blocks to be freed")
    finally:
        for proc in (r, p1, p2, d):
            if proc is not None:
                proc.stop()
