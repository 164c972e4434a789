"""Network partitions across hosts: a host's link goes down (its processes live on, unreachable), then comes back.

The cluster (router, two prefill and two decode servers on their own virtual hosts, ZeroMQ KV transport under
CURVE) is split in two zones so a test can steer a request: zone ``a`` is p1 -> d1 (KV failure policy
``recompute``), zone ``b`` is p2 -> d2 (policy ``fail``). Prefill servers compute each layer slowly
(``--debug-layer-delay-s``) and decode servers step slowly, so a partition lands mid-transfer or mid-stream.

The outcomes are the README's failure table: a prefill host partitioned mid-transfer gives the same tokens
(recompute) or a clean 503 (fail); a decode host partitioned mid-stream gives an uninterrupted stream, moved
to the other decode server under a new attempt, and whatever the partitioned one still produced for the old
attempt never reaches the client; after the partition heals, the host is routed to again and moves KV again
(its transport reconnects); no server holds a block, a request or a transfer at the end.

The same cluster shows the ZeroMQ KV fallback across hosts (``moves_kv_again``: the transfer counters and the
hosts' links), CURVE-protected: a host without the keys cannot even open a KV connection.
"""
from __future__ import annotations

import time

import pytest

from duet.engine.protocol import Hello, ServerInfo
from duet.engine.tools.virtual_hosts import unavailable
from tests.multihost.cluster import Cluster, Reference, prompt_of
from tests.serving.test_faults import wait_until
from duet.transfer.transport import TransferError
from duet.transfer.wire import decode
from duet.transfer.zmq_transport import ZmqTransport

pytestmark = pytest.mark.skipif(unavailable() is not None,
                                reason=f"multi-host tests need network namespaces: {unavailable()}")

PARTITION_S = 4.5  # > the router's 1.8 s dead-server limit; with TCP's backoff, > the ZeroMQ transport's 5 s heartbeat
HOST_ARGS = {"p1": ("--zone", "a"), "d1": ("--zone", "a"), "p2": ("--zone", "b"),
             "d2": ("--zone", "b", "--kv-failure-policy", "fail")}
ZONES = {"a": ("p1", "d1"), "b": ("p2", "d2")}


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama", max_position_embeddings=8192)


