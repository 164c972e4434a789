"""The host tier's memory: KV blocks in host RAM, found by the same chained hashes as the device prefix cache.

    kv  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] on the CPU (pinned for a CUDA engine)

the device pool's layout with another block count, so one gather and one scatter op move blocks between the two
(``engine.kv_tier.block_copier``). Pure bookkeeping besides that tensor: which block holds which hash (verified
by its token ids, as on the device), who reads it, which goes next. Each host block has a state::

    state     leaves when                                                        to
    FREE      begin_write(): a device block is being copied in                   WRITING
    WRITING   end_write(ok): the copy landed (it becomes findable)               CACHED
              end_write(failed): the copy failed                                 FREE
    CACHED    evicted by begin_write (least recently used, no reader)            FREE

A CACHED block that someone reads (``acquire``: a load into the device, a pull's packing) is out of the LRU
queue until its last reader ``release``s it, so a full tier evicts other blocks and never one being read.
Writes never wait: with every block WRITING or read, ``begin_write`` returns None and the block is not kept.
Events (``drain_events``) are the router's view of this tier: ``stored`` when a copy landed, ``removed`` when a
block was evicted, all with ``tier="host"``.

Not thread-safe: the engine's loop thread owns it (the copier thread only touches ``kv``, at block ids the
loop thread handed it).
"""
from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

import torch

from duet.engine.kv_events import BlockRemoved, BlockStored, KVEvent


class HostBlockState(enum.Enum):
    FREE = "free"
    WRITING = "writing"
    CACHED = "cached"


HOST_BLOCK_TRANSITIONS = {
    HostBlockState.FREE: frozenset({HostBlockState.WRITING}),
    HostBlockState.WRITING: frozenset({HostBlockState.CACHED, HostBlockState.FREE}),
    HostBlockState.CACHED: frozenset({HostBlockState.FREE}),
}


@dataclass
class HostBlock:
    block_id: int
    state: HostBlockState = HostBlockState.FREE
    block_hash: int | None = None
    parent_hash: int = 0
    token_ids: tuple[int, ...] | None = None
    readers: int = 0


@dataclass
class HostPoolStats:
    blocks_written: int = 0
    write_failures: int = 0
    writes_refused: int = 0
    """Copies not kept: every block was being written or read."""
    evictions: int = 0


