"""The KV hand-off state machines, driven directly in one process over real transports (ZeroMQ and NIXL).

A prefill-side and a decode-side ``Handoff`` each own a transport, a staging pool and a paged pool (a plain
tensor behind ``PoolPort``, the same gather / scatter ops a model runner uses). Each test walks transitions of
``SendTransfer`` / ``RecvTransfer`` (their docstrings hold the tables) or injects a fault in one state, then
checks that every transfer ended in DONE / COMPLETE or FAILED with nothing left behind: no table entry, no
staging byte (quarantined slabs included, once their quarantine passes) and, on success, the decode pool's
blocks bitwise equal to the prefill pool's.
"""
from __future__ import annotations

import time

import pytest
import torch

from duet.kernels.kv_blocks import gather_kv_blocks, scatter_kv_blocks
from duet.transfer.factory import make_transport, nixl_importable
from duet.transfer.handoff import Handoff, HandoffFaults
from duet.transfer.kv_port import KVPort
from duet.transfer.messages import KVCancel, KVLayers
from duet.transfer.recv_transfer import RECV_TRACE, RECV_TRANSITIONS, RecvState
from duet.transfer.send_transfer import SEND_TRACE, SEND_TRANSITIONS, SendState
from duet.transfer.staging import StagingPool
from duet.transfer.wire import encode

BACKENDS = [
    "zmq",
    pytest.param("nixl", marks=pytest.mark.skipif(not nixl_importable(), reason="NIXL is not installed")),
]
NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 3, 16, 4, 2, 8
QUARANTINE_S = 0.05
STAGING_BYTES = 1 << 20
DEADLINE_S = 20.0


class PoolPort(KVPort):
    """A paged pool [layers, 2, blocks, block_size, heads, head_dim] in one tensor, as the model runner has."""

    def __init__(self, pool: torch.Tensor):
        self.pool = pool
        self._plan: list[torch.Tensor] = []

    def slab_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (NUM_LAYERS, 2, num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM)

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.pool.dtype

    @property
    def kv_device(self) -> torch.device:
        return self.pool.device

    def plan_gather(self, block_ids: list[torch.Tensor]) -> None:
        self._plan = block_ids

    def gather_layer(self, layer: int, index: int, out: torch.Tensor) -> None:
        gather_kv_blocks(self.pool, self._plan[index], layer, layer + 1, out=out)

    def scatter_layers(self, slab: torch.Tensor, block_ids: torch.Tensor, layer_start: int, layer_end: int) -> None:
        scatter_kv_blocks(slab, block_ids, layer_start, layer_end, self.pool)


def make_side(backend: str, name: str, seed: int, timeout_s: float = DEADLINE_S, staging_bytes: int = STAGING_BYTES,
              faults: HandoffFaults | None = None) -> Handoff:
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(NUM_LAYERS, 2, NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM, generator=gen)
    staging = StagingPool(staging_bytes, torch.device("cpu"), quarantine_s=QUARANTINE_S)
    return Handoff(make_transport(backend, name), staging, PoolPort(pool), timeout_s=timeout_s, faults=faults)


def drive(*sides: Handoff, until, timeout_s: float = DEADLINE_S) -> list:
    """Advance every side until ``until()``; returns the transfers that ended meanwhile."""
    ended = []
    give_up = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < give_up, f"not done within {timeout_s}s: {[(s.sends, s.recvs) for s in sides]}"
        for side in sides:
            e = side.advance()
            ended += e.sends + e.recvs
        time.sleep(0.001)
    return ended


def assert_clean(*sides: Handoff) -> None:
    """No table entry; every staging byte free again once quarantine has passed."""
    time.sleep(QUARANTINE_S * 2)
    for side in sides:
        side.advance()
        assert not side.sends and not side.recvs
        side.staging.alloc(1)  # releases expired quarantine
        side.staging.free(0, 1)
        assert side.staging.free_bytes == side.staging.nbytes


def admit(p: Handoff, d: Handoff, tid: str, blocks_p: list[int], blocks_d: list[int], skip: int = 0):
    """The two admissions: the prompt on P (a slab for every block), the request on D (blocks past ``skip``)."""
    p.expect_send(tid, "req-" + tid, local_id="xfer:" + tid)
    assert p.reserve_send(tid, len(blocks_p)) is None
    d.expect_recv(tid)
    d.recv_blocks(tid, "req-" + tid, torch.tensor(blocks_d[skip:], dtype=torch.int64), skip)
    d.peer_ready(tid, p.transport.name)


