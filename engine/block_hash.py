"""Chained block hashes: the identity of a full KV block, shared by the engine and the router.

``hash(block i) = H(hash(block i-1), token ids of block i)``, so equal hashes mean equal whole prefixes
(up to a 64-bit collision, which the block manager rules out by comparing the stored token ids). The hash is
stable across processes and Python versions (blake2b, not ``hash()``), so a router can compute the same
values from the same tokenizer output and match them against the engines' KV events.
"""
from __future__ import annotations

import hashlib
from array import array
from typing import Iterator, Sequence

ROOT_HASH = 0  # the parent of a sequence's first block


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """64-bit hash of one full block given its parent's hash."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent_hash.to_bytes(8, "little", signed=False))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little", signed=False)


def iter_block_hashes(token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_HASH) -> Iterator[int]:
    """Hashes of each *full* block of ``token_ids`` (a trailing partial block has none)."""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block(parent_hash, token_ids[start:start + block_size])
        yield parent_hash


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    return list(iter_block_hashes(token_ids, block_size))
