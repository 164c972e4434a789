"""Prefix pulls between real server processes (native executor), against cold prefills; kill -9 of the owner.

Server B is told to pull a prompt's cached prefix from server A (``Generate.pull`` to B, ``PullKV`` to A: what the
router sends when its scorer prices the pull under recomputing, see tests/router/test_tier_scoring.py). B's tokens
must equal a cold prefill's (greedy and seeded), whether A serves the prefix from its device pool or from its host
tier; when A dies mid-pull, B computes the prefix itself and still answers. Every test ends with no device block,
host block, request or transfer left on the surviving servers.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import asdict

import pytest

from duet.engine import LLM, SamplingParams
from duet.engine.launcher import ServerProcess, query_server
from duet.engine.protocol import (Generate, Hello, KVFailed, PeerRef, PullDone, PullKV, RemotePull, ServerInfo,
                             StatsRequest, Tokens)

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=6, temperature=1.5, seed=4321, ignore_eos=True)
BS = 16
SERVER_ARGS = ("--kv-transport", "zmq", "--num-kv-blocks", "12", "--host-kv-gib", "0.01")
P1 = [5 + (i * 7) % 400 for i in range(70)]
P2 = [3 + (i * 11) % 450 for i in range(75)]
P3 = [7 + (i * 5) % 350 for i in range(66)]
OTHERS = [[9 + (i * 13 + k * 31) % 500 for i in range(60)] for k in range(4)]


def send(address: str, msg) -> None:
    """One message to a server's command socket, no reply awaited (flushed before the socket closes)."""
    import zmq

    from duet.transfer.wire import encode

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(address)
    sock.send(encode(msg))
    sock.close(linger=5000)


def stats(proc: ServerProcess) -> dict[str, float]:
    [s] = query_server(proc.address, [StatsRequest(1)], 1, timeout_s=30)
    return asdict(s.values)


def info(proc: ServerProcess) -> ServerInfo:
    [welcome] = query_server(proc.address, [Hello(ServerInfo("t", "e", "router", "m"))], 1, timeout_s=60)
    return welcome.info


def generate(proc: ServerProcess, rid: str, prompt: list[int], params=GREEDY, pull: RemotePull | None = None):
    replies = query_server(proc.address, [Generate(rid, prompt, params, pull=pull)], params.max_tokens, timeout_s=90)
    assert all(isinstance(r, Tokens) and not r.delta.error for r in replies), replies
    assert replies[-1].delta.finished
    return [t for r in replies for t in r.delta.token_ids]


def pull(owner: ServerProcess, puller: ServerProcess, rid: str, prompt: list[int], params=GREEDY):
    """B generates ``prompt`` pulling its whole cached prefix from A; returns (B's tokens, A's PullDone)."""
    num_blocks = (len(prompt) - 1) // BS
    a, b = info(owner), info(puller)
    served = {}
    serve = threading.Thread(target=lambda: served.update(done=query_server(
        owner.address, [PullKV(rid, "x-" + rid, prompt[:num_blocks * BS], PeerRef.of(b), 20)], 1, timeout_s=90)[0]))
    serve.start()
    tokens = generate(puller, rid, prompt, params, RemotePull(PeerRef.of(a), "x-" + rid, num_blocks, 20))
    serve.join()
    return tokens, served["done"]


def assert_clean(*procs: ServerProcess) -> None:
    for proc in procs:
        s = stats(proc)
        assert s["free_blocks"] == s["total_blocks"] and s["open_requests"] == 0 and s["open_transfers"] == 0, s
        assert s["host_tier_busy_blocks"] == 0, s


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama", num_layers=4)


@pytest.fixture(scope="module")
def cold(model):
    llm = LLM(model, show_progress=False, num_kv_blocks=64)
    out = {(tuple(p), kind): llm.generate([p], params)[0].token_ids
           for p in (P1, P2, P3) for kind, params in (("greedy", GREEDY), ("seeded", SEEDED))}
    assert out[(tuple(P1), "greedy")] != out[(tuple(P1), "seeded")]
    return out


def test_prefix_pulled_from_device_or_host_tier_equals_a_cold_prefill(model, cold):
    a, b = ServerProcess("decode", model, *SERVER_ARGS), ServerProcess("decode", model, *SERVER_ARGS)
    try:
        a.wait_ready(), b.wait_ready()
        generate(a, "a1", P1)
        tokens, done = pull(a, b, "b1", P1)  # from A's device pool
        assert isinstance(done, PullDone) and done.ok and done.num_blocks == 4, done
        assert tokens == cold[(tuple(P1), "greedy")]
        generate(a, "a2", P2)
        for k, other in enumerate(OTHERS):  # A's device pool (12 blocks) forgets P2; its host tier keeps it
            generate(a, f"o{k}", other)
        tokens, done = pull(a, b, "b2", P2, SEEDED)  # from A's host tier
        assert done.ok and tokens == cold[(tuple(P2), "seeded")]
        sa, sb = stats(a), stats(b)
        assert sb["pull_hits"] == 2 and sb["pulled_tokens"] == 8 * BS and sb["pulls_started"] == 2
        assert sb["prompt_tokens_computed"] == (len(P1) - 4 * BS) + (len(P2) - 4 * BS)
        assert sa["pulls_served"] == 2 and sa["pull_bytes_served"] == sb["pull_bytes_received"] > 0
        assert sa["host_offload_blocks"] >= 8 and sa["host_tier_cached_blocks"] > 0
        assert_clean(a, b)
    finally:
        a.stop(), b.stop()


