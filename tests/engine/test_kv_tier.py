"""The host KV tier in one process: its block states, LRU and readers; the engine's loads against cold prefills.

Reference for every token comparison: the same prompts on an engine without a tier and with a device pool large
enough to need none (a cold prefill). Every engine test ends with nothing held: device blocks all free, no host
block read or being written, no copy in flight, no request fetching.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

import duet.engine.kv_tier.host_tier as host_tier_module

from duet.engine import LLM, SamplingParams
from duet.engine.block_manager import BlockManager
from duet.engine.kv_events import BlockRemoved, BlockStored
from duet.engine.kv_tier.block_copier import BlockCopier
from duet.engine.kv_tier.host_block_pool import HOST_BLOCK_TRANSITIONS, HostBlockPool, HostBlockState
from duet.engine.kv_tier.kv_fetch import FetchPart, KVFetch, PartState
from duet.engine.request import Request

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=6, temperature=1.5, seed=4321, ignore_eos=True)
DEVICE_BLOCKS = 12
DEADLINE_S = 60.0  # how long a test waits for the copier thread's loads (a loaded CI host starves it)
STEP_LIMIT = 2000  # engine steps a test waits for an outcome (a deadline for loops that could hang)
PROMPT = [5 + (i * 7) % 400 for i in range(70)]  # 4 full blocks + 6 tokens
OTHERS = [[9 + (i * 13 + k * 31) % 500 for i in range(60)] for k in range(4)]  # evict PROMPT from 12 device blocks


# ---- the host block pool --------------------------------------------------------------------------------------


def make_pool(num_blocks: int = 3) -> HostBlockPool:
    return HostBlockPool(num_blocks, (2, 2, 99, 4, 1, 2), torch.float32)


def test_host_pool_walks_every_state_and_evicts_least_recently_used_unread_blocks():
    pool = make_pool(3)
    assert pool.kv.shape == (2, 2, 3, 4, 1, 2) and pool.block_bytes == 2 * 2 * 4 * 2 * 4
    a = pool.begin_write(11, 0, (1,))  # FREE -> WRITING
    assert pool.blocks[a].state is HostBlockState.WRITING and pool.holds(11) and pool.find(11, (1,)) is None
    assert pool.begin_write(11, 0, (1,)) is None  # a second copy of the same hash is not started
    pool.end_write(a, ok=True)  # WRITING -> CACHED
    b = pool.begin_write(12, 11, (2,))
    pool.end_write(b, ok=True)
    c = pool.begin_write(13, 12, (3,))
    pool.end_write(c, ok=False)  # WRITING -> FREE
    assert pool.blocks[c].state is HostBlockState.FREE and not pool.holds(13)
    assert pool.drain_events() == [BlockStored([11, 12], 0, [1, 2], 4, tier="host")]  # one chain, one event
    assert pool.find(11, (1,)) == a and pool.find(11, (9,)) is None  # tokens verified
    c = pool.begin_write(13, 12, (3,))
    pool.end_write(c, ok=True)
    pool.touch(11)  # LRU now: 12, 13, 11
    pool.acquire([b])  # 12 is being read: out of the LRU
    d = pool.begin_write(14, 0, (4,))  # full: evicts 13 (least recently used, unread), CACHED -> FREE -> WRITING
    assert d == c and not pool.holds(13) and pool.find(12, (2,)) == b
    pool.end_write(d, ok=True)
    assert pool.begin_write(15, 0, (5,)) == a  # then 11; 12 stays while read
    assert pool.begin_write(16, 0, (6,)) == d  # then 14
    assert pool.begin_write(17, 0, (7,)) is None and pool.stats.writes_refused == 1  # all read or writing
    events = pool.drain_events()
    assert [e.block_hashes for e in events if isinstance(e, BlockRemoved)] == [[13], [11], [14]]
    assert all(e.tier == "host" for e in events)
    pool.release([b])
    assert pool.num_read_blocks == 0 and pool.find(12, (2,)) == b  # never lost while read
    with pytest.raises(RuntimeError):
        pool.release([b])
    with pytest.raises(RuntimeError):
        pool.acquire([a])  # WRITING: nothing to read yet
    seen = {(s.value, t.value) for s, ts in HOST_BLOCK_TRANSITIONS.items() for t in ts}
    assert seen == {("free", "writing"), ("writing", "cached"), ("writing", "free"), ("cached", "free")}


def test_fetch_parts_count_blocks_up_to_the_first_failure():
    req = Request("r", list(range(40)), GREEDY)
    fetch = KVFetch(req, 1, [FetchPart("host", 1, 3), FetchPart("peer", 3, 6)])
    fetch.finish("peer", ok=True)
    assert not fetch.ended and fetch.num_valid_blocks == 1
    fetch.finish("host", ok=False)
    assert fetch.ended and fetch.num_valid_blocks == 1 and fetch.num_fetched_blocks("peer") == 0
    with pytest.raises(AssertionError):
        fetch.finish("host", ok=True)
    ok = KVFetch(req, 0, [FetchPart("host", 0, 2), FetchPart("peer", 2, 4)])
    ok.finish("host", True), ok.finish("peer", True)
    assert ok.num_valid_blocks == 4 and ok.num_fetched_blocks("host") == 2 and ok.parts[1].state is PartState.DONE
    with pytest.raises(ValueError):
        KVFetch(req, 0, [FetchPart("peer", 1, 2)])  # a gap


def test_held_blocks_are_never_reused_until_released():
    bm = BlockManager(3, 4)
    bm.track_cached = True
    req = Request("a", list(range(8)), GREEDY)
    assert bm.allocate(req, 8)
    req.num_computed_tokens = 8
    bm.cache_computed_blocks(req)
    cached = bm.drain_cached()
    assert [(c.block_hash, c.parent_hash) for c in cached] == [(req.block_hashes[0], 0),
                                                              (req.block_hashes[1], req.block_hashes[0])]
    bm.hold([c.block_id for c in cached])
    bm.free(req)
    assert bm.num_free_blocks == 1  # the copy still holds both
    other = Request("b", list(range(100, 112)), GREEDY)
    assert not bm.allocate(other, 12)
    bm.release([c.block_id for c in cached])
    assert bm.num_free_blocks == 3 and bm.find_cached_prefix(Request("c", list(range(9)), GREEDY)) == [0, 1]
    with pytest.raises(RuntimeError):
        bm.release([cached[0].block_id])


def test_copier_runs_copies_in_order_off_the_calling_thread():
    gate = threading.Event()
    copier = BlockCopier(torch.device("cpu"), gate=gate)
    ran: list[str] = []
    jobs = [copier.submit("offload", lambda k=k: ran.append(k), 8) for k in "ab"]
    copier.submit("load", lambda: 1 / 0, 8)
    assert copier.busy and copier.finished() == [] and ran == []
    gate.set()
    copier.close()
    done = copier.finished()
    assert ran == ["a", "b"] and done[:2] == jobs and "ZeroDivisionError" in done[2].error and not copier.busy


# ---- the engine: loads from the host tier against cold prefills ----------------------------------------------------


@pytest.fixture(scope="module")
def cold(llama_dir):
    llm = LLM(llama_dir, show_progress=False, num_kv_blocks=64)
    out = {kind: llm.generate([PROMPT], params)[0].token_ids for kind, params in (("greedy", GREEDY), ("seeded", SEEDED))}
    assert out["greedy"] != out["seeded"]  # so the seeded comparison says something
    return out


def tiered(llama_dir, host_bytes: int = 1 << 22, gate: threading.Event | None = None,
           device_blocks: int = DEVICE_BLOCKS) -> LLM:
    llm = LLM(llama_dir, show_progress=False, num_kv_blocks=device_blocks, host_kv_cache_bytes=host_bytes)
    if gate is not None:
        tier = llm.engine.tier
        tier.copier.close()
        tier.copier = BlockCopier(torch.device("cpu"), gate=gate)
    return llm


def evict(llm: LLM) -> None:
    """Other traffic through the small device pool, until PROMPT's blocks are gone from it."""
    for other in OTHERS:
        llm.generate([other], GREEDY)
    e = llm.engine
    assert e.block_manager.find_cached_prefix(Request("probe", PROMPT, GREEDY)) == []


