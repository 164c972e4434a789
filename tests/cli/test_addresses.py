"""``--host`` / ``--advertise-host``: what each process binds and what it tells others, checked at start-up.

The multi-host behaviour (0.0.0.0 bound, a namespace IP advertised, peers on other hosts) is in
``tests/multihost``; here are the rules themselves, and every command refusing a bad address in one line
before it loads anything."""
from __future__ import annotations

import pytest

from duet.engine.server import advertised_address
from duet.engine.server.advertised_address import AdvertisedAddress
from duet.engine.server.server_config import ServerConfig
from tests.cli.test_cli import run_cli  # noqa: F401 - the fixture
from duet.transfer.wire import decode
from duet.transfer.zmq_transport import ZmqTransport


@pytest.mark.parametrize("bind, advertise, allow, expected", [
    ("127.0.0.1", None, False, "127.0.0.1"),  # the default: loopback everywhere
    ("10.1.2.3", None, False, "10.1.2.3"),  # a specific address is advertised as is
    ("0.0.0.0", "10.1.2.3", False, "10.1.2.3"),  # a pod: every interface, reached at the pod IP
    ("10.1.2.3", "203.0.113.9", False, "203.0.113.9"),  # behind NAT: the public address
    ("0.0.0.0", "127.0.0.1", True, "127.0.0.1"),  # asked for: every peer on this host
    ("127.0.0.1", "localhost", False, "localhost"),
    ("127.0.0.1", "10.1.2.3", False, "10.1.2.3"),  # only warns: a forwarder may make it reachable
    ("::", "fd00::5", False, "fd00::5"),
])
def test_accepted_addresses(bind, advertise, allow, expected):
    where = AdvertisedAddress.resolve(bind, advertise, allow_loopback=allow)
    assert where.bind_host == bind and where.advertise_host == expected
    port_host = f"[{expected}]" if ":" in expected else expected
    assert where.endpoint(7001) == f"tcp://{port_host}:7001"
    assert where.url("http", 8000) == f"http://{port_host}:8000"


@pytest.mark.parametrize("bind, advertise, needle", [
    ("0.0.0.0", "127.0.0.1", "--advertise-host 127.0.0.1 is a loopback address but --host 0.0.0.0"),
    ("0.0.0.0", "localhost", "--advertise-host localhost is a loopback address"),
    ("10.1.2.3", "127.0.0.5", "--advertise-host 127.0.0.5 is a loopback address but --host 10.1.2.3"),
    ("0.0.0.0", "0.0.0.0", "is not an address anyone can connect to"),
    ("10.1.2.3", "*", "is not an address anyone can connect to"),
])
def test_refused_addresses_name_the_flags(bind, advertise, needle):
    with pytest.raises(ValueError) as e:
        AdvertisedAddress.resolve(bind, advertise)
    assert needle in str(e.value)
    assert ("--allow-loopback-advertise" in str(e.value)) == ("loopback" in needle)


def test_a_wildcard_bind_without_advertise_host_uses_the_primary_address_or_refuses(monkeypatch):
    monkeypatch.setattr(advertised_address, "primary_address", lambda: "10.9.8.7")
    assert AdvertisedAddress.resolve("0.0.0.0").advertise_host == "10.9.8.7"
    monkeypatch.setattr(advertised_address, "primary_address", lambda: "127.0.1.1")  # a bare /etc/hosts
    with pytest.raises(ValueError, match="this host's address could not be found .got 127.0.1.1.: give "
                                         "--advertise-host"):
        AdvertisedAddress.resolve("0.0.0.0")
    assert AdvertisedAddress.resolve("0.0.0.0", allow_loopback=True).advertise_host == "127.0.1.1"


def test_server_config_validates_addresses_and_ucx_settings():
    cfg = ServerConfig(role="decode", host="0.0.0.0", advertise_host="10.0.0.7", ucx_tls="tcp",
                       ucx_net_devices="mlx5_0:1,eth0")
    assert cfg.advertised == AdvertisedAddress("0.0.0.0", "10.0.0.7")
    with pytest.raises(ValueError, match="loopback"):
        ServerConfig(role="decode", host="0.0.0.0", advertise_host="127.0.0.1")
    assert ServerConfig(role="decode", host="0.0.0.0", advertise_host="127.0.0.1",
                        allow_loopback_advertise=True).advertised.advertise_host == "127.0.0.1"
    assert ServerConfig(role="decode", ucx_tls="^shm,cma").ucx_tls == "^shm,cma"
    for bad in ("tcp rc", "tcp;rm -rf", ""):
        with pytest.raises(ValueError, match="ucx_tls must be a comma-separated UCX list"):
            ServerConfig(role="decode", ucx_tls=bad)


def test_the_zmq_kv_transport_advertises_what_it_is_told():
    with ZmqTransport("t", host="0.0.0.0", advertise_host="10.20.30.40") as t:
        info = decode(t.metadata())
        assert info.endpoint.startswith("tcp://10.20.30.40:") and info.endpoint == t.endpoint
    with ZmqTransport("t") as t:
        assert decode(t.metadata()).endpoint.startswith("tcp://127.0.0.1:")
    with pytest.raises(ValueError, match="give advertise_host"):
        ZmqTransport("t", host="0.0.0.0")  # never a guess from the hostname


@pytest.mark.parametrize("command", [("decode", "--port", "0"), ("prefill", "--port", "0"),
                                     ("router", "--decode", "tcp://10.0.0.9:7001"), ("serve",)])
def test_every_command_refuses_a_loopback_advertised_for_a_wildcard_bind(run_cli, llama_dir, command):  # noqa: F811
    code, out, err = run_cli(command[0], llama_dir, *command[1:], "--host", "0.0.0.0", "--advertise-host",
                             "127.0.0.1")
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"duet {command[0]}: error: --advertise-host 127.0.0.1 is a loopback address but "
                           "--host 0.0.0.0") and "DUET_READY" not in out
