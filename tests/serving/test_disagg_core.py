"""Disaggregated hand-off between real prefill and decode processes, driven through the cluster dispatcher."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from duet.engine import LLM, SamplingParams
from duet.engine.launcher import ServerProcess, query_server
from duet.engine.protocol import Generate, Hello, PeerRef, RemotePrefill, ServerInfo, StatsRequest, Tokens, Welcome
from duet.engine.router.cluster import ClusterDispatcher
from duet.engine.router.dispatcher import DispatchError, GenerateRequest
from duet.engine.router.scoring import RouterPolicy

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
ALWAYS_DISAGG = RouterPolicy(disagg_threshold_tokens=0)


async def _collect(disp, rid, prompt, params=GREEDY):
    toks = []
    async for d in disp.generate(GenerateRequest(rid, prompt, params)):
        toks += d.token_ids
    return toks


@pytest.fixture(scope="module")
def four_layer_model(tiny_model):
    return tiny_model("llama", num_layers=4)


def test_layers_stream_while_prefill_still_computes(four_layer_model):
    """With a slowed prefill (0.3 s per layer), decode receives layer 0 before prefill computed layer 3."""
    p = ServerProcess("prefill", four_layer_model, "--kv-transport", "nixl", "--debug-layer-delay-s", "0.3",
                      "--num-kv-blocks", "32")
    d = ServerProcess("decode", four_layer_model, "--kv-transport", "nixl", "--num-kv-blocks", "32")
    prompt = list(range(5, 45))

    async def main():
        disp = ClusterDispatcher([p.address], [d.address], "m", ALWAYS_DISAGG, connect_timeout_s=60)
        await disp.start()
        try:
            toks = await _collect(disp, "stream-1", prompt)
            return toks, await disp.server_stats()
        finally:
            await disp.close()

    try:
        toks, stats = asyncio.run(main())
    finally:
        p.stop(), d.stop()
    ref = LLM(four_layer_model, show_progress=False, num_kv_blocks=32).generate([prompt], GREEDY)[0]
    assert toks == ref.token_ids
    p_trace = stats[p.address].traces["stream-1"]
    d_trace = stats[d.address].traces["stream-1"]
    assert d_trace["kv_layer_0_received"] < p_trace["layer_3_computed"]
    assert p_trace["layer_3_computed"] - p_trace["layer_0_computed"] >= 0.8  # the delay really applied
    assert stats[d.address].values.prompt_tokens_computed == 0
    assert stats[d.address].values.kv_bytes_received > 0


def test_incompatible_peers_are_refused_and_nothing_hangs(tiny_model):
    """Block size 32 vs 16: the router refuses the pair at start-up, and a decode server told to pull from
    the mismatched prefill server refuses it before any KV moves and prefills locally instead."""
    model = tiny_model("llama")
    p = ServerProcess("prefill", model, "--kv-transport", "zmq", "--block-size", "32", "--num-kv-blocks", "16")
    d = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "32")
    try:
        async def router_start():
            disp = ClusterDispatcher([p.address], [d.address], "m", ALWAYS_DISAGG, connect_timeout_s=60)
            try:
                await disp.start()
            finally:
                await disp.close()

        with pytest.raises(DispatchError, match="block_size"):
            asyncio.run(router_start())
        other = ServerProcess("prefill", tiny_model("qwen2"), "--kv-transport", "zmq", "--num-kv-blocks", "16")
        try:
            async def router_start_other_model():
                disp = ClusterDispatcher([other.address], [d.address], "m", connect_timeout_s=60)
                try:
                    await disp.start()
                finally:
                    await disp.close()

            with pytest.raises(DispatchError, match="model"):
                asyncio.run(router_start_other_model())
        finally:
            other.stop()

        [welcome] = query_server(p.address, [Hello(ServerInfo("t", "e", "router", "m"))], 1, timeout_s=60)
        assert isinstance(welcome, Welcome)
        prompt = list(range(7, 30))
        remote = RemotePrefill(PeerRef.of(welcome.info), "xfer-1", kv_timeout_s=10)
        msgs = [Generate("direct-1", prompt, GREEDY, remote)]
        replies = query_server(d.address, msgs, GREEDY.max_tokens, timeout_s=60)
        tokens = [t for r in replies if isinstance(r, Tokens) for t in r.delta.token_ids]
        assert replies[-1].delta.finished
        ref = LLM(model, show_progress=False, num_kv_blocks=32).generate([prompt], GREEDY)[0]
        assert tokens == ref.token_ids
        [stats] = query_server(d.address, [StatsRequest(7)], 1)
        assert stats.values.peers_refused == 1
        assert stats.values.kv_fallbacks == 1
        assert stats.values.free_blocks == stats.values.total_blocks
    finally:
        p.stop(), d.stop()


def test_fail_policy_answers_every_request_for_an_unusable_peer_with_an_error(tiny_model):
    """Under --kv-failure-policy fail, a request whose prefill server cannot be used ends with a 503 error
    naming the KV failure, the first one and every later one (once the peer is known to be unusable)."""
    model = tiny_model("llama")
    p = ServerProcess("prefill", model, "--kv-transport", "zmq", "--block-size", "32", "--num-kv-blocks", "16")
    d = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "32", "--kv-failure-policy", "fail")
    try:
        [welcome] = query_server(p.address, [Hello(ServerInfo("t", "e", "router", "m"))], 1, timeout_s=60)
        remote = RemotePrefill(PeerRef.of(welcome.info), "xfer", kv_timeout_s=10)
        for i in range(3):
            msg = Generate(f"r{i}", list(range(7, 30)), GREEDY, replace(remote, transfer_id=f"xfer-{i}"))
            [reply] = query_server(d.address, [msg], 1, timeout_s=60)
            delta = reply.delta
            assert delta.finished and delta.finish_reason == "error" and delta.status == 503, delta
            assert "KV transfer" in delta.error and "block_size" in delta.error, delta.error
        [stats] = query_server(d.address, [StatsRequest(7)], 1)
        assert stats.values.kv_failed_requests == 3 and stats.values.open_requests == 0
        assert stats.values.free_blocks == stats.values.total_blocks
    finally:
        p.stop(), d.stop()
