"""Which KV blocks each server holds, kept up to date from the servers' KV events.

A server's block manager publishes ``stored`` (full blocks that entered its prefix cache, by chained
hash), ``removed`` (blocks it evicted) and ``cleared`` (it dropped its whole cache, e.g. on restart).
The router applies each event here and, for every request, asks ``match(block_hashes)``: how many
*leading* blocks of the prompt each server already has.

The hashes are chained (``engine.block_hash``): block i's hash covers blocks 0..i. So a server holding
hash i holds the whole prefix up to i, *as of when it stored it*. Eviction can later remove a parent
and keep a child, so ``match`` still walks from the first block and stops at the first gap; a child
found after a gap is no use (the engine would not reuse it either).

The index is inverted (hash -> set of servers), so ``match`` costs about the number of servers that
still match at each step, summed over the request's blocks. It does not grow with the number of
servers that hold nothing of the prompt. The common case is cheap: many servers share a system prompt,
then the candidate set shrinks to the one or two servers holding the conversation.

Not thread-safe. The caller (the router's event loop or the simulator) applies events and runs
matches from one thread.
"""
from __future__ import annotations

from typing import Hashable, Iterable, Sequence

ServerId = Hashable


class PrefixIndex:
    """Per-server sets of cached block hashes, plus the inverse map used for prefix matching."""

    def __init__(self) -> None:
        self._servers_by_hash: dict[int, set[ServerId]] = {}
        self._hashes_by_server: dict[ServerId, set[int]] = {}
        self._epoch_by_server: dict[ServerId, int] = {}

    # --- KV events -------------------------------------------------------------------------------

    def stored(self, server_id: ServerId, block_hashes: Iterable[int]) -> None:
        """``server_id`` now holds these blocks. Storing a block it already holds does nothing."""
        held = self._hashes_by_server.setdefault(server_id, set())
        for block_hash in block_hashes:
            if block_hash in held:
                continue
            held.add(block_hash)
            holders = self._servers_by_hash.get(block_hash)
            if holders is None:
                self._servers_by_hash[block_hash] = {server_id}
            else:
                holders.add(server_id)

    def removed(self, server_id: ServerId, block_hashes: Iterable[int]) -> None:
        """``server_id`` evicted these blocks. Unknown hashes are ignored: events can race a clear."""
        held = self._hashes_by_server.get(server_id)
        if not held:
            return
        for block_hash in block_hashes:
            if block_hash not in held:
                continue
            held.discard(block_hash)
            self._unlink(block_hash, server_id)

    def cleared(self, server_id: ServerId) -> None:
        """``server_id`` dropped its whole cache. The server stays known (its epoch is kept)."""
        held = self._hashes_by_server.get(server_id)
        if not held:
            return
        for block_hash in held:
            self._unlink(block_hash, server_id)
        held.clear()

    def drop_server(self, server_id: ServerId) -> None:
        """Forget ``server_id`` entirely (it left the fleet or was declared dead)."""
        self.cleared(server_id)
        self._hashes_by_server.pop(server_id, None)
        self._epoch_by_server.pop(server_id, None)

    def note_epoch(self, server_id: ServerId, epoch: int) -> bool:
        """Record the server's epoch (it changes on every restart). A new epoch means the old cache is
        gone, so clear it. Returns True when it cleared. Call it on every HELLO or load report."""
        previous = self._epoch_by_server.get(server_id)
        self._epoch_by_server[server_id] = epoch
        if previous is not None and previous != epoch:
            self.cleared(server_id)
            return True
        return False

    def _unlink(self, block_hash: int, server_id: ServerId) -> None:
        holders = self._servers_by_hash.get(block_hash)
        if holders is None:
            return
        holders.discard(server_id)
        if not holders:
            del self._servers_by_hash[block_hash]

    # --- queries ---------------------------------------------------------------------------------

    def match(
        self, block_hashes: Sequence[int], server_ids: Iterable[ServerId] | None = None,
    ) -> dict[ServerId, int]:
        """Number of leading blocks of ``block_hashes`` that each server holds (its cached prefix).

        Only servers with at least one cached block appear in the result: a missing server means 0.
        ``server_ids`` limits the answer to those servers (e.g. one zone). ``block_hashes`` are the
        request's chained hashes at the servers' block size (``engine.block_hash.block_hashes``).
        """
        if not block_hashes:
            return {}
        first = self._servers_by_hash.get(block_hashes[0])
        if not first:
            return {}
        candidates = set(first) if server_ids is None else first.intersection(server_ids)
        result: dict[ServerId, int] = {}
        num_blocks = 0
        for block_hash in block_hashes:
            if not candidates:
                break
            holders = self._servers_by_hash.get(block_hash)
            still = candidates & holders if holders else set()
            for server_id in candidates - still:
                result[server_id] = num_blocks
            candidates = still
            num_blocks += 1
        for server_id in candidates:  # matched every block of the request
            result[server_id] = num_blocks
        return result

    def num_blocks(self, server_id: ServerId) -> int:
        """How many blocks the index believes ``server_id`` holds (0 for an unknown server)."""
        return len(self._hashes_by_server.get(server_id, ()))

    def holds(self, server_id: ServerId, block_hash: int) -> bool:
        return block_hash in self._hashes_by_server.get(server_id, ())

    def server_ids(self) -> list[ServerId]:
        """Servers that the index knows: they sent an event or an epoch and were not dropped."""
        return list(self._hashes_by_server.keys() | self._epoch_by_server.keys())

    def __len__(self) -> int:
        """Number of distinct block hashes held by at least one server."""
        return len(self._servers_by_hash)
