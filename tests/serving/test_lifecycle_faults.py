"""Process lifecycle faults with real processes: a stalled server's late output is fenced off, a draining prefill
server finishes its hand-offs, a restarted server is found again (the rolling model update), and a vanished
router's requests are freed."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
import urllib.request

import aiohttp
import pytest

from duet.engine.launcher import ServerProcess, free_port, query_server
from duet.engine.protocol import Drain, StatsRequest
from tests.serving.test_faults import no_leaks, reference, stats, stream, wait_until


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama", num_layers=4)


def router_metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_stalled_decode_servers_late_tokens_are_fenced_off(model):
    """SIGSTOP the decode server of a stream for 3 s: the router moves the request to the other one under a new
    attempt; when the first wakes, its output for the old attempt is dropped (and it is told to stop), so the
    client gets exactly max_tokens tokens, equal to an uninterrupted run."""
    slow = ("--kv-transport", "zmq", "--num-kv-blocks", "64", "--debug-step-delay-s", "0.04")
    d1, d2 = ServerProcess("decode", model, *slow), ServerProcess("decode", model, *slow)
    r = ServerProcess("router", model, "--decode", d1.address, d2.address).wait_ready()
    prompt = [5 + (i * 11) % 400 for i in range(24)]
    max_tokens = 120
    try:
        stalled = {}

        async def on_token(n):
            if n == 15 and not stalled:
                victim = d1 if stats(d1)["running"] else d2
                os.kill(victim.proc.pid, signal.SIGSTOP)
                stalled["proc"] = victim
                threading.Timer(3.0, os.kill, (victim.proc.pid, signal.SIGCONT)).start()

        status, tokens, error = asyncio.run(stream(r.url, prompt, max_tokens, on_token))
        assert status == 200 and error is None
        assert len(tokens) == max_tokens
        assert "".join(tokens) == "".join(reference(model, prompt, max_tokens))
        assert router_metric(r.url, "duet_router_stale_attempt_messages_dropped_total") >= 1
        assert router_metric(r.url, "duet_router_migrations_total") == 1
        wait_until(lambda: no_leaks(d1, d2), 20, "the stalled server to drop the superseded attempt")
    finally:
        for proc in (r, d1, d2):
            proc.stop()


def test_a_draining_prefill_server_finishes_its_handoffs(model):
    p = ServerProcess("prefill", model, "--kv-transport", "zmq", "--num-kv-blocks", "64", "--debug-layer-delay-s", "0.4")
    d = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "64")
    r = ServerProcess("router", model, "--prefill", p.address, "--decode", d.address,
                      "--disagg-threshold-tokens", "0").wait_ready()
    prompt = [5 + (i * 3) % 400 for i in range(40)]
    try:
        before = stats(d)

        async def main():
            task = asyncio.create_task(stream(r.url, prompt, 6))
            deadline = time.monotonic() + 30
            while not stats(d)["kv_bytes_received"] > before["kv_bytes_received"]:  # layer 0 is in
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            query_server(p.address, [Drain(), StatsRequest(1)], 1)  # mid-transfer: layers 1-3 still to come
            return await task

        status, tokens, error = asyncio.run(main())
        assert status == 200 and error is None
        assert "".join(tokens) == "".join(reference(model, prompt, 6))
        after = stats(d)
        assert after["kv_transfers_received"] == before["kv_transfers_received"] + 1  # the KV came, whole
        assert after["kv_fallbacks"] == before["kv_fallbacks"] and after["prompt_tokens_computed"] == \
            before["prompt_tokens_computed"]
        assert p.proc.wait(15) == 0
        status, tokens, error = asyncio.run(stream(r.url, prompt[:30], 3))  # the router no longer sends it work
        assert status == 200 and error is None
        wait_until(lambda: no_leaks(d), 10, "decode to free its blocks")
    finally:
        for proc in (r, p, d):
            proc.stop()


def test_a_restarted_decode_server_is_used_again(model):
    port = free_port()
    d1 = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "64", port=port)
    d2 = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "64")
    r = ServerProcess("router", model, "--decode", d1.address, d2.address, "--policy", "round_robin").wait_ready()
    d1b = None
    try:
        assert asyncio.run(stream(r.url, [5, 6, 7], 3))[0] == 200
        os.kill(d1.proc.pid, signal.SIGKILL)
        d1.proc.wait(10)
        # Same command port, but a new process: a new epoch and (unpinned) a new event port.
        d1b = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "64", port=port).wait_ready()
        ready_at = time.monotonic()
        while stats(d1b)["generated_tokens"] == 0:
            status, _, error = asyncio.run(stream(r.url, [9, 10, 11], 3))
            assert status == 200 and error is None
            assert time.monotonic() - ready_at < 15, "the router never routed to the restarted server"
            time.sleep(0.2)
        assert "restarted" in r.output() and "routing to it again" in r.output()
    finally:
        for proc in (r, d1, d2, d1b):
            if proc is not None:
                proc.stop()


def test_rolling_model_update_fails_no_request(model, tiny_model):
    """Drain one of two decode servers, restart it with new weights on the same port: requests issued all the
    while all succeed, and the new server takes traffic within a bound."""
    new_weights = tiny_model("llama", num_layers=4, seed=1)
    port = free_port()
    d1 = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "64", port=port)
    d2 = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "64")
    r = ServerProcess("router", model, "--decode", d1.address, d2.address, "--policy", "round_robin").wait_ready()
    d1b = None
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def traffic():
        i = 0
        while not stop.is_set():
            status, _, error = asyncio.run(stream(r.url, [5 + i % 300, 6, 7, 8], 4))
            results.append((status, error))
            i += 1

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        time.sleep(1.0)
        query_server(d1.address, [Drain(), StatsRequest(1)], 1)
        assert d1.proc.wait(30) == 0
        d1b = ServerProcess("decode", new_weights, "--kv-transport", "zmq", "--num-kv-blocks", "64",
                            port=port).wait_ready()
        ready_at = time.monotonic()
        wait_until(lambda: stats(d1b)["generated_tokens"] > 0, 15, "the updated server to take traffic")
        took_s = time.monotonic() - ready_at
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join(60)
        for proc in (r, d1, d2, d1b):
            if proc is not None:
                proc.stop()
    failures = [res for res in results if res != (200, None)]
    assert len(results) > 10 and not failures, failures[:5]
    print(f"rolling update: {len(results)} requests, 0 failed; the new server took traffic {took_s:.2f} s after "
          "it was ready")


def test_a_vanished_router_s_requests_are_aborted(model):
    d = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "64", "--debug-step-delay-s", "0.05")
    r = ServerProcess("router", model, "--decode", d.address, "--lease-ttl-s", "1.5").wait_ready()
    try:
        async def on_token(n):
            if n == 5:
                os.kill(r.proc.pid, signal.SIGKILL)

        with pytest.raises(aiohttp.ClientError):  # the stream breaks off with the router
            asyncio.run(stream(r.url, [5, 6, 7, 8, 9], 400, on_token))
        killed_at = time.monotonic()
        wait_until(lambda: no_leaks(d), 10, "the decode server to abort the dead router's request")
        assert time.monotonic() - killed_at < 1.5 + 3
        assert stats(d)["generated_tokens"] < 400
        assert "went silent past its lease" in d.output()
    finally:
        for proc in (r, d):
            proc.stop()
