"""Pulls over the hand-off machines: a server sends KV blocks it caches already to a server that asked for them.

Same harness as ``test_handoff``: an owner-side and a puller-side ``Handoff`` over real transports, paged pools
behind ``PoolPort``. A pull is a ``SendTransfer`` whose packing is one copy of every layer (``begin_pull`` /
``pull_packed``, done here on another thread as the host tier's copier does) and a ``RecvTransfer`` that
completes without a first token. Every transition a pull takes is walked, a fault is injected in every state,
and each test ends with nothing left: no table entry, no staging byte.
"""
from __future__ import annotations

import threading

import torch

from duet.kernels.kv_blocks import gather_kv_blocks
from tests.transfer.test_handoff import NUM_LAYERS, assert_clean, drive, make_side, states_seen
from duet.transfer.recv_transfer import RECV_TRACE, RecvState
from duet.transfer.send_transfer import SEND_TRACE, SendState


def ask(owner, puller, tid: str, blocks_puller: list[int], skip: int = 0, num_blocks: int | None = None):
    """The owner admits the pull (a slab for every block); the puller expects the blocks past ``skip``."""
    owner.expect_send(tid, "req-" + tid, local_id="xfer:" + tid)
    assert owner.reserve_send(tid, num_blocks or len(blocks_puller)) is None
    puller.expect_recv(tid, pull=True)
    puller.recv_blocks(tid, "req-" + tid, torch.tensor(blocks_puller[skip:], dtype=torch.int64), skip)
    puller.peer_ready(tid, owner.transport.name)


def copy_in(owner, tid: str, blocks: list[int], gate: threading.Event | None = None) -> threading.Thread:
    """The owner's copy of every layer of ``blocks`` into the pull's slab, on another thread (as the tier does)."""
    slab = owner.begin_pull(tid)
    assert slab is not None

    def run():
        if gate is not None:
            gate.wait(10)
        gather_kv_blocks(owner.port.pool, torch.tensor(blocks), 0, NUM_LAYERS, out=slab)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_every_transition_of_a_pull(sides):
    owner, puller = sides()
    blocks_o, blocks_p, skip = [5, 1, 9, 3], [2, 8, 4, 11], 1
    ask(owner, puller, "q1", blocks_p, skip)
    drive(owner, puller, until=lambda: owner.sends["q1"].dest is not None)
    thread = copy_in(owner, "q1", blocks_o)
    assert owner.sends["q1"].state is SendState.PACKING and owner.sends["q1"].step_open
    thread.join()
    owner.pull_packed("q1")
    ended = drive(owner, puller, until=lambda: not owner.sends and not puller.recvs)
    send, recv = sorted(ended, key=lambda t: type(t).__name__, reverse=True)
    assert send.state is SendState.DONE and send.pull and recv.state is RecvState.COMPLETE and recv.first is None
    assert torch.equal(puller.port.pool[:, :, blocks_p[skip:]], owner.port.pool[:, :, blocks_o[skip:]])
    assert not torch.equal(puller.port.pool[:, :, blocks_p[0]], owner.port.pool[:, :, blocks_o[0]])  # held already
    assert states_seen(owner, "q1", SEND_TRACE) == ["admitted", "packing", "posted", "done"]
    assert states_seen(puller, "q1", RECV_TRACE) == ["awaiting_kv", "complete"]
    assert owner.stats.layer_sends == NUM_LAYERS and puller.stats.layers_received == NUM_LAYERS
    assert_clean(owner, puller)


def test_pull_copy_done_before_the_destination_is_known(sides):
    """The copy may end before the puller's KVDest: the layers wait, then all go at once."""
    owner, puller = sides()
    owner.expect_send("q2", "req-q2")
    owner.reserve_send("q2", 2)
    copy_in(owner, "q2", [6, 7]).join()
    owner.pull_packed("q2")
    owner.advance()
    assert owner.sends["q2"].state is SendState.PACKING and owner.sends["q2"].layers_posted == 0
    puller.expect_recv("q2", pull=True)
    puller.recv_blocks("q2", "req-q2", torch.tensor([0, 1]), 0)
    puller.peer_ready("q2", owner.transport.name)
    ended = drive(owner, puller, until=lambda: not owner.sends and not puller.recvs)
    assert {t.state for t in ended} == {SendState.DONE, RecvState.COMPLETE}
    assert torch.equal(puller.port.pool[:, :, [0, 1]], owner.port.pool[:, :, [6, 7]])
    assert_clean(owner, puller)