class HostBlockPool:
    def __init__(self, num_blocks: int, slab_shape: tuple[int, ...], dtype: torch.dtype, pin_memory: bool = False):
        """``slab_shape``: the device pool's ``[num_layers, 2, *, block_size, num_kv_heads, head_dim]`` (the block
        count is replaced by ``num_blocks``)."""
        if num_blocks < 1:
            raise ValueError(f"host tier needs at least one block, got {num_blocks}")
        shape = (slab_shape[0], slab_shape[1], num_blocks, *slab_shape[3:])
        self.kv = torch.zeros(shape, dtype=dtype, pin_memory=pin_memory)  # [L, 2, num_blocks, bs, heads, head_dim]
        self.num_blocks = num_blocks
        self.block_size = shape[3]
        self.blocks = [HostBlock(i) for i in range(num_blocks)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is used first
        self._lru: OrderedDict[int, None] = OrderedDict()  # CACHED, unread; least recently used first
        self._cached: dict[int, HostBlock] = {}  # hash -> CACHED block
        self._writing: dict[int, HostBlock] = {}  # hash -> WRITING block (a second copy of it is not started)
        self._events: list[KVEvent] = []
        self.stats = HostPoolStats()

    # ---- queries ----------------------------------------------------------------------------------------
    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_free_blocks(self) -> int:
        """Blocks a write may take now: FREE ones and CACHED ones nobody reads."""
        return len(self._free) + len(self._lru)

    @property
    def num_read_blocks(self) -> int:
        return sum(1 for b in self.blocks if b.readers)

    @property
    def num_writing_blocks(self) -> int:
        return len(self._writing)

    @property
    def block_bytes(self) -> int:
        return self.kv[:, :, 0].numel() * self.kv.element_size()

    def find(self, block_hash: int, token_ids: list[int] | tuple[int, ...]) -> int | None:
        """The CACHED block holding ``block_hash`` with exactly these tokens, or None."""
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block.block_id

    def holds(self, block_hash: int) -> bool:
        """The hash is CACHED or being written here (a write-through of it needs no second copy)."""
        return block_hash in self._cached or block_hash in self._writing

    # ---- writes -----------------------------------------------------------------------------------------
    def begin_write(self, block_hash: int, parent_hash: int, token_ids: tuple[int, ...]) -> int | None:
        """A block to copy ``block_hash``'s KV into (the least recently used unread one when none is FREE), or
        None: the hash is here already, or every block is being written or read."""
        if self.holds(block_hash):
            return None
        if self._free:
            block = self.blocks[self._free.pop()]
        elif self._lru:
            block = self.blocks[self._lru.popitem(last=False)[0]]
            self._evict(block)
        else:
            self.stats.writes_refused += 1
            return None
        self._to(block, HostBlockState.WRITING)
        block.block_hash, block.parent_hash, block.token_ids = block_hash, parent_hash, token_ids
        self._writing[block_hash] = block
        return block.block_id

    def end_write(self, block_id: int, ok: bool) -> None:
        """The copy into ``block_id`` ended: CACHED (findable, most recently used) when ``ok``, else FREE."""
        block = self.blocks[block_id]
        del self._writing[block.block_hash]
        if not ok:
            self.stats.write_failures += 1
            self._to(block, HostBlockState.FREE)
            block.block_hash = block.token_ids = None
            self._free.append(block_id)
            return
        self._to(block, HostBlockState.CACHED)
        self._cached[block.block_hash] = block
        self._lru[block_id] = None
        self.stats.blocks_written += 1
        last = self._events[-1] if self._events else None
        if isinstance(last, BlockStored) and last.tier == "host" and last.block_hashes[-1] == block.parent_hash:
            last.block_hashes.append(block.block_hash)  # the next block of the same chain: one event
            last.token_ids.extend(block.token_ids)
        else:
            self._events.append(BlockStored([block.block_hash], block.parent_hash, list(block.token_ids),
                                            self.block_size, tier="host"))

    # ---- reads ------------------------------------------------------------------------------------------
    def acquire(self, block_ids: list[int]) -> None:
        """A copy out of these CACHED blocks starts: none of them is evicted until ``release``."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.state is not HostBlockState.CACHED:
                raise RuntimeError(f"host block {block_id} is {block.state.value}, not cached: nothing to read")
            block.readers += 1
            self._lru.pop(block_id, None)

    def release(self, block_ids: list[int]) -> None:
        """The copy ``acquire`` was for ended: the blocks are the most recently used ones."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.readers <= 0:
                raise RuntimeError(f"host block {block_id} released more often than acquired")
            block.readers -= 1
            if block.readers == 0:
                self._lru[block_id] = None

    def touch(self, block_hash: int) -> None:
        """The hash was used again (a write-through found it here): evict it last."""
        block = self._cached.get(block_hash)
        if block is not None and block.block_id in self._lru:
            self._lru.move_to_end(block.block_id)

    def drain_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    # ---- internals ----------------------------------------------------------------------------------------
    def _evict(self, block: HostBlock) -> None:
        """A CACHED block with no reader stops holding its hash (the caller reuses or frees it)."""
        del self._cached[block.block_hash]
        self._events.append(BlockRemoved([block.block_hash], tier="host"))
        self.stats.evictions += 1
        self._to(block, HostBlockState.FREE)
        block.block_hash = block.token_ids = None

    @staticmethod
    def _to(block: HostBlock, state: HostBlockState) -> None:
        if state not in HOST_BLOCK_TRANSITIONS[block.state]:
            raise AssertionError(f"host block {block.block_id}: {block.state.value} -> {state.value} is not a transition")
        block.state = state