@pytest.fixture(scope="module")
def cluster(model, tmp_path_factory):
    c = Cluster(model, tmp_path_factory.mktemp("keys") / "keys", transport="zmq", host_args=HOST_ARGS,
                server_args=("--debug-layer-delay-s", "1.0", "--debug-step-delay-s", "0.03"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference(model):
    return Reference(model)


def healed(cluster: Cluster, name: str) -> None:
    """Bring ``name``'s link back and wait until the router routes to it again."""
    cluster.net[name].link_up()
    wait_until(lambda: cluster.router_metric("duet_router_server_healthy", server=cluster[name].address) == 1, 30,
               f"the router to route to {name} again")


def moves_kv_again(cluster: Cluster, reference: Reference, zone: str, seed: int) -> None:
    """A request of ``zone`` after the partition: disaggregated through the healed pair, no fallback."""
    p, d = ZONES[zone]
    before_p, before_d = cluster.stats(p), cluster.stats(d)
    tx_before, rx_before = cluster.net[p].link_bytes()[1], cluster.net[d].link_bytes()[0]
    prompt = prompt_of(120, seed)
    status, tokens, error = cluster.stream(prompt, 6, zone=zone)
    assert status == 200 and error is None
    assert "".join(tokens) == "".join(reference.tokens(prompt, 6))
    after_p, after_d = cluster.stats(p), cluster.stats(d)
    assert after_p["kv_transfers_sent"] == before_p["kv_transfers_sent"] + 1
    assert after_d["kv_transfers_received"] == before_d["kv_transfers_received"] + 1
    assert after_d["kv_fallbacks"] == before_d["kv_fallbacks"]
    sent = after_p["kv_bytes_sent"] - before_p["kv_bytes_sent"]
    assert sent == after_d["kv_bytes_received"] - before_d["kv_bytes_received"] >= 512 * 112  # 7 full blocks
    # The bytes went over TCP between the two hosts (CURVE-encrypted frames: a little more on the wire).
    assert cluster.net[p].link_bytes()[1] - tx_before >= sent and cluster.net[d].link_bytes()[0] - rx_before >= sent


@pytest.mark.parametrize("zone", ["a", "b"], ids=["recompute", "fail"])
def test_a_prefill_host_partitioned_mid_transfer(cluster, reference, zone):
    p, d = ZONES[zone]
    prompt = prompt_of(200, seed=ord(zone))
    before = cluster.stats(d)
    deaths = cluster.router_metric("duet_router_server_deaths_total")
    pending = cluster.submit_stream(prompt, 8, zone=zone)
    try:
        # Layer 0 is on the decode host; layer 1 is still being computed on the prefill host.
        wait_until(lambda: cluster.stats(d)["kv_layers_received"] > before["kv_layers_received"], 60,
                   "layer 0 to arrive")
        cluster.net[p].link_down()
        down_at = time.monotonic()
        status, tokens, error = pending.result(60)
        after = cluster.stats(d)
        time.sleep(max(0.0, down_at + PARTITION_S - time.monotonic()))
    finally:
        healed(cluster, p)
    assert cluster.router_metric("duet_router_server_deaths_total") >= deaths + 1
    assert after["kv_transfers_received"] == before["kv_transfers_received"]  # the KV never came whole
    if zone == "a":  # recompute: the decode server prefilled the prompt itself; the client sees nothing
        assert status == 200 and error is None
        assert "".join(tokens) == "".join(reference.tokens(prompt, 8))
        assert after["kv_fallbacks"] == before["kv_fallbacks"] + 1
        assert after["prompt_tokens_computed"] >= before["prompt_tokens_computed"] + len(prompt)
    else:  # fail: a clean 503 naming the cause
        assert status == 503 and "KV transfer failed" in error and not tokens
        assert after["kv_failed_requests"] == before["kv_failed_requests"] + 1
    wait_until(lambda: not cluster.leaks(), 40, "every server to free what the partition left")
    moves_kv_again(cluster, reference, zone, seed=ord(zone) + 1)
    assert not cluster.leaks()


def test_a_decode_host_partitioned_mid_stream(cluster, reference):
    prompt, max_tokens = prompt_of(30, seed=7), 80
    migrations = cluster.router_metric("duet_router_migrations_total")
    victim = {}

    async def on_token(n: int) -> None:
        if n >= 10 and not victim:
            [name] = [d for d in ("d1", "d2") if cluster.stats(d)["running"]]
            victim["name"], victim["generated"] = name, cluster.stats(name)["generated_tokens"]
            cluster.net[name].link_down()
            victim["down_at"] = time.monotonic()

    try:
        status, tokens, error = cluster.stream(prompt, max_tokens, on_token)
    finally:
        if victim:
            time.sleep(max(0.0, victim["down_at"] + PARTITION_S - time.monotonic()))
            healed(cluster, victim["name"])
    assert victim, "the stream ended before the partition"
    # Uninterrupted for the client: exactly max_tokens tokens, those of an undisturbed run.
    assert status == 200 and error is None and len(tokens) == max_tokens
    assert "".join(tokens) == "".join(reference.tokens(prompt, max_tokens))
    assert cluster.router_metric("duet_router_migrations_total") >= migrations + 1
    # The partitioned server lived on: it went on generating for the superseded attempt, unheard.
    wait_until(lambda: cluster.stats(victim["name"])["generated_tokens"] > victim["generated"], 20,
               "the partitioned server to show it kept going")
    wait_until(lambda: not cluster.leaks(), 40, "every server to free what the partition left")
    zone = "a" if victim["name"] == "d1" else "b"
    moves_kv_again(cluster, reference, zone, seed=11)  # the healed host takes requests (and KV) again
    assert not cluster.leaks()


def test_a_host_without_the_keys_cannot_open_a_kv_connection(cluster):
    [welcome] = cluster.query(cluster["d1"], [Hello(ServerInfo("probe", "e", "router", "m"))], 1)
    info = welcome.info
    assert info.transport_kind == "zmq" and decode(info.transport_metadata).endpoint.startswith(
        f"tcp://{cluster.net['d1'].ip}:")  # the KV endpoint is advertised at the host's IP too

    def connect(keys):
        with ZmqTransport("intruder", keys=keys, connect_timeout_s=3.0) as t:
            t.connect(info.transport_name, info.transport_metadata)

    with pytest.raises(TransferError, match="handshake"):
        cluster.client.call(connect, None)
    cluster.client.call(connect, cluster.keys)  # the same host with the keys gets in
