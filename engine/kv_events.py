"""KV cache events: what the block manager stored or dropped, for consumers such as the router's prefix index.

Events carry the chained block hashes of ``engine.block_hash``. They are plain dataclasses with a
``to_dict`` / ``from_dict`` pair so servers can publish them as msgpack.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class BlockStored:
    """Full blocks became cached, in prefix order: ``block_hashes[i]`` is the parent of ``block_hashes[i+1]``."""

    block_hashes: list[int]
    parent_hash: int
    token_ids: list[int] = field(default_factory=list)
    block_size: int = 16
    kind: str = "stored"


@dataclass
class BlockRemoved:
    """Cached blocks were evicted (their hashes no longer resolve on this engine)."""

    block_hashes: list[int]
    kind: str = "removed"


@dataclass
class AllBlocksCleared:
    """The whole prefix cache was dropped (reset or restart)."""

    kind: str = "cleared"


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def event_to_dict(event: KVEvent) -> dict:
    return asdict(event)


def event_from_dict(data: dict) -> KVEvent:
    kind = data.get("kind")
    cls = {"stored": BlockStored, "removed": BlockRemoved, "cleared": AllBlocksCleared}.get(kind)
    if cls is None:
        raise ValueError(f"unknown KV event kind {kind!r}")
    return cls(**data)
