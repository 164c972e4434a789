"""CURVE on every ZeroMQ socket of a real cluster, and the API key on HTTP."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import zmq

from duet.engine.launcher import ServerProcess, query_server
from duet.engine.protocol import Hello, ServerInfo, StatsRequest
from duet.transfer.curve import load_keys, make_keys, secure_client


def test_curve_cluster_serves_key_holders_only(tiny_model, tmp_path):
    model = tiny_model("llama")
    keys_dir = tmp_path / "keys"
    make_keys(keys_dir)
    keys = load_keys(keys_dir)
    other_dir = tmp_path / "other"
    make_keys(other_dir)
    sec = ("--zmq-keys", str(keys_dir))
    p = ServerProcess("prefill", model, "--kv-transport", "zmq", "--num-kv-blocks", "32", *sec)
    d = ServerProcess("decode", model, "--kv-transport", "zmq", "--num-kv-blocks", "32", *sec)
    r = ServerProcess("router", model, "--prefill", p.address, "--decode", d.address, "--disagg-threshold-tokens",
                      "0", "--api-key", "sesame", *sec)
    try:
        r.wait_ready()
        body = json.dumps({"prompt": [5, 6, 7, 8, 9], "max_tokens": 4, "temperature": 0, "ignore_eos": True}).encode()
        req = urllib.request.Request(r.url + "/v1/completions", body, {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 401
        req.add_header("Authorization", "Bearer sesame")
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] == 4

        # Key holders can talk to the servers; the disaggregated request above moved KV between them.
        [stats] = query_server(d.address, [StatsRequest(1)], 1, keys=keys)
        assert stats.values.kv_transfers_received == 1
        # Without keys, or with a foreign key pair, a client can neither command a server...
        for intruder in (None, load_keys(other_dir)):
            with pytest.raises(TimeoutError):
                query_server(d.address, [Hello(ServerInfo("x", "e", "router", "m"))], 1, timeout_s=1.5,
                             keys=intruder)
        # ...nor read its events (load reports are published every heartbeat).
        info = query_server(d.address, [Hello(ServerInfo("x", "e", "router", "m"))], 1, keys=keys)[0].info
        ctx = zmq.Context.instance()
        for subscriber_keys, expect in ((keys, True), (None, False), (load_keys(other_dir), False)):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            secure_client(sub, subscriber_keys)
            sub.connect(info.event_address)
            try:
                assert bool(sub.poll(2000)) is expect
            finally:
                sub.close(0)
    finally:
        for proc in (r, p, d):
            proc.stop()
