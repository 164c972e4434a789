"""Paged KV block manager: allocation, reference counts, prefix caching and LRU eviction.

Blocks hold ``block_size`` tokens. A *full* block that has been computed gets a chained hash
(``engine.block_hash``) and stays findable after its last owner frees it, until it is evicted to serve a new
allocation. Free blocks sit in one LRU queue (least recently freed first); a cached free block is reused by
a prefix hit or evicted by an allocation, whichever comes first. Lookups verify the stored token ids, so a
hash collision can never return wrong KV.

Besides requests, a copy in flight holds blocks (``hold`` / ``release``: the host tier's offloads and loads,
a pull's packing), so a block is never reused while a copy reads or writes it. With ``track_cached`` set (the
host tier is on) every block that enters the prefix cache is also listed for ``drain_cached`` (write-through).

No CUDA here: the block manager is pure bookkeeping and is unit-tested on CPU.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from duet.engine.block_hash import ROOT_HASH
from duet.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from duet.engine.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None
    """The block's tokens, kept for cached blocks to verify hash matches."""


@dataclass(frozen=True)
class CachedBlock:
    """A block that just entered the prefix cache (``drain_cached``): what a copy of it elsewhere needs."""

    block_id: int
    block_hash: int
    parent_hash: int
    token_ids: tuple[int, ...]


