"""Both KV transports between two real processes: exact bytes, notifications after data, dead peers.

The receiver runs in a spawned process; the two sides exchange names, metadata and region descriptions as
wire messages (msgpack bytes over a multiprocessing Pipe). Every wait has a deadline.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass

import pytest
import torch

from duet.transfer import ERROR, PENDING, PeerNotConnected, RemoteRegion, TransferError, make_transport
from duet.transfer.factory import nixl_importable
from duet.transfer.wire import Message, decode, encode

BACKENDS = [
    pytest.param("nixl", marks=pytest.mark.skipif(not nixl_importable(), reason="NIXL is not installed")),
    "zmq",
]
STEP_DEADLINE_S = 30.0  # generous: a spawned child imports torch on a loaded 2-core machine

# (region index, local offset, remote offset, nbytes, notif); destination ranges never overlap.
# Region 0 is bf16 [4096] (8192 bytes), region 1 is float32 [3000] (12000 bytes).
SINGLE_WRITES = [
    (0, 0, 4096, 1024, b"w0"),
    (0, 2048, 0, 2, b"w1"),  # one bf16 element
    (0, 6000, 6000, 2192, b"w2"),  # up to the region's last byte
    (0, 4000, 4000, 16, b""),  # no notification
    (1, 0, 0, 4000, b"w3"),
]
MANY_WRITES = [
    (0, [(1024, 1024, 512), (100, 2000, 64), (8000, 3000, 192)], b"m0"),
    (1, [(4000, 8000, 4000), (8000, 4000, 4000)], b"m1"),  # swaps the two halves
]
EXPECTED_NOTIFS = {b"w0", b"w1", b"w2", b"w3", b"m0", b"m1", b"bye"}


@dataclass
class Ready(Message):
    TYPE = "test.transfer.ready"
    name: str
    metadata: bytes
    regions: list[RemoteRegion]


@dataclass
class WriterHello(Message):
    TYPE = "test.transfer.writer"
    name: str


@dataclass
class Verdict(Message):
    TYPE = "test.transfer.verdict"
    mismatches: list[str]
    notifs: list[bytes]
    peers: list[str]


def _sources() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randn(4096, generator=gen).to(torch.bfloat16), torch.randn(3000, generator=gen)]


def _expected() -> list[torch.Tensor]:
    """What the receiver's regions hold after every write: bytes copied verbatim from the sources."""
    src = [t.view(torch.uint8) for t in _sources()]
    dst = [torch.zeros_like(t) for t in src]
    for region, local_off, remote_off, nbytes, _ in SINGLE_WRITES:
        dst[region][remote_off:remote_off + nbytes] = src[region][local_off:local_off + nbytes]
    for region, ranges, _ in MANY_WRITES:
        for local_off, remote_off, nbytes in ranges:
            dst[region][remote_off:remote_off + nbytes] = src[region][local_off:local_off + nbytes]
    return dst


def _recv(conn, deadline_s: float = STEP_DEADLINE_S) -> Message:
    if not conn.poll(deadline_s):
        raise TimeoutError(f"no control message within {deadline_s}s")
    return decode(conn.recv_bytes())


def _receiver_main(kind: str, conn) -> None:
    """Child process: register two zeroed regions, collect notifications until b"bye", check the bytes."""
    torch.set_num_threads(1)
    transport = make_transport(kind, "recv")
    regions = [torch.zeros(4096, dtype=torch.bfloat16), torch.zeros(3000, dtype=torch.float32)]
    handles = [transport.register(r) for r in regions]
    conn.send_bytes(encode(Ready(transport.name, transport.metadata(), [transport.describe(h) for h in handles])))
    writer = _recv(conn)
    assert isinstance(writer, WriterHello)
    notifs: list[tuple[str, bytes]] = []
    give_up = time.monotonic() + STEP_DEADLINE_S
    while not any(n == b"bye" for _, n in notifs) and time.monotonic() < give_up:
        notifs += transport.notifications()  # also what lets the ZMQ backend land data and ACK it
        time.sleep(1e-4)
    got = [r.view(torch.uint8) for r in regions]
    mismatches = [f"region {i}: {int((g != e).sum())} bytes differ" for i, (g, e) in enumerate(zip(got, _expected()))
                  if not torch.equal(g, e)]
    conn.send_bytes(encode(Verdict(mismatches, [n for _, n in notifs], sorted({p for p, _ in notifs}))))
    # Stay alive (driving progress) until the parent kills us: the dead-peer check needs a crash, not a close.
    give_up = time.monotonic() + STEP_DEADLINE_S
    while time.monotonic() < give_up:
        transport.notifications()
        time.sleep(1e-3)
    os._exit(1)


def _spawn_receiver(kind: str):
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_receiver_main, args=(kind, child_conn), daemon=True)
    proc.start()
    return proc, parent_conn


def _wait_error(transport, handle, deadline_s: float = 15.0) -> str:
    give_up = time.monotonic() + deadline_s
    while transport.poll(handle) == PENDING:
        if time.monotonic() > give_up:
            raise TimeoutError("a write to a dead peer stayed PENDING")
        time.sleep(1e-3)
    return transport.poll(handle)


