"""The disaggregated path across hosts, over NIXL/UCX on TCP: the router, two prefill and two decode servers,
each on its own virtual host (own network, IPC, mount and PID namespaces), bound to 0.0.0.0 and advertising
their host's IP.

Shown here: greedy tokens through the router equal the colocated engine's, for a short and a 4k-token
prompt; the KV crossed between hosts (the transport's counters, and the same bytes on the hosts' links: with
no shared memory or PID space UCX can only use TCP, and ``--ucx-tls tcp`` says so); the control plane is
CURVE-protected across hosts (a process without the keys gets no answer). The ZeroMQ KV transport across
hosts is shown in ``test_partitions.py``.
"""
from __future__ import annotations

import pytest

from duet.engine.protocol import Hello, ServerInfo, Welcome
from duet.engine.tools.virtual_hosts import unavailable
from tests.multihost.cluster import Cluster, Reference, prompt_of
from duet.transfer.factory import nixl_importable

pytestmark = [
    pytest.mark.skipif(unavailable() is not None, reason=f"multi-host tests need network namespaces: {unavailable()}"),
    pytest.mark.skipif(not nixl_importable(), reason="NIXL is not installed"),
]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama", max_position_embeddings=8192)


@pytest.fixture(scope="module")
def cluster(model, tmp_path_factory):
    # d2 is not listed on the router's command line: it registers itself (--router), as a pod does.
    c = Cluster(model, tmp_path_factory.mktemp("keys") / "keys", transport="nixl", server_args=("--ucx-tls", "tcp"),
                registered=("d2",))
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference(model):
    return Reference(model)


@pytest.mark.parametrize("num_prompt_tokens", [40, 4100])
def test_greedy_tokens_across_hosts_equal_the_colocated_engines(cluster, reference, num_prompt_tokens):
    prompt, max_tokens = prompt_of(num_prompt_tokens, seed=num_prompt_tokens), 12
    before = {name: cluster.stats(name) for name in ("p1", "p2", "d1", "d2")}
    links_before = {name: cluster.net[name].link_bytes() for name in ("p1", "p2", "d1", "d2")}
    status, tokens, error = cluster.stream(prompt, max_tokens)
    assert status == 200 and error is None
    assert len(tokens) == max_tokens and "".join(tokens) == "".join(reference.tokens(prompt, max_tokens))

    after = {name: cluster.stats(name) for name in ("p1", "p2", "d1", "d2")}
    delta = {name: {k: after[name][k] - before[name][k] for k in after[name]} for name in after}
    [p] = [n for n in ("p1", "p2") if delta[n]["kv_transfers_sent"]]
    [d] = [n for n in ("d1", "d2") if delta[n]["kv_transfers_received"]]
    sent = delta[p]["kv_bytes_sent"]
    # The whole prompt's KV moved, once, from one host to the other; decode computed none of the prompt.
    kv_bytes_per_token = 2 * 2 * 2 * 16 * 4  # layers * (K, V) * KV heads * head dim * fp32
    assert sent == delta[d]["kv_bytes_received"] >= kv_bytes_per_token * (num_prompt_tokens // 16 * 16)
    assert delta[d]["kv_fallbacks"] == 0 and delta[d]["prompt_tokens_computed"] == 0
    assert delta[p]["prompt_tokens_computed"] == num_prompt_tokens
    # ... and over the network: the prefill host's link sent, and the decode host's link received, at least
    # those bytes (UCX cannot take a shared-memory or cross-memory-attach path between these hosts).
    rx_p, tx_p = (a - b for a, b in zip(cluster.net[p].link_bytes(), links_before[p]))
    rx_d, tx_d = (a - b for a, b in zip(cluster.net[d].link_bytes(), links_before[d]))
    assert tx_p >= sent and rx_d >= sent
    assert not cluster.leaks()


def test_every_server_advertises_its_host_address_not_its_bind_address(cluster):
    for name in ("p1", "p2", "d1", "d2"):
        [welcome] = cluster.query(cluster[name], [Hello(ServerInfo("probe", "e", "router", "m"))], 1)
        assert isinstance(welcome, Welcome)
        info, ip = welcome.info, cluster.net[name].ip
        assert info.address == cluster[name].address == f"tcp://{ip}:{cluster[name].port}"
        assert info.event_address.startswith(f"tcp://{ip}:") and info.transport_kind == "nixl"
    out, router_ip = cluster.router.output(), cluster.net["router"].ip
    # What the servers were told to register at: the router's host IP, never its bind address.
    assert "0.0.0.0" not in out and f"DUET_READY router {cluster.router.url} registry tcp://{router_ip}:" in out
    for name in ("p1", "p2", "d1", "d2"):  # all four serve, the registered one too, at their advertised address
        assert cluster.router_metric("duet_router_server_healthy", server=cluster[name].address) == 1


def test_a_host_without_the_keys_is_refused(cluster):
    hello = Hello(ServerInfo("intruder", "e", "router", "m"))
    for name in ("p1", "d1"):
        with pytest.raises(TimeoutError):
            cluster.query(cluster[name], [hello], 1, timeout_s=2.0, keys=None)
        [welcome] = cluster.query(cluster[name], [hello], 1)  # the same host with the keys is answered
        assert isinstance(welcome, Welcome)