@dataclass
class PrefixCacheStats:
    queries: int = 0
    """Requests looked up."""
    query_tokens: int = 0
    hit_tokens: int = 0
    hit_blocks: int = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, Block] = {}
        self._events: list[KVEvent] = []
        self.stats = PrefixCacheStats()
        self.track_cached = False
        """List every newly cached block for ``drain_cached`` (the host tier copies them)."""
        self._newly_cached: list[CachedBlock] = []

    # ---- queries -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached-but-free blocks included: they are evictable)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Block ids holding the longest cached prefix of ``req``'s tokens (not yet claimed).

        At least one token is always left to compute, because the sampler needs its logits: a fully
        cached prompt gives back its last block.
        """
        if not self.enable_prefix_caching:
            return []
        hashes = req.update_block_hashes(self.block_size)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for i, h in enumerate(hashes[:max_blocks]):
            block_id = self.cached_block(h, req.token_slice(i * self.block_size, (i + 1) * self.block_size))
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def cached_block(self, block_hash: int, token_ids: list[int] | tuple[int, ...]) -> int | None:
        """The block caching ``block_hash`` with exactly these tokens, or None."""
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block.block_id

    # ---- allocation ----------------------------------------------------------------------------------
    def allocate(self, req: Request, num_new_tokens: int, cached_block_ids: list[int] = ()) -> bool:
        """Give ``req`` blocks for ``num_new_tokens`` more tokens past ``req.num_computed_tokens``.

        ``cached_block_ids`` (only at admission, when the request holds no blocks) are claimed first and
        count as computed tokens. All or nothing: returns False and changes nothing when blocks run out.
        """
        if not cached_block_ids and req.block_ids and (
                req.num_computed_tokens + num_new_tokens <= len(req.block_ids) * self.block_size):
            return True  # fits the blocks it holds (most decode steps)
        if cached_block_ids and req.block_ids:
            raise ValueError(f"{req.request_id}: prefix blocks can only be claimed at admission")
        num_cached_tokens = len(cached_block_ids) * self.block_size
        total_tokens = req.num_computed_tokens + num_cached_tokens + num_new_tokens
        num_new_blocks = self.blocks_needed(total_tokens) - len(req.block_ids) - len(cached_block_ids)
        reclaimed = sum(1 for b in cached_block_ids if self.blocks[b].ref_count == 0)
        if num_new_blocks + reclaimed > len(self._free):
            return False
        if not req.block_ids and req.num_computed_tokens == 0:  # an admission: count the prefix lookup
            self.stats.queries += 1
            self.stats.query_tokens += req.num_tokens
            self.stats.hit_blocks += len(cached_block_ids)
            self.stats.hit_tokens += num_cached_tokens
        for b in cached_block_ids:
            self._claim(self.blocks[b])
        req.block_ids.extend(cached_block_ids)
        req.num_computed_tokens += num_cached_tokens
        for _ in range(max(num_new_blocks, 0)):
            req.block_ids.append(self._take_free_block())
        return True

    def _claim(self, block: Block) -> None:
        if block.ref_count == 0:
            del self._free[block.block_id]
        block.ref_count += 1

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            self._uncache(block)
        block.ref_count = 1
        return block_id

    def _uncache(self, block: Block) -> None:
        if self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
            self._events.append(BlockRemoved([block.block_hash]))
        block.block_hash = None
        block.token_ids = None

    def cache_computed_blocks(self, req: Request) -> None:
        """Register ``req``'s newly full, computed blocks in the prefix cache (emits BlockStored)."""
        if not self.enable_prefix_caching:
            return
        # A held block keeps its hash until freed, so blocks before ``num_registered`` need no second look;
        # a decode step usually fills no block and returns here, without touching the request's hashes.
        num_registered = req.num_registered_blocks
        if req.num_computed_tokens // self.block_size <= num_registered:
            return
        num_full = min(req.num_computed_tokens, req.num_tokens) // self.block_size
        hashes = req.update_block_hashes(self.block_size)
        stored: list[int] = []
        first_new = None
        for i in range(num_registered, num_full):
            block = self.blocks[req.block_ids[i]]
            if block.block_hash is None:
                h = hashes[i]
                if h in self._cached:
                    continue  # identical content cached by another block; this one stays private (for now)
                start = i * self.block_size
                block.block_hash = h
                block.token_ids = tuple(req.token_slice(start, start + self.block_size))
                self._cached[h] = block
                if self.track_cached:
                    self._newly_cached.append(CachedBlock(block.block_id, h, hashes[i - 1] if i else ROOT_HASH,
                                                          block.token_ids))
                if first_new is None:
                    first_new = i
                stored.append(h)
            if i == num_registered:
                num_registered += 1
        req.num_registered_blocks = num_registered
        if stored:
            parent = hashes[first_new - 1] if first_new else ROOT_HASH
            tokens = req.token_slice(first_new * self.block_size, (first_new + len(stored)) * self.block_size)
            self._events.append(BlockStored(stored, parent, tokens, self.block_size))

    def free(self, req: Request) -> None:
        """Release all of ``req``'s blocks. Tail blocks go first into the LRU so they are evicted first."""
        for block_id in reversed(req.block_ids):
            self._unref(block_id, req.request_id)
        req.block_ids = []
        req.num_registered_blocks = 0

    def hold(self, block_ids: list[int]) -> None:
        """A copy reads or writes these blocks (each held by a request or cached): keep them until ``release``."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0 and block.block_hash is None:
                raise RuntimeError(f"block {block_id} is free: there is nothing in it to hold")
            self._claim(block)

    def release(self, block_ids: list[int]) -> None:
        """The copy that ``hold`` was for ended."""
        for block_id in reversed(block_ids):
            self._unref(block_id, "a copy")

    def _unref(self, block_id: int, owner: str) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count < 0:
            raise RuntimeError(f"block {block_id} freed twice ({owner})")
        if block.ref_count == 0:
            self._free[block_id] = None
            if block.block_hash is None:  # uncached blocks are worthless: put them at the eviction end
                self._free.move_to_end(block_id, last=False)

    def drain_cached(self) -> list[CachedBlock]:
        """Blocks that entered the prefix cache since the last call (with ``track_cached``), in cache order."""
        cached, self._newly_cached = self._newly_cached, []
        return cached

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block that no request holds. False if some are still in use."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
            block.token_ids = None
        self._cached.clear()
        self._events.append(AllBlocksCleared())
        return True

    def drain_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events