def settle(llm: LLM) -> None:
    """Let every copy in flight end and be taken in."""
    e = llm.engine
    if e.tier.copier.gate is not None:
        e.tier.copier.gate.set()
    while e.tier.busy:
        e.advance_tier()
    e.step()  # takes in what ended, and hands out pending outputs (aborts)


def assert_nothing_held(llm: LLM) -> None:
    e = llm.engine
    settle(llm)
    assert e.num_free_blocks == e.num_total_blocks
    assert e.tier.pool.num_read_blocks == 0 and e.tier.pool.num_writing_blocks == 0
    assert not e.scheduler.fetching and not e.scheduler.waiting_for_kv and not e.has_unfinished_requests()


def test_a_prefix_served_from_the_host_tier_equals_a_cold_prefill(llama_dir, cold):
    llm = tiered(llama_dir)
    e = llm.engine
    llm.generate([PROMPT], GREEDY)
    evict(llm)
    computed = e.num_prompt_tokens_computed
    greedy, seeded = llm.generate([PROMPT, PROMPT], [GREEDY, SEEDED])
    assert greedy.token_ids == cold["greedy"] and seeded.token_ids == cold["seeded"]
    assert greedy.num_cached_tokens == 64 and e.scheduler.fetched_tokens["host"] == 128
    assert e.num_prompt_tokens_computed - computed == 2 * (len(PROMPT) - 64)  # only the tails were prefilled
    assert e.tier.stats.load_blocks == 8 and e.tier.stats.offload_blocks > 0
    assert_nothing_held(llm)
    llm.close()


