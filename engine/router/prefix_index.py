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

Tiers (issue 19). Events carry the tier they are about: ``device`` (the default, what ``match`` answers
for) or ``host`` (a server's host-memory tier, kept in a second, separate set of maps). ``match_tiers`` says,
per server, how many leading blocks it holds on its device and how many more right after those on its host
tier, which is what ``engine.router.tier_cost`` prices. A ``cleared`` without a tier (a restart, a server
declared dead) drops both tiers.

Not thread-safe. The caller (the router's event loop or the simulator) applies events and runs
matches from one thread.
"""
from __future__ import annotations

from typing import Hashable, Iterable, Sequence

from duet.engine.router.tier_cost import TierHit

ServerId = Hashable


class PrefixIndex:
    """Per-server sets of cached block hashes, plus the inverse map used for prefix matching."""

    def __init__(self, *, _tier: str = "device") -> None:
        self._servers_by_hash: dict[int, set[ServerId]] = {}
        self._hashes_by_server: dict[ServerId, set[int]] = {}
        self._epoch_by_server: dict[ServerId, int] = {}
        self._host: PrefixIndex | None = PrefixIndex(_tier="host") if _tier == "device" else None
        """The host tier's maps (None in the host index itself)."""

    # --- KV events -------------------------------------------------------------------------------

    def stored(self, server_id: ServerId, block_hashes: Iterable[int], tier: str = "device") -> None:
        """``server_id`` now holds these blocks. Storing a block it already holds does nothing."""
        if tier != "device":
            self._host.stored(server_id, block_hashes)
            return
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

    def removed(self, server_id: ServerId, block_hashes: Iterable[int], tier: str = "device") -> None:
        """``server_id`` evicted these blocks. Unknown hashes are ignored: events can race a clear."""
        if tier != "device":
            self._host.removed(server_id, block_hashes)
            return
        held = self._hashes_by_server.get(server_id)
        if not held:
            return
        for block_hash in block_hashes:
            if block_hash not in held:
                continue
            held.discard(block_hash)
            self._unlink(block_hash, server_id)

    def cleared(self, server_id: ServerId, tier: str | None = None) -> None:
        """``server_id`` dropped its whole cache (of ``tier``; None: every tier). The server stays known (its
        epoch is kept)."""
        if self._host is not None and tier != "device":
            self._host.cleared(server_id)
        if tier == "host":
            return
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
        if self._host is not None:
            self._host.drop_server(server_id)

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

    def match_tiers(self, block_hashes: Sequence[int],
                    server_ids: Iterable[ServerId] | None = None) -> dict[ServerId, TierHit]:
        """Per server: its leading blocks of ``block_hashes`` on the device (as ``match``), then how many of the
        following blocks its host tier holds (each block on the host or the device, up to the first it lacks).
        Servers holding nothing of the prompt are left out."""
        device = self.match(block_hashes, server_ids)
        host = self._host.match(block_hashes, server_ids)  # a quick candidate set: host-only prefixes
        hits: dict[ServerId, TierHit] = {}
        for server_id in device.keys() | host.keys():
            on_device = self._hashes_by_server.get(server_id, ())
            on_host = self._host._hashes_by_server.get(server_id, ())
            n = k = device.get(server_id, 0)
            while k < len(block_hashes) and (block_hashes[k] in on_host or block_hashes[k] in on_device):
                k += 1
            if k:
                hits[server_id] = TierHit(n, k - n)
        return hits

    def num_blocks(self, server_id: ServerId, tier: str = "device") -> int:
        """How many blocks the index believes ``server_id`` holds (0 for an unknown server)."""
        if tier != "device":
            return self._host.num_blocks(server_id)
        return len(self._hashes_by_server.get(server_id, ()))

    def holds(self, server_id: ServerId, block_hash: int) -> bool:
        return block_hash in self._hashes_by_server.get(server_id, ())

    def server_ids(self) -> list[ServerId]:
        """Servers that the index knows: they sent an event or an epoch and were not dropped."""
        return list(self._hashes_by_server.keys() | self._epoch_by_server.keys())

    def __len__(self) -> int:
        """Number of distinct block hashes held by at least one server."""
        return len(self._servers_by_hash)
