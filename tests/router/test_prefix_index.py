"""PrefixIndex: longest cached prefix per server, kept from KV events, over real chained block hashes."""
from __future__ import annotations

import random

from duet.engine.block_hash import block_hashes
from duet.engine.router.prefix_index import PrefixIndex

BLOCK = 16


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32_000) for _ in range(n)]


def test_match_gives_each_servers_longest_prefix():
    prompt = tokens(6 * BLOCK + 5, seed=1)  # 6 full blocks + a partial one (which has no hash)
    hashes = block_hashes(prompt, BLOCK)
    assert len(hashes) == 6
    index = PrefixIndex()
    index.stored("a", hashes)
    index.stored("b", hashes[:2])
    index.stored("c", block_hashes(tokens(4 * BLOCK, seed=2), BLOCK))  # unrelated content
    assert index.match(hashes) == {"a": 6, "b": 2}
    assert index.match(hashes[:4]) == {"a": 4, "b": 2}
    assert index.match([]) == {}


def test_prefix_stops_at_first_gap():
    hashes = block_hashes(tokens(5 * BLOCK, seed=3), BLOCK)
    index = PrefixIndex()
    index.stored("a", [hashes[0], hashes[1], hashes[3], hashes[4]])  # block 2 missing
    index.stored("b", hashes[1:])  # block 0 missing: nothing usable
    assert index.match(hashes) == {"a": 2}


def test_chained_hash_distinguishes_equal_blocks_after_different_parents():
    shared, tail = tokens(BLOCK, seed=4), tokens(BLOCK, seed=5)
    prompt_a = shared + tokens(BLOCK, seed=6) + tail
    prompt_b = shared + tokens(BLOCK, seed=7) + tail  # same third block, different second block
    index = PrefixIndex()
    index.stored("a", block_hashes(prompt_a, BLOCK))
    assert index.match(block_hashes(prompt_b, BLOCK)) == {"a": 1}


def test_removed_cleared_and_drop_server():
    hashes = block_hashes(tokens(4 * BLOCK, seed=8), BLOCK)
    index = PrefixIndex()
    index.stored("a", hashes)
    index.stored("b", hashes)
    index.removed("a", [hashes[1]])
    index.removed("a", [12345])  # unknown hash: ignored (events can race a clear)
    index.removed("zzz", hashes)  # unknown server: ignored
    assert index.match(hashes) == {"a": 1, "b": 4}
    assert index.num_blocks("a") == 3
    index.cleared("b")
    assert index.match(hashes) == {"a": 1}
    assert "b" in index.server_ids() and index.num_blocks("b") == 0
    index.stored("a", hashes)  # re-storing is idempotent
    index.stored("a", hashes)
    assert index.match(hashes) == {"a": 4} and index.num_blocks("a") == 4
    index.drop_server("a")
    assert index.match(hashes) == {} and len(index) == 0
    assert "a" not in index.server_ids()


def test_new_epoch_clears_the_servers_cache():
    hashes = block_hashes(tokens(3 * BLOCK, seed=9), BLOCK)
    index = PrefixIndex()
    assert index.note_epoch("a", 1) is False
    index.stored("a", hashes)
    assert index.note_epoch("a", 1) is False
    assert index.match(hashes) == {"a": 3}
    assert index.note_epoch("a", 2) is True  # restarted: its old blocks are gone
    assert index.match(hashes) == {}


def test_server_filter():
    hashes = block_hashes(tokens(3 * BLOCK, seed=10), BLOCK)
    index = PrefixIndex()
    for server_id in ("a", "b", "c"):
        index.stored(server_id, hashes)
    assert index.match(hashes, server_ids={"b", "c", "nope"}) == {"b": 3, "c": 3}


def test_many_servers_against_brute_force():
    """300 servers each hold a random prefix of one of a few conversations, with random evictions."""
    rng = random.Random(11)
    system = tokens(8 * BLOCK, seed=12)
    conversations = [system + tokens(24 * BLOCK, seed=100 + i) for i in range(5)]
    conv_hashes = [block_hashes(c, BLOCK) for c in conversations]
    index = PrefixIndex()
    held: dict[str, set[int]] = {}
    for s in range(300):
        server_id = f"s{s:03d}"
        hashes = conv_hashes[rng.randrange(5)]
        stored = hashes[:rng.randrange(len(hashes) + 1)]
        index.stored(server_id, stored)
        evicted = [h for h in stored if rng.random() < 0.05]
        index.removed(server_id, evicted)
        held[server_id] = set(stored) - set(evicted)
    for hashes in conv_hashes:
        expected = {}
        for server_id, blocks in held.items():
            n = 0
            while n < len(hashes) and hashes[n] in blocks:
                n += 1
            if n:
                expected[server_id] = n
        assert index.match(hashes) == expected
