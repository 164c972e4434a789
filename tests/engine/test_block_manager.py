"""Block manager bookkeeping on CPU: ref counts, prefix hits verified by tokens, LRU eviction, KV events."""
from __future__ import annotations

from duet.engine.block_hash import block_hashes
from duet.engine.block_manager import BlockManager
from duet.engine.kv_events import BlockRemoved, BlockStored
from duet.engine.request import Request
from duet.engine.sampling_params import SamplingParams

BS = 4


def make_req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def compute_all(bm: BlockManager, req: Request) -> None:
    """Simulate the scheduler admitting and fully computing ``req``'s prompt."""
    cached = bm.find_cached_prefix(req)
    assert bm.allocate(req, req.num_tokens - len(cached) * BS, cached)
    req.num_computed_tokens = req.num_tokens
    bm.cache_computed_blocks(req)


def test_allocate_and_free_restore_counts():
    bm = BlockManager(8, BS)
    req = make_req("a", list(range(10)))  # 3 blocks
    assert bm.allocate(req, 10)
    assert len(req.block_ids) == 3 and bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in req.block_ids)
    bm.free(req)
    assert bm.num_free_blocks == 8 and req.block_ids == []


def test_allocation_is_all_or_nothing():
    bm = BlockManager(2, BS)
    req = make_req("a", list(range(12)))
    assert not bm.allocate(req, 12)
    assert bm.num_free_blocks == 2 and req.block_ids == []


def test_prefix_hit_shares_blocks_and_counts_tokens():
    bm = BlockManager(16, BS)
    a = make_req("a", list(range(13)))
    compute_all(bm, a)
    events = bm.drain_events()
    assert len(events) == 1 and isinstance(events[0], BlockStored)
    assert events[0].block_hashes == block_hashes(list(range(13)), BS)  # 3 full blocks
    b = make_req("b", list(range(12)) + [99, 100])
    cached = bm.find_cached_prefix(b)
    assert cached == a.block_ids[:3]
    assert bm.allocate(b, b.num_tokens - 12, cached)
    assert b.num_computed_tokens == 12
    assert all(bm.blocks[x].ref_count == 2 for x in a.block_ids[:3])
    assert bm.stats.hit_tokens == 12
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 16


def test_fully_cached_prompt_leaves_last_token_to_compute():
    bm = BlockManager(16, BS)
    a = make_req("a", list(range(8)))
    compute_all(bm, a)
    b = make_req("b", list(range(8)))
    assert len(bm.find_cached_prefix(b)) == 1  # 2 full blocks cached, only 1 may be reused


def test_hash_collision_is_rejected_by_token_check():
    bm = BlockManager(16, BS)
    a = make_req("a", [1, 2, 3, 4, 5])
    compute_all(bm, a)
    b = make_req("b", [9, 9, 9, 9, 5])
    b.block_hashes = list(a.block_hashes)  # force a colliding hash for different tokens
    assert bm.find_cached_prefix(b) == []


def test_lru_eviction_emits_removed_and_prefers_oldest():
    bm = BlockManager(4, BS)
    a = make_req("a", list(range(9)))  # 2 full blocks + 1 partial
    compute_all(bm, a)
    bm.free(a)
    bm.drain_events()
    b = make_req("b", [50 + i for i in range(9)])  # needs 3 blocks: evicts the uncached one and a tail block
    assert bm.allocate(b, 9)
    removed = [e for e in bm.drain_events() if isinstance(e, BlockRemoved)]
    assert [h for e in removed for h in e.block_hashes] == [a.block_hashes[1]]  # tail before head
    c = make_req("c", list(range(4)) + [77])
    assert len(bm.find_cached_prefix(c)) == 1  # the head block survived


def test_reset_prefix_cache():
    bm = BlockManager(8, BS)
    a = make_req("a", list(range(8)))
    compute_all(bm, a)
    assert not bm.reset_prefix_cache()  # still in use
    bm.free(a)
    assert bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0
