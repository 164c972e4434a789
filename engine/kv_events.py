"""KV cache events: what the block manager stored or dropped, for consumers such as the router's prefix index.

Events carry the chained block hashes of ``engine.block_hash``. They are plain dataclasses that travel as
they are inside ``engine.protocol.KVEvents`` (the wire codec checks each field; ``kind`` tells them apart).

``tier`` says which of the server's KV tiers the event is about: ``device`` (the paged pool the model reads;
every event before issue 19 was one, and a sender that omits the field means it) or ``host`` (the host-memory
tier, ``engine.kv_tier``). A block evicted from the device but kept on the host is a device ``removed`` and a
host ``stored`` (sent when its copy landed), so the router can price the two differently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Tier = Literal["device", "host"]
TIERS: tuple[Tier, ...] = ("device", "host")


@dataclass
class BlockStored:
    """Full blocks became cached, in prefix order: ``block_hashes[i]`` is the parent of ``block_hashes[i+1]``."""

    block_hashes: list[int]
    parent_hash: int
    token_ids: list[int] = field(default_factory=list)
    block_size: int = 16
    kind: Literal["stored"] = "stored"
    tier: Tier = "device"


@dataclass
class BlockRemoved:
    """Cached blocks were evicted (their hashes no longer resolve on this engine)."""

    block_hashes: list[int]
    kind: Literal["removed"] = "removed"
    tier: Tier = "device"


@dataclass
class AllBlocksCleared:
    """The whole prefix cache was dropped (reset or restart)."""

    kind: Literal["cleared"] = "cleared"
    tier: Tier = "device"


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