def run_step(p: Handoff, tids_blocks: list[tuple[str, list[int]]], first_token: int | None = 7,
             between_layers=None) -> None:
    """The prefill step: pack every layer (posting what can go), then the sampled first tokens."""
    p.begin_packing([(tid, torch.tensor(blocks), 0) for tid, blocks in tids_blocks])
    for layer in range(NUM_LAYERS):
        p.pack_layer(layer)
        p.progress()
        if between_layers is not None:
            between_layers(layer)
    p.end_packing()
    if first_token is not None:
        for tid, _ in tids_blocks:
            p.first_token(tid, first_token, {first_token: -0.5}, b"gen")


def states_seen(side: Handoff, tid: str, table: dict) -> list[str]:
    """The states a transfer went through, in order, from the side's traces."""
    names = {stage: state.value for state, stage in table.items()}
    stages = side.traces.get("req-" + tid, {})
    return [names[stage] for stage in sorted(stages, key=stages.get) if stage in names]


# ---- the happy path: every transition of both tables --------------------------------------------------------


def test_every_transition_of_a_successful_handoff(sides):
    p, d = sides()
    blocks_p, blocks_d, skip = [3, 7, 1, 12], [9, 2, 14, 5], 1
    admit(p, d, "t1", blocks_p, blocks_d, skip)
    assert p.sends["t1"].state is SendState.ADMITTED and d.recvs["t1"].state is RecvState.AWAITING_PEER
    drive(p, d, until=lambda: p.sends["t1"].dest is not None)  # D offered its slab: KVDest crossed the transport
    assert d.recvs["t1"].state is RecvState.AWAITING_KV
    run_step(p, [("t1", blocks_p)])
    ended = drive(p, d, until=lambda: not p.sends and not d.recvs)
    send, recv = sorted(ended, key=lambda t: type(t).__name__, reverse=True)
    assert send.state is SendState.DONE and recv.state is RecvState.COMPLETE
    assert (recv.first.first_token, recv.first.first_logprobs, recv.first.first_generator_state) == (7, {7: -0.5},
                                                                                                    b"gen")
    pool_p, pool_d = p.port.pool, d.port.pool
    assert torch.equal(pool_d[:, :, blocks_d[skip:]], pool_p[:, :, blocks_p[skip:]])  # the cached one was not sent
    assert not torch.equal(pool_d[:, :, blocks_d[0]], pool_p[:, :, blocks_p[0]])
    assert states_seen(p, "t1", SEND_TRACE) == ["admitted", "packing", "posted", "done"]
    assert states_seen(d, "t1", RECV_TRACE) == ["awaiting_kv", "complete"]
    assert p.stats.transfers_sent == 1 and d.stats.transfers_received == 1
    assert p.stats.bytes_sent == d.stats.bytes_received == NUM_LAYERS * 2 * 3 * BLOCK_SIZE * HEADS * HEAD_DIM * 4
    # A cancel that comes after the send ended (the decode side gave up late) starts nothing new.
    d.transport.send_notif(p.transport.name, encode(KVCancel("t1", "late")))
    drive(p, d, until=lambda: p.stats.late_notifications == 1)
    assert not p.sends
    assert_clean(p, d)


