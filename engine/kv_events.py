"""KV cache events: what the block manager stored or dropped, for consumers such as the router's prefix index.

Events carry the chained block hashes of ``engine.block_hash``. They are plain dataclasses that travel as
they are inside ``engine.protocol.KVEvents`` (the wire codec checks each field; ``kind`` tells them apart).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class BlockStored:
    """Full blocks became cached, in prefix order: ``block_hashes[i]`` is the parent of ``block_hashes[i+1]``."""

    block_hashes: list[int]
    parent_hash: int
    token_ids: list[int] = field(default_factory=list)
    block_size: int = 16
    kind: Literal["stored"] = "stored"


@dataclass
class BlockRemoved:
    """Cached blocks were evicted (their hashes no longer resolve on this engine)."""

    block_hashes: list[int]
    kind: Literal["removed"] = "removed"


@dataclass
class AllBlocksCleared:
    """The whole prefix cache was dropped (reset or restart)."""

    kind: Literal["cleared"] = "cleared"


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