def test_owner_killed_mid_pull_the_request_recomputes_and_completes(model, cold):
    a, b = ServerProcess("decode", model, *SERVER_ARGS), ServerProcess("decode", model, *SERVER_ARGS)
    try:
        a.wait_ready(), b.wait_ready()
        generate(a, "a1", P1)
        generate(a, "a2", P2)
        tokens, done = pull(a, b, "b0", P2)  # B reaches A's KV transport (what a frozen A could not answer)
        assert done.ok and tokens == cold[(tuple(P2), "greedy")]
        a_info, b_info = info(a), info(b)
        os.kill(a.proc.pid, signal.SIGSTOP)  # A takes the PullKV and B's KVDest, and never answers
        send(a.address, PullKV("b1", "x-b1", P1[:64], PeerRef.of(b_info), 20))
        results = {}
        puller = threading.Thread(target=lambda: results.update(tokens=generate(
            b, "b1", P1, GREEDY, RemotePull(PeerRef.of(a_info), "x-b1", 4, 20))))
        puller.start()
        b_stats = {}
        for _ in range(400):  # B has admitted the pull and is waiting for A's layers
            b_stats = stats(b)
            if b_stats["pulls_started"] == 2 and b_stats["open_transfers"] == 1:
                break
            time.sleep(0.05)
        assert b_stats["open_transfers"] == 1, b_stats
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(10)
        send(b.address, KVFailed("b1", "x-b1", "owner died"))  # what the router sends on A's death
        puller.join(60)
        assert results["tokens"] == cold[(tuple(P1), "greedy")]
        # With A already dead (no KVFailed this time) the request still completes: its pull is refused at admission
        # once B's transport has seen A's connection drop (KVTransport.connected: B tries to reconnect and
        # cannot), or else it starts and fails at its deadline.
        tokens = generate(b, "b2", P3, SEEDED, RemotePull(PeerRef.of(a_info), "x-b2", 4, 1.0))
        assert tokens == cold[(tuple(P3), "seeded")]
        s = stats(b)
        assert s["pulls_started"] in (2, 3) and s["pull_hits"] == 1  # b0
        assert s["prompt_tokens_computed"] == len(P2) - 4 * BS + len(P1) + len(P3)  # b1, b2: every token computed
        assert_clean(b)
    finally:
        a.stop(), b.stop()


def test_router_plans_a_pull_and_the_puller_computes_only_the_rest(model):
    """Round-robin placement sends a conversation's second turn to the other server; the router's tier view
    (events of both tiers) plans a pull of the first turn's blocks from the server that computed them."""
    import asyncio

    from duet.engine.router.cluster import ClusterDispatcher
    from duet.engine.router.dispatcher import GenerateRequest
    from duet.engine.router.scoring import RouterPolicy
    from duet.engine.router.tier_cost import TierPolicy

    a, b = ServerProcess("decode", model, *SERVER_ARGS), ServerProcess("decode", model, *SERVER_ARGS)
    policy = RouterPolicy(policy="round_robin", prior_tokens_per_s=200.0,  # prefill looks slow, pulls cheap
                          tiers=TierPolicy(pulls=True, pull_bytes_per_s=1e10, pull_overhead_s=1e-3))

    async def run():
        disp = ClusterDispatcher([], [a.address, b.address], "m", policy, connect_timeout_s=60, heartbeat_s=1.0)
        await disp.start()
        try:
            out = []
            async for delta in disp.generate(GenerateRequest("t1", P1, GREEDY)):
                out += delta.token_ids
            turn2 = P1 + out + P3[:20]
            await asyncio.sleep(1.0)  # the first turn's KV events reach the router
            toks = []
            async for delta in disp.generate(GenerateRequest("t2", turn2, GREEDY)):
                toks += delta.token_ids
            return turn2, toks, disp.router_metrics.event_counts()
        finally:
            await disp.close()

    try:
        a.wait_ready(), b.wait_ready()
        turn2, tokens, counters = asyncio.run(run())
        assert counters.get("pulls_planned") == 1 and counters.get("pulls_served") == 1, counters
        ref = LLM(model, show_progress=False, num_kv_blocks=64).generate([turn2], GREEDY)[0].token_ids
        assert tokens == ref
        sa, sb = stats(a), stats(b)
        puller = sa if sa["pulls_started"] else sb
        assert puller["pulled_tokens"] == 4 * BS and puller["prompt_tokens_computed"] == len(turn2) - 4 * BS
        assert_clean(a, b)
    finally:
        a.stop(), b.stop()
