"""CURVE on Duet's ZMQ sockets: authorized peers talk, everyone else gets nothing through.

Keys are made in tmp_path. "Gets nothing through" means the bound socket receives nothing within
SILENCE_S while an authorized peer on the same socket does get through. Every wait has a deadline.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
import subprocess
import sys
import time

import pytest
import torch
import zmq
import zmq.asyncio

from duet.transfer.curve import (ZmqKeys, load_keys, make_keys, secure_client, secure_server, start_async_authenticator,
                            start_authenticator)
from duet.engine.tools.keys import main as keys_main
from duet.transfer import PENDING, TransferError, make_transport

pytestmark = pytest.mark.timeout(60)

SILENCE_S = 1.0  # how long an unauthorized peer is given to get a message through
DEADLINE_S = 5.0  # how long an authorized peer may take


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> ZmqKeys:
    root = tmp_path_factory.mktemp("keys")
    make_keys(root)
    return ZmqKeys.load(root)


@pytest.fixture(scope="module")
def intruders(tmp_path_factory, keys) -> dict[str, ZmqKeys | None]:
    """Clients that must be refused: plaintext, and a keypair of its own (it knows the public server key)."""
    other_dir = tmp_path_factory.mktemp("other_keys")
    make_keys(other_dir)
    other = ZmqKeys.load(other_dir)
    return {"plaintext": None,
            "foreign": dataclasses.replace(keys, client_public=other.client_public, client_secret=other.client_secret)}


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _server(ctx, kind: int, keys: ZmqKeys | None) -> tuple[zmq.Socket, str]:
    sock = ctx.socket(kind)
    sock.linger = 0
    secure_server(sock, keys)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def _client(ctx, kind: int, keys: ZmqKeys | None, address: str) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.linger = 0
    secure_client(sock, keys)
    if kind == zmq.SUB:
        sock.subscribe(b"")
    sock.connect(address)
    return sock


def _recv(sock: zmq.Socket, timeout_s: float) -> list[bytes] | None:
    return sock.recv_multipart() if sock.poll(int(timeout_s * 1000)) else None


# ---- keys on disk

def test_keys_cli_writes_private_secrets_and_refuses_to_overwrite(tmp_path, capsys):
    root = tmp_path / "keys"
    assert keys_main([str(root)]) == 0
    printed = capsys.readouterr().out
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret"):
        path = root / name
        assert str(path) in printed
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if name.endswith("_secret") else 0o644), (name, oct(mode))
    assert (root / "authorized_clients" / "client.key").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".keys-")]  # the temporary directory is gone

    first = ZmqKeys.load(root)
    assert first.client_public in first.authorized_clients and len(first.authorized_clients) == 1
    assert first.server_secret.decode() not in repr(first) and first.client_secret.decode() not in repr(first)

    assert keys_main([str(root)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert ZmqKeys.load(root) == first

    # The real command line, with --force: new keys.
    done = subprocess.run([sys.executable, "-m", "duet.engine.tools.keys", str(root), "--force"],
                          capture_output=True, text=True, timeout=60, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout
    second = ZmqKeys.load(root)
    assert second.server_public != first.server_public and second.client_secret != first.client_secret


def test_load_errors_are_clear(tmp_path):
    assert load_keys(None) is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ZmqKeys.load(tmp_path / "nowhere")
    make_keys(tmp_path)
    (tmp_path / "client.key_secret").chmod(0o644)
    with pytest.raises(PermissionError, match="client.key_secret"):
        ZmqKeys.load(tmp_path)
    (tmp_path / "client.key_secret").unlink()
    with pytest.raises(FileNotFoundError, match="client.key_secret"):
        ZmqKeys.load(tmp_path)
    with pytest.raises(FileExistsError):
        make_keys(tmp_path)
    make_keys(tmp_path, force=True)
    assert isinstance(load_keys(str(tmp_path)), ZmqKeys)


# ---- sockets, synchronous context

def test_no_keys_means_plaintext(ctx):
    assert start_authenticator(ctx, None) is None
    server, address = _server(ctx, zmq.ROUTER, None)
    client = _client(ctx, zmq.DEALER, None, address)
    client.send(b"plain")
    assert _recv(server, DEADLINE_S)[1:] == [b"plain"]


def test_router_dealer_only_authorized_clients(ctx, keys, intruders):
    auth = start_authenticator(ctx, keys)
    try:
        server, address = _server(ctx, zmq.ROUTER, keys)
        intruder_socks = [_client(ctx, zmq.DEALER, k, address) for k in intruders.values()]  # referenced
        for name, intruder in zip(intruders, intruder_socks):
            intruder.send(f"from {name}".encode())
        friend = _client(ctx, zmq.DEALER, keys, address)
        friend.send(b"status?")
        identity, body = _recv(server, DEADLINE_S)
        assert body == b"status?"
        server.send_multipart([identity, b"ok"])
        assert _recv(friend, DEADLINE_S) == [b"ok"]
        assert _recv(server, SILENCE_S) is None, "an unauthorized client got a command through"
    finally:
        auth.stop()


def test_pub_sub_only_authorized_subscribers(ctx, keys, intruders):
    auth = start_authenticator(ctx, keys)
    try:
        pub, address = _server(ctx, zmq.PUB, keys)
        intruder_subs = {name: _client(ctx, zmq.SUB, k, address) for name, k in intruders.items()}
        friend = _client(ctx, zmq.SUB, keys, address)
        give_up, got = time.monotonic() + DEADLINE_S, None
        while got is None and time.monotonic() < give_up:  # a SUB joins late: publish until it hears
            pub.send(b"load: 3 queued")
            got = _recv(friend, 0.05)
        assert got == [b"load: 3 queued"]
        give_up = time.monotonic() + SILENCE_S
        while time.monotonic() < give_up:
            pub.send(b"kv stored")
            for name, sub in intruder_subs.items():
                assert _recv(sub, 0.05) is None, f"the {name} subscriber read an event"
    finally:
        auth.stop()


def test_without_authenticator_curve_server_fails_closed(ctx, keys):
    """libzmq would accept any client when no ZAP handler runs; secure_server makes that a refusal."""
    server, address = _server(ctx, zmq.ROUTER, keys)
    client = _client(ctx, zmq.DEALER, keys, address)
    client.send(b"hello")
    assert _recv(server, SILENCE_S) is None


def test_callers_on_one_context_share_its_authenticator(ctx, keys, intruders):
    """Two servers on zmq.Context.instance(): one ZAP handler, alive until the last one stops."""
    first, second = start_authenticator(ctx, keys), start_authenticator(ctx, keys)
    with pytest.raises(RuntimeError, match="other keys"):
        start_authenticator(ctx, intruders["foreign"])
    server, address = _server(ctx, zmq.ROUTER, keys)
    first.stop()
    first.stop()  # idempotent: does not release the second share
    assert not first.running and second.running
    client = _client(ctx, zmq.DEALER, keys, address)  # keep a reference: a collected socket drops its queue
    client.send(b"still served")
    assert _recv(server, DEADLINE_S)[1:] == [b"still served"]
    second.stop()
    late_client = _client(ctx, zmq.DEALER, keys, address)
    late_client.send(b"after the last stop")
    assert _recv(server, SILENCE_S) is None  # fails closed
    third = start_authenticator(ctx, keys)  # a fresh one can start again
    third.stop()


def test_misuse_is_an_error(ctx, keys):
    sock = ctx.socket(zmq.ROUTER)
    sock.bind_to_random_port("tcp://127.0.0.1")
    with pytest.raises(ValueError, match="before bind"):
        secure_server(sock, keys)
    with pytest.raises(RuntimeError, match="running event loop"):
        start_async_authenticator(zmq.asyncio.Context(), keys)


# ---- sockets, asyncio context (the router)

def test_async_authenticator(keys, intruders):
    async def scenario() -> None:
        actx = zmq.asyncio.Context()
        auth = start_async_authenticator(actx, keys)
        try:
            server, address = _server(actx, zmq.ROUTER, keys)
            intruder_socks = [_client(actx, zmq.DEALER, k, address) for k in intruders.values()]
            for name, intruder in zip(intruders, intruder_socks):
                await intruder.send(f"from {name}".encode())
            friend = _client(actx, zmq.DEALER, keys, address)
            await friend.send(b"register")
            identity, body = await asyncio.wait_for(server.recv_multipart(), DEADLINE_S)
            assert body == b"register"
            await server.send_multipart([identity, b"welcome"])
            assert await asyncio.wait_for(friend.recv_multipart(), DEADLINE_S) == [b"welcome"]
            with pytest.raises(asyncio.TimeoutError):
                got = await asyncio.wait_for(server.recv_multipart(), SILENCE_S)
                pytest.fail(f"an unauthorized client got through: {got!r}")
        finally:
            auth.stop()
        with pytest.raises(TypeError):
            start_authenticator(actx, keys)
            actx.destroy(linger=0)

    assert start_async_authenticator(zmq.asyncio.Context.instance(), None) is None
    asyncio.run(asyncio.wait_for(scenario(), 20.0))


# ---- the ZMQ KV transport

def _write_and_drive(writer, receiver, local, remote) -> list:
    handle = writer.write(local, 0, local.nbytes, remote, 0, notif=b"kv")
    got, give_up = [], time.monotonic() + DEADLINE_S
    while (writer.poll(handle) == PENDING or not got) and time.monotonic() < give_up:
        got += receiver.notifications()
    writer.wait(handle, deadline_s=1.0)
    writer.release(handle)
    return got


def test_zmq_transport_with_keys(keys, intruders):
    src, dst = torch.arange(256, dtype=torch.float32), torch.zeros(256, dtype=torch.float32)
    with make_transport("zmq", "d", keys=keys) as d, make_transport("zmq", "p", keys=keys) as p:
        remote = d.describe(d.register(dst))
        local = p.register(src)
        p.connect(d.name, d.metadata())
        assert _write_and_drive(p, d, local, remote) == [(p.name, b"kv")]
        assert torch.equal(src, dst)

        dst.zero_()
        for name, intruder_keys in intruders.items():
            with make_transport("zmq", name, keys=intruder_keys, connect_timeout_s=2.0) as intruder:
                region = intruder.register(torch.ones(256))
                with pytest.raises(TransferError, match="handshake"):
                    intruder.connect(d.name, d.metadata())
                with pytest.raises(TransferError):  # not connected: nothing to write through
                    intruder.write(region, 0, region.nbytes, remote, 0, notif=b"evil")
        give_up = time.monotonic() + SILENCE_S
        while time.monotonic() < give_up:
            assert d.notifications() == []
            time.sleep(0.01)
        assert not dst.any()
