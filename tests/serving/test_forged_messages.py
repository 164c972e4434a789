"""A decode server meets forged and malformed control messages: each gets an answer (or is ignored), none ends
the process, and the server keeps serving with every KV block free afterwards.

The fault this guards against: a peer-supplied field that reached a socket or a transport unchecked (a
``Generate`` naming a prefill "address" that was not a ZeroMQ endpoint) raised out of the server's loop and
ended the process with every stream on it.
"""
from __future__ import annotations

import dataclasses

import msgpack
import pytest
import zmq

from duet.engine import LLM, SamplingParams
from duet.engine.launcher import ServerProcess, query_server
from duet.engine.protocol import (Abort, Generate, Hello, KVFailed, PeerRef, Refused, RemotePrefill, ServerInfo,
                             StatsRequest, Tokens)
from tests.serving.test_faults import no_leaks
from duet.transfer.factory import nixl_importable
from duet.transfer.wire import PROTOCOL_VERSION

TRANSPORTS = ["zmq", pytest.param("nixl", marks=pytest.mark.skipif(not nixl_importable(), reason="no NIXL"))]
GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama", num_layers=4)


def tokens_of(replies) -> list[int]:
    return [t for r in replies if isinstance(r, Tokens) for t in r.delta.token_ids]


def raw_generate(**fields) -> bytes:
    """A ``generate`` message built by hand, bypassing the codec's checks (what a hostile client can send)."""
    msg = {"v": PROTOCOL_VERSION, "type": "generate", "request_id": "raw", "prompt_token_ids": [5, 6, 7],
           "sampling": {"max_tokens": 2}, **fields}
    return msgpack.packb(msg, use_bin_type=True)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_forged_messages_never_end_a_decode_server(model, transport):
    p = ServerProcess("prefill", model, "--kv-transport", transport, "--num-kv-blocks", "32")
    d = ServerProcess("decode", model, "--kv-transport", transport, "--num-kv-blocks", "32")
    try:
        [welcome] = query_server(p.address, [Hello(ServerInfo("t", "e", "router", "m"))], 1, timeout_s=60)
        good = PeerRef.of(welcome.info)
        prompt = [5 + (i * 7) % 300 for i in range(20)]
        expected = LLM(model, show_progress=False, num_kv_blocks=32).generate([prompt], GREEDY)[0].token_ids
        forged_peers = {
            "not an endpoint": dataclasses.replace(good, transport_metadata=b"not-an-endpoint"),
            "unknown name": dataclasses.replace(good, transport_name="nobody", transport_metadata=b"\x00" * 64),
            "truncated metadata": dataclasses.replace(good, transport_metadata=good.transport_metadata[:20]),
            "other layout": dataclasses.replace(good, layout=dataclasses.replace(good.layout, block_size=32)),
            "other transport": dataclasses.replace(good, transport_kind="carrier-pigeon"),
        }
        for i, (case, peer) in enumerate(forged_peers.items()):
            msg = Generate(f"forged-{i}", prompt, GREEDY, RemotePrefill(peer, f"t-{i}", kv_timeout_s=5))
            replies = query_server(d.address, [msg], GREEDY.max_tokens, timeout_s=60)
            # recompute policy: the decode server prefills it itself, same tokens as the reference
            assert replies[-1].delta.finished and tokens_of(replies) == expected, (case, replies[-1])

        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(d.address)
        try:
            for raw in (b"\xff\x00garbage", msgpack.packb({"v": PROTOCOL_VERSION, "type": "no-such-type"}),
                        raw_generate(request_id="x" * 5000), raw_generate(prompt_token_ids=[]),
                        raw_generate(sampling={"max_tokens": -3}), raw_generate(attempt=-1),
                        raw_generate(remote={"prefill": {"engine_id": "e"}, "transfer_id": "t"}),
                        raw_generate(remote={"prefill": good.__dict__ | {"layout": None}, "transfer_id": "t",
                                             "kv_timeout_s": -1})):
                sock.send(raw)
                assert sock.poll(30_000), raw[:40]
                reply = sock.recv()
                assert b"refused" in reply and b"malformed" in reply, reply[:200]
        finally:
            sock.close(0)
        # Commands about things the server does not know: ignored, not fatal.
        query_server(d.address, [Abort("nobody"), KVFailed("nobody", "no-transfer"), Abort("x", "y", 7)], 0)
        [stats] = query_server(d.address, [StatsRequest(3)], 1, timeout_s=30)
        assert stats.values.peers_refused == len(forged_peers)
        replies = query_server(d.address, [Generate("after", prompt, GREEDY)], GREEDY.max_tokens, timeout_s=60)
        assert tokens_of(replies) == expected
        assert no_leaks(d) and d.proc.poll() is None
        assert not isinstance(replies[-1], Refused)
    finally:
        p.stop(), d.stop()