def test_destination_after_packing_and_layers_in_any_order(sides):
    """KVDest after the step (the layers wait, then go at once); notifications out of order and duplicated."""
    p, d = sides()
    blocks = [4, 5, 6]
    p.expect_send("t2", "req-t2")
    p.reserve_send("t2", 3)
    run_step(p, [("t2", blocks)])
    assert p.sends["t2"].state is SendState.PACKING and p.sends["t2"].layers_posted == 0  # nowhere to write yet
    d.expect_recv("t2")
    d.recv_blocks("t2", "req-t2", torch.tensor(blocks), 0)
    d.peer_ready("t2", p.transport.name)
    ended = drive(p, d, until=lambda: not p.sends and not d.recvs)
    assert {t.state for t in ended} == {SendState.DONE, RecvState.COMPLETE}
    assert torch.equal(d.port.pool[:, :, blocks], p.port.pool[:, :, blocks])

    # A hand-written sender: every byte first, then the notifications shuffled, with a duplicate.
    d2 = make_side(p.transport.backend, "d2", 3)
    try:
        d2.transport.connect(p.transport.name, p.transport.metadata())
        p.transport.connect(d2.transport.name, d2.transport.metadata())
        d2.expect_recv("t3")
        d2.recv_blocks("t3", "req-t3", torch.tensor(blocks), 0)
        d2.peer_ready("t3", p.transport.name)
        drive(p, d2, until=lambda: "t3" in p.sends and p.sends["t3"].dest is not None)
        dest = p.sends.pop("t3").dest  # this test plays the sender itself
        slab = gather_kv_blocks(p.port.pool, torch.tensor(blocks), 0, NUM_LAYERS)
        region = p.transport.register(slab.view(-1).view(torch.uint8))
        h = p.transport.write(region, 0, slab.numel() * 4, dest.region, dest.offset)
        drive(d2, until=lambda: p.transport.poll(h) == "DONE")  # the receiving side progresses when polled
        notes = [KVLayers("t3", 2, 3, first_token=5), KVLayers("t3", 0, 1), KVLayers("t3", 0, 1), KVLayers("t3", 1, 2)]
        for note in notes:
            p.transport.send_notif(dest.decode_transport_name, encode(note))
        ended = drive(d2, until=lambda: not d2.recvs)
        assert [t.state for t in ended] == [RecvState.COMPLETE]
        assert d2.stats.duplicate_notifications == 1
        assert torch.equal(d2.port.pool[:, :, blocks], p.port.pool[:, :, blocks])
        p.transport.deregister(region)
        assert_clean(d2)
    finally:
        d2.close()
    assert_clean(p, d)


def test_a_prompt_fully_cached_on_decode_moves_only_notifications(sides):
    p, d = sides()
    admit(p, d, "t4", [1, 2], [3, 4], skip=2)
    drive(p, d, until=lambda: p.sends["t4"].dest is not None)
    run_step(p, [("t4", [1, 2])])
    ended = drive(p, d, until=lambda: not p.sends and not d.recvs)
    assert {t.state for t in ended} == {SendState.DONE, RecvState.COMPLETE}
    assert p.stats.bytes_sent == 0 and p.stats.layer_sends == NUM_LAYERS
    assert_clean(p, d)


# ---- a fault in every state ------------------------------------------------------------------------------


def test_send_faults_in_every_state(sides):
    p, d = sides(p={"staging_bytes": 4096, "timeout_s": 0.3})
    # PENDING: the decode side cancels before the prompt arrives; the prompt, when it comes, fails at once.
    d.transport.send_notif(p.transport.name, encode(KVCancel("a", "gone")))
    drive(p, d, until=lambda: "a" in p.sends)
    assert p.sends["a"].state is SendState.PENDING and p.advance().sends == []  # waits for its prompt
    p.expect_send("a", "req-a", local_id="xfer:a")
    assert p.reserve_send("a", 1) is not None
    # PENDING: staging exhausted.
    p.expect_send("b", "req-b")
    assert "staging full" in p.reserve_send("b", 64)
    # ADMITTED: aborted.
    p.expect_send("c", "req-c")
    assert p.reserve_send("c", 1) is None
    p.abort_send("c", "router aborted")
    # PACKING: aborted while the step writes the slab: nothing is released until the step ends.
    p.expect_send("e", "req-e")
    p.reserve_send("e", 1)
    p.begin_packing([("e", torch.tensor([0]), 0)])
    p.pack_layer(0)
    p.abort_send("e", "router aborted mid-step")
    ended = p.advance().sends
    assert "e" not in {t.transfer_id for t in ended}
    assert p.sends["e"].state is SendState.FAILED and not p.sends["e"].released
    for layer in range(1, NUM_LAYERS):
        p.pack_layer(layer)
    p.end_packing()
    # ADMITTED, then late: the deadline passes with no step and no destination.
    p.expect_send("f", "req-f")
    p.reserve_send("f", 1)
    ended += drive(p, d, until=lambda: not p.sends, timeout_s=5)
    assert {t.transfer_id: t.state for t in ended} == dict.fromkeys("abcef", SendState.FAILED)
    errors = {t.transfer_id: t.error for t in ended}
    assert "cancelled" in errors["a"] and "staging full" in errors["b"] and "aborted" in errors["c"]
    assert "mid-step" in errors["e"] and "timed out" in errors["f"]
    assert p.stats.transfers_failed_send == 5
    assert_clean(p, d)


