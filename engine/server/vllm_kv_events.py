"""vLLM's KV cache events as Duet's: the router's prefix index only knows Duet's chained block hashes.

vLLM publishes ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` batches (msgspec msgpack) on a ZMQ
PUB socket, keyed by its own block hashes. A stored event carries its blocks' token ids and the hash of the
first block's parent, so each block's Duet hash (``engine.block_hash``) follows from the parent's; the
translator remembers vLLM hash -> Duet hash for every block it has seen stored, to resolve later parents
and removals. A stored event whose parent it never saw (published before the server subscribed) is
dropped: the router would not use a block after a gap either.
"""
from __future__ import annotations

import logging
from typing import Any

from duet.engine.block_hash import ROOT_HASH, hash_block
from duet.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

logger = logging.getLogger(__name__)


class KVEventTranslator:
    def __init__(self) -> None:
        from msgspec.msgpack import Decoder
        from vllm.distributed.kv_events import KVEventBatch

        self._decoder = Decoder(type=KVEventBatch)
        self._duet_hash: dict[Any, int] = {}  # vLLM block hash -> Duet chained hash

    def __len__(self) -> int:
        return len(self._duet_hash)

    def translate(self, payload: bytes) -> list[KVEvent]:
        """One published batch (the payload frame) as Duet events."""
        from vllm.distributed.kv_events import AllBlocksCleared as VCleared
        from vllm.distributed.kv_events import BlockRemoved as VRemoved
        from vllm.distributed.kv_events import BlockStored as VStored

        out: list[KVEvent] = []
        for ev in self._decoder.decode(payload).events:
            if isinstance(ev, VStored):
                if ev.group_idx not in (None, 0):
                    continue
                parent = ROOT_HASH if ev.parent_block_hash is None else self._duet_hash.get(ev.parent_block_hash)
                if parent is None:
                    logger.debug("dropping a stored event whose parent block was never seen")
                    continue
                first_parent, hashes = parent, []
                for i, vhash in enumerate(ev.block_hashes):
                    parent = hash_block(parent, ev.token_ids[i * ev.block_size:(i + 1) * ev.block_size])
                    self._duet_hash[vhash] = parent
                    hashes.append(parent)
                out.append(BlockStored(hashes, first_parent, list(ev.token_ids), ev.block_size))
            elif isinstance(ev, VRemoved):
                hashes = [self._duet_hash.pop(h) for h in ev.block_hashes if h in self._duet_hash]
                if hashes:
                    out.append(BlockRemoved(hashes))
            elif isinstance(ev, VCleared):
                self._duet_hash.clear()
                out.append(AllBlocksCleared())
        return out