def test_pull_faults_in_every_state(sides):
    owner, puller = sides(p={"timeout_s": 0.4}, d={"timeout_s": 0.4})
    # ADMITTED: the copy cannot start (begin_pull on a send that is failing already): nothing is copied in.
    owner.expect_send("a", "req-a")
    owner.reserve_send("a", 1)
    owner.abort_send("a", "router aborted")
    assert owner.begin_pull("a") is None
    # PACKING: the copy is in flight when the send fails: the slab is not released until the copy ends.
    ask(owner, puller, "b", [3])
    ended = drive(owner, puller, until=lambda: owner.sends["b"].dest is not None)
    gate = threading.Event()
    thread = copy_in(owner, "b", [4], gate)
    puller.cancel_recv("b")  # the puller's request went away: KVCancel reaches the owner
    ended += drive(owner, puller, until=lambda: owner.sends["b"].error is not None)
    ended += owner.advance().sends
    assert owner.sends["b"].state is SendState.FAILED and not owner.sends["b"].released  # copy still running
    gate.set()
    thread.join()
    owner.pull_packed("b")
    # PACKING: the copy itself fails.
    ask(owner, puller, "c", [5])
    copy_in(owner, "c", [5]).join()
    owner.pull_packed("c", error="host block lost")
    # POSTED, then the puller dies before its WRITEs are acknowledged.
    puller2 = make_side(owner.transport.backend, "p2", 3, timeout_s=1.0)
    try:
        owner.transport.connect(puller2.transport.name, puller2.transport.metadata())
        puller2.transport.connect(owner.transport.name, owner.transport.metadata())
        ask(owner, puller2, "d", [6])
        ended += drive(owner, puller2, until=lambda: owner.sends["d"].dest is not None)
        puller2.transport.close()  # kill -9
        copy_in(owner, "d", [6]).join()
        owner.pull_packed("d")
        ended += drive(owner, puller, until=lambda: not owner.sends, timeout_s=10)
    finally:
        puller2.recvs.clear()
    sends = {t.transfer_id: t for t in ended if type(t).__name__ == "SendTransfer"}
    recvs = {t.transfer_id: t for t in ended if type(t).__name__ == "RecvTransfer"}
    assert {k: t.state for k, t in sends.items()} == dict.fromkeys("abcd", SendState.FAILED)
    assert "aborted" in sends["a"].error and "cancelled" in sends["b"].error and sends["c"].error == "host block lost"
    assert recvs["b"].cancelled
    assert "c" in puller.recvs or "c" in recvs  # the owner told the puller: it fails now, not at its deadline
    ended = drive(owner, puller, until=lambda: not puller.recvs, timeout_s=5)
    assert all(t.state is RecvState.FAILED for t in ended)
    assert_clean(owner, puller)


def test_owner_killed_mid_pull_fails_the_receive_at_its_deadline(backend):
    """AWAITING_KV with the owner gone (kill -9 after KVDest): no layer ever comes; the receive fails at its
    deadline and frees its slab (the server then recomputes the prompt: tests/serving/test_kv_tier.py)."""
    owner, puller = make_side(backend, "o", 1), make_side(backend, "p", 2, timeout_s=0.3)
    try:
        owner.transport.connect(puller.transport.name, puller.transport.metadata())
        puller.transport.connect(owner.transport.name, owner.transport.metadata())
        ask(owner, puller, "k", [1, 2])
        drive(owner, puller, until=lambda: owner.sends["k"].dest is not None)
        assert puller.recvs["k"].state is RecvState.AWAITING_KV
        owner.transport.close()  # kill -9: nothing on the owner's side runs again
        ended = drive(puller, until=lambda: not puller.recvs, timeout_s=5)
        assert [t.state for t in ended] == [RecvState.FAILED] and "deadline" in ended[0].error
        assert_clean(puller)
    finally:
        puller.close()