def forget_device_cache(llm: LLM) -> None:
    """Drop every cached device block (the host tier keeps its copies)."""
    settle(llm)
    assert llm.engine.block_manager.reset_prefix_cache()


def test_abort_while_loading_frees_blocks_only_after_the_copy_ends(llama_dir):
    gate = threading.Event()
    gate.set()
    llm = tiered(llama_dir, gate=gate)
    e = llm.engine
    llm.generate([PROMPT], GREEDY)
    forget_device_cache(llm)
    gate.clear()
    e.add_request("r", PROMPT, GREEDY)
    e.step()
    assert "r" in e.scheduler.fetching and e.tier.busy  # the load waits at the gate
    held = list(e.get_request("r").block_ids)
    assert len(held) == 5  # its whole prompt: 4 blocks to load, 1 to prefill
    e.abort_request("r")
    # The copy still holds the 4 it writes into; the 5th went back at once.
    assert e.num_free_blocks == e.num_total_blocks - 4
    assert [e.block_manager.blocks[b].ref_count for b in held] == [1, 1, 1, 1, 0]
    assert e.tier.pool.num_read_blocks == 4  # and the host blocks stay pinned: the copy reads them
    assert_nothing_held(llm)
    llm.close()


def test_a_full_host_tier_evicts_by_lru_but_never_a_block_being_read(llama_dir, cold):
    gate = threading.Event()
    gate.set()
    # 8 host blocks of 8 KiB (tiny llama). 16 device blocks: the fetching request holds its whole prompt's 5, and
    # the finished requests' write-through copies, queued behind the gated load, hold theirs until it opens.
    llm = tiered(llama_dir, gate=gate, host_bytes=8 * 8192, device_blocks=16)
    e = llm.engine
    pool = e.tier.pool
    assert pool.num_blocks == 8
    llm.generate([PROMPT, OTHERS[0]], GREEDY)  # 4 + 4 blocks written through: the tier is full
    forget_device_cache(llm)
    other_hashes = Request("o", OTHERS[0], GREEDY).update_block_hashes(16)  # its 3 prompt blocks (+ 1 with output)
    assert pool.num_cached_blocks == 8 and all(pool.holds(h) for h in other_hashes)
    gate.clear()
    e.add_request("r", PROMPT, GREEDY)
    e.step()  # the load of PROMPT's 4 host blocks starts (and waits at the gate): they are being read
    assert pool.num_read_blocks == 4
    for k, other in enumerate(OTHERS[1:3]):  # new traffic: 8 more blocks to write through, while the load waits
        e.add_request(f"n{k}", other, GREEDY)
    outs = {}
    for _ in range(STEP_LIMIT):
        outs.update((o.request_id, o) for o in e.step() if o.finished)
        if "n0" in outs and "n1" in outs:
            break
    assert "n0" in outs and "n1" in outs, f"new traffic did not finish while the load waited: {sorted(outs)}"
    # The unread blocks went, least recently used first; the read ones stayed; the rest of the writes were refused.
    assert pool.stats.evictions == 4 and not any(pool.holds(h) for h in other_hashes)  # OTHERS[0]'s 4
    assert pool.num_read_blocks == 4 and pool.stats.writes_refused >= 4  # (a preempted request re-caches)
    gate.set()
    while e.has_unfinished_requests():
        outs.update((o.request_id, o) for o in e.step() if o.finished)
    assert outs["r"].token_ids == cold["greedy"] and outs["r"].num_cached_tokens == 64
    assert_nothing_held(llm)
    llm.close()


