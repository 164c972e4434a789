"""The routing simulator's KV tiers (issue 19): a server's block pool with a host tier under it, and pulls.

``bench.router_sim`` builds a ``TieredBlockPool`` instead of a ``BlockPool`` when ``SimConfig.host_blocks`` > 0.
It models what Duet's servers do (``engine.kv_tier``):

- Write-through: every block that enters the device cache (a KV ``stored`` event) is also kept on the host tier,
  an LRU of ``host_blocks`` hashes; a host eviction is a ``removed`` event of tier ``host``.
- Admission: the request claims its device hits, then the run right after them on the host tier, then (when
  the router planned a pull) the blocks up to ``pull_blocks`` that another server holds. Those become cached
  device blocks at once (the simulator's time is elsewhere: ``fetch_s`` says how long the copies take, and the
  simulation starts the prefill of the rest that much later, without occupying the server meanwhile, as the
  copier thread does not block the step loop).

Costs are the real system's shape: host load ``host_load_s_per_token`` x tokens; a pull
``pull_overhead_s + tokens x pull_s_per_token`` (what ``engine.router.tier_cost`` prices, with the truth here and
the router's estimate there).
"""
from __future__ import annotations

from collections import OrderedDict

from duet.bench.router_sim import BlockPool
from duet.engine.router.prefix_index import PrefixIndex


class TieredBlockPool(BlockPool):
    def __init__(self, server_id: str, total: int, index: PrefixIndex, host_blocks: int, block_size: int,
                 host_load_s_per_token: float, pull_overhead_s: float, pull_s_per_token: float) -> None:
        super().__init__(server_id, total, index)
        self.host: OrderedDict[int, None] = OrderedDict()  # host-tier hashes, least recently used first
        self.host_blocks = host_blocks
        self.block_size = block_size
        self.host_load_s_per_token = host_load_s_per_token
        self.pull_overhead_s = pull_overhead_s
        self.pull_s_per_token = pull_s_per_token
        self.last_fetch = (0, 0)
        """(host blocks loaded, blocks pulled) by the last ``acquire``."""

    def acquire(self, hashes: list[int], num_blocks: int, pull_blocks: int = 0) -> int | None:
        """As ``BlockPool.acquire``, counting host-tier hits and the first ``pull_blocks`` blocks (pulled from
        elsewhere) as cached blocks: they are claimed as such (loaded), and ``last_fetch`` says how many."""
        m = 0
        while m < len(hashes) and (hashes[m] in self.ref or hashes[m] in self.lru):
            m += 1
        h = m
        while h < len(hashes) and hashes[h] in self.host:
            h += 1
        p = max(h, min(pull_blocks, len(hashes)))
        num_new = num_blocks - m  # host hits and pulled blocks need device blocks like computed ones
        num_idle_hits = sum(1 for x in hashes[:m] if x in self.lru)
        if self.total - len(self.ref) - self.num_anon - num_idle_hits < num_new:
            return None
        got = super().acquire(hashes[:m], m)  # the device hits, as before tiers
        assert got == m
        evicted = []
        while self.total - len(self.ref) - self.num_anon - len(self.lru) < num_new:
            evicted.append(self.lru.popitem(last=False)[0])
        if evicted:
            self.index.removed(self.server_id, evicted)
        fetched = hashes[m:p]
        for x in fetched:
            self.ref[x] = 1
            if x in self.host:
                self.host.move_to_end(x)
        if fetched:
            self.index.stored(self.server_id, fetched)
        self.num_anon += num_new - len(fetched)
        self.last_fetch = (h - m, p - h)
        return p

    @property
    def fetch_s(self) -> float:
        """Seconds the last ``acquire``'s host loads and pull take (before the prefill of the rest can start)."""
        host, pulled = self.last_fetch
        seconds = host * self.block_size * self.host_load_s_per_token
        if pulled:
            seconds += self.pull_overhead_s + pulled * self.block_size * self.pull_s_per_token
        return seconds

    def promote(self, hashes: list[int]) -> None:
        super().promote(hashes)
        self._write_through(hashes)

    def _write_through(self, hashes: list[int]) -> None:
        stored, removed = [], []
        for x in hashes:
            if x in self.host:
                self.host.move_to_end(x)
                continue
            self.host[x] = None
            stored.append(x)
            if len(self.host) > self.host_blocks:
                removed.append(self.host.popitem(last=False)[0])
        if stored:
            self.index.stored(self.server_id, stored, tier="host")
        if removed:
            self.index.removed(self.server_id, removed, tier="host")