@pytest.mark.parametrize("kind", BACKENDS)
def test_two_process_writes_dead_peer_and_errors(kind):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    proc, conn = _spawn_receiver(kind)
    sender = make_transport(kind, "send")
    try:
        ready = _recv(conn)
        assert isinstance(ready, Ready) and ready.name != sender.name
        sources = _sources()
        local = [sender.register(t) for t in sources]
        sender.connect(ready.name, ready.metadata)  # the receiver never connects back
        conn.send_bytes(encode(WriterHello(sender.name)))

        handles = [sender.write(local[r], lo, n, ready.regions[r], ro, notif=notif)
                   for r, lo, ro, n, notif in SINGLE_WRITES]
        handles += [sender.write_many(local[r], ready.regions[r], ranges, notif=notif)
                    for r, ranges, notif in MANY_WRITES]
        assert handles[-1].num_descs == 2 and handles[-1].nbytes == 8000
        for handle in handles:
            sender.wait(handle, deadline_s=STEP_DEADLINE_S)
            sender.release(handle)
        sender.send_notif(ready.name, b"bye")

        verdict = _recv(conn)
        assert isinstance(verdict, Verdict)
        assert verdict.mismatches == []
        assert sorted(verdict.notifs) == sorted(EXPECTED_NOTIFS)  # each exactly once, the empty one never
        assert verdict.notifs[-1] == b"bye" and verdict.peers == [sender.name]

        # Misuse is a clear exception, not a hang.
        with pytest.raises(PeerNotConnected):
            sender.write(local[0], 0, 8, RemoteRegion(agent="nobody-123", region_id=0, nbytes=8), 0)
        with pytest.raises(ValueError, match="past the remote region"):
            sender.write(local[1], 0, 16, ready.regions[0], ready.regions[0].nbytes - 8)

        # The receiver crashes: a new write ends in ERROR (or refuses to post), never PENDING forever.
        proc.kill()
        proc.join(STEP_DEADLINE_S)
        assert not proc.is_alive()
        try:
            handle = sender.write(local[0], 0, 64, ready.regions[0], 0, notif=b"late")
            assert _wait_error(sender, handle) == ERROR
            with pytest.raises(TransferError):
                sender.wait(handle, deadline_s=1.0)
            sender.release(handle)
        except TransferError:
            pass

        # A fresh transport pointed at the dead peer: refused at connect, or the write fails.
        with make_transport(kind, "late") as late:
            region = late.register(torch.zeros(16))
            try:
                late.connect(ready.name, ready.metadata)
                handle = late.write(region, 0, 64, ready.regions[0], 0)
                assert _wait_error(late, handle) == ERROR
                late.release(handle)
            except TransferError:
                pass
    finally:
        sender.close()
        if proc.is_alive():
            proc.kill()
            proc.join(STEP_DEADLINE_S)


@pytest.mark.parametrize("kind", BACKENDS)
def test_in_process_basics(kind):
    """Two transports in one process: metadata checks, empty-write validation, idempotent release/close."""
    with make_transport(kind, "a") as a, make_transport(kind, "b") as b:
        assert a.name != b.name and a.backend == kind
        src, dst = torch.arange(64, dtype=torch.float32), torch.zeros(64, dtype=torch.float32)
        local, remote = a.register(src), b.describe(b.register(dst))
        with pytest.raises(ValueError):
            a.connect("someone-else", b.metadata())
        assert not a.connected(b.name)
        a.connect(b.name, b.metadata())
        assert a.connected(b.name)
        with pytest.raises(ValueError):
            a.write_many(local, remote, [])
        with pytest.raises(ValueError):
            a.write(local, -1, 4, remote, 0)
        with pytest.raises(ValueError, match="past the local region"):
            a.write(local, 250, 8, remote, 0)
        handle = a.write(local, 0, 256, remote, 0, notif=b"all")
        # No progress threads: the receiver must be driven too, even for the writer's completion.
        got, give_up = [], time.monotonic() + 10.0
        while (a.poll(handle) == PENDING or not got) and time.monotonic() < give_up:
            got += b.notifications()
        a.wait(handle, deadline_s=1.0)
        a.release(handle)
        a.release(handle)
        assert got == [(a.name, b"all")]
        assert torch.equal(src, dst)
        with pytest.raises(TimeoutError):
            b.wait_notifications(1, deadline_s=0.05)
        a.disconnect(b.name)
        assert not a.connected(b.name)
        with pytest.raises(PeerNotConnected):
            a.send_notif(b.name, b"x")
    a.close()  # a second close is a no-op


@pytest.mark.parametrize("kind", BACKENDS)
def test_pending_write_fails_when_receiver_goes_away(kind):
    """A write still in flight when the receiver closes ends in ERROR; it does not stay PENDING."""
    with make_transport(kind, "a") as a:
        src, dst = torch.ones(1 << 22), torch.zeros(1 << 22)  # 16 MiB: not done before the receiver closes
        local = a.register(src)
        b = make_transport(kind, "b")
        remote = b.describe(b.register(dst))
        a.connect(b.name, b.metadata())
        handle = a.write(local, 0, local.nbytes, remote, 0, notif=b"x")
        if a.poll(handle) != PENDING:  # UCX over TCP needs b's progress; shm/RDMA transports may not
            pytest.skip("the write completed without the receiver's progress")
        b.close()
        assert _wait_error(a, handle) == ERROR and handle.error
        assert not a.connected(b.name)  # the server reconnects such a peer before its next transfer
        a.release(handle)