def test_a_failed_load_is_recomputed(llama_dir, cold, monkeypatch):
    llm = tiered(llama_dir)
    e = llm.engine
    llm.generate([PROMPT], GREEDY)
    evict(llm)
    settle(llm)
    real = host_tier_module.scatter_kv_blocks

    def scatter(slab, block_ids, layer_start, layer_end, kv_cache):
        if kv_cache is e.runner.kv_cache:
            raise RuntimeError("injected load failure")
        real(slab, block_ids, layer_start, layer_end, kv_cache)

    monkeypatch.setattr(host_tier_module, "scatter_kv_blocks", scatter)
    computed = e.num_prompt_tokens_computed
    [out] = llm.generate([PROMPT], GREEDY)
    assert out.token_ids == cold["greedy"] and e.tier.stats.load_failures == 1
    assert e.num_prompt_tokens_computed - computed == len(PROMPT) and e.scheduler.fetched_tokens["host"] == 0
    assert_nothing_held(llm)
    llm.close()


def test_fetching_requests_never_deadlock_the_pool(llama_dir, cold):
    """Four requests whose host runs fill the whole 12-block pool between them, each with more prompt after the
    run: every one holds its whole prompt's blocks from admission on, so the ones admitted complete and the rest
    follow (a fetch that held only its run's blocks left the resumed requests each waiting at the head of the
    queue for blocks the others held, forever)."""
    llm = tiered(llama_dir)
    e = llm.engine
    prompts = [[5 + (i * 7 + k * 101) % 450 for i in range(48)] + [7] for k in range(4)]  # 3 full blocks + 1
    llm.generate(prompts, GREEDY)
    forget_device_cache(llm)
    longer = [p[:48] + [11 + k] * 24 for k, p in enumerate(prompts)]  # 3 host blocks, then 24 tokens to prefill
    ref = LLM(llama_dir, show_progress=False, num_kv_blocks=64).generate(longer, GREEDY)
    for k, p in enumerate(longer):
        e.add_request(f"f{k}", p, GREEDY)
    outs = {}
    deadline = time.monotonic() + DEADLINE_S  # wall time: the host loads run on the copier thread
    while len(outs) < 4 and time.monotonic() < deadline:
        outs.update((o.request_id, o) for o in e.step() if o.finished)
    assert sorted(outs) == ["f0", "f1", "f2", "f3"], (outs.keys(), e.scheduler.waiting, e.scheduler.fetching)
    assert [outs[f"f{k}"].token_ids for k in range(4)] == [r.token_ids for r in ref]
    assert e.scheduler.fetched_tokens["host"] == 4 * 48
    assert_nothing_held(llm)
    llm.close()