def test_write_failure_and_peer_gone_while_posting(sides, backend):
    p, d = sides(p={"faults": HandoffFaults(fail_write_p=1.0)})
    admit(p, d, "w", [1], [2])
    drive(p, d, until=lambda: p.sends["w"].dest is not None)
    run_step(p, [("w", [1])])
    ended = drive(p, d, until=lambda: not p.sends and not d.recvs)
    # The prefill side fails the WRITE, tells the decode side, which fails at once (not at its deadline).
    assert {(type(t).__name__, t.state.value) for t in ended} == {("SendTransfer", "failed"), ("RecvTransfer", "failed")}
    assert "injected" in next(t.error for t in ended if type(t).__name__ == "RecvTransfer")
    assert_clean(p, d)

    # POSTED, then the decode process dies (its transport goes with it): the WRITEs cannot complete.
    p2, d2 = make_side(backend, "p2", 1, timeout_s=1.0), make_side(backend, "d2", 2)
    try:
        p2.transport.connect(d2.transport.name, d2.transport.metadata())
        d2.transport.connect(p2.transport.name, p2.transport.metadata())
        admit(p2, d2, "g", [1], [2])
        drive(p2, d2, until=lambda: p2.sends["g"].dest is not None)
        d2.transport.close()  # kill -9: nothing on the decode side runs again
        run_step(p2, [("g", [1])])
        ended = drive(p2, until=lambda: not p2.sends, timeout_s=10)
        assert [t.state for t in ended] == [SendState.FAILED]
        assert_clean(p2)
    finally:
        p2.close()


def test_recv_faults_in_every_state(sides):
    p, d = sides(p={"timeout_s": 0.6}, d={"staging_bytes": 8192, "timeout_s": 0.3})
    # AWAITING_PEER: no slab room.
    d.expect_recv("x")
    d.recv_blocks("x", "req-x", torch.tensor(list(range(12))), 0)
    d.peer_ready("x", p.transport.name)
    # AWAITING_PEER: the peer's transport was never connected.
    d.expect_recv("y")
    d.recv_blocks("y", "req-y", torch.tensor([1]), 0)
    d.peer_ready("y", "nobody-at-all")
    # AWAITING_PEER: the peer never becomes known; then late.
    d.expect_recv("z")
    d.recv_blocks("z", "req-z", torch.tensor([2]), 0)
    # AWAITING_PEER: failed before its blocks came (the server refused the peer), then the blocks come.
    d.expect_recv("v")
    d.fail_recv("v", "peer refused")
    ended = d.advance().recvs
    assert "v" not in {t.transfer_id for t in ended} and d.recvs["v"].state is RecvState.AWAITING_PEER
    d.recv_blocks("v", "req-v", torch.tensor([3]), 0)
    # AWAITING_KV: the prefill side reports an error.
    admit(p, d, "u", [4], [4])
    ended += drive(p, d, until=lambda: p.sends["u"].dest is not None)
    p.abort_send("u", "prefill died")
    # AWAITING_KV: cancelled (its request went away): the prefill side is told to stop.
    admit(p, d, "s", [5], [5])
    ended += drive(p, d, until=lambda: p.sends["s"].dest is not None)
    d.cancel_recv("s")
    # AWAITING_KV: KV late (nothing is ever sent).
    p.expect_send("r", "req-r")
    d.expect_recv("r")
    d.recv_blocks("r", "req-r", torch.tensor([6]), 0)
    d.peer_ready("r", p.transport.name)
    ended += drive(p, d, until=lambda: not d.recvs and not p.sends, timeout_s=10)
    recvs = {t.transfer_id: t for t in ended if type(t).__name__ == "RecvTransfer"}
    assert set(recvs) == set("xyzvusr") and {t.state for t in recvs.values()} == {RecvState.FAILED}
    assert "staging full" in recvs["x"].error and "cannot reach" in recvs["y"].error
    assert "deadline" in recvs["z"].error and recvs["v"].error == "peer refused"
    assert recvs["u"].error == "prefill died" and recvs["s"].cancelled and "deadline" in recvs["r"].error
    sends = {t.transfer_id: t for t in ended if type(t).__name__ == "SendTransfer"}
    assert "cancelled" in sends["s"].error  # KVCancel reached the prefill side
    assert d.stats.transfers_cancelled == 1 and d.stats.transfers_failed == 6
    assert_clean(p, d)


def test_transition_tables_are_closed():
    """Terminal states have no exit; every other state can fail."""
    for table, terminal, failed in ((SEND_TRANSITIONS, {SendState.DONE, SendState.FAILED}, SendState.FAILED),
                                    (RECV_TRANSITIONS, {RecvState.COMPLETE, RecvState.FAILED}, RecvState.FAILED)):
        for state, exits in table.items():
            assert (not exits) == (state in terminal)
            assert state in terminal or failed in exits
