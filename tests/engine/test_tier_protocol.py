"""The tier fields and messages on the wire: old senders still decode, bad values are refused where decoded."""
from __future__ import annotations

import msgpack
import pytest

from duet.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from duet.engine.protocol import Generate, KVEvents, PeerRef, PullDone, PullKV, RemotePull, ServerStats, Stats
from duet.engine.sampling_params import SamplingParams
from duet.transfer.compat import KVLayout
from duet.transfer.wire import PROTOCOL_VERSION, ProtocolError, decode, encode

LAYOUT = KVLayout("m", "float32", 2, 2, 8, 16)
PEER = PeerRef("a", LAYOUT, "zmq", "a-xyz", b"meta")


def test_events_without_a_tier_are_device_events_and_host_events_round_trip():
    old = msgpack.packb({"v": PROTOCOL_VERSION, "type": "kv_events", "engine_id": "e", "epoch": "x", "events": [
        {"block_hashes": [1, 2], "parent_hash": 0, "kind": "stored"}, {"block_hashes": [1], "kind": "removed"},
        {"kind": "cleared"}]})
    events = decode(old).events
    assert [e.tier for e in events] == ["device"] * 3 and isinstance(events[0], BlockStored)
    new = [BlockStored([3], 2, [9] * 16, 16, tier="host"), BlockRemoved([3], tier="host"), AllBlocksCleared(tier="host")]
    assert decode(encode(KVEvents("e", "x", new))).events == new
    bad = msgpack.packb({"v": PROTOCOL_VERSION, "type": "kv_events", "engine_id": "e", "epoch": "x",
                         "events": [{"block_hashes": [1], "kind": "removed", "tier": "disk"}]})
    with pytest.raises(ProtocolError):
        decode(bad)


def test_pull_messages_round_trip_and_old_generates_have_no_pull():
    params = SamplingParams(max_tokens=3)
    msg = Generate("r", [1, 2, 3], params, pull=RemotePull(PEER, "t", 4, 5.0))
    assert decode(encode(msg)) == msg
    old = encode(Generate("r", [1, 2, 3], params))
    assert decode(old).pull is None
    for m in (PullKV("r", "t", list(range(32)), PEER, 3.0), PullDone("r", "t", True, None, 2, 4096, 0.01)):
        assert decode(encode(m)) == m
    with pytest.raises(ValueError, match="num_blocks"):
        RemotePull(PEER, "t", 0)
    with pytest.raises(ValueError, match="timeout_s"):
        PullKV("r", "t", [1], PEER, timeout_s=0)
    with pytest.raises(ValueError, match="prefix_token_ids"):
        PullKV("r", "t", [], PEER)
    raw = encode(Generate("r", [1], params, pull=RemotePull(PEER, "t", 1)))
    obj = msgpack.unpackb(raw, strict_map_key=False)
    obj["pull"]["num_blocks"] = -5  # a hostile router: refused where decoded
    with pytest.raises(ProtocolError, match="generate.pull"):
        decode(msgpack.packb(obj))


def test_tier_stats_travel_with_the_server_stats():
    stats = ServerStats(host_hits=3, host_hit_tokens=48, pulled_tokens=64, host_load_seconds_sum=0.5)
    assert decode(encode(Stats(1, "e", stats))).values == stats
