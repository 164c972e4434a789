"""``HostKVTier``: one engine's host-memory KV tier, kept under its device prefix cache.

Write-through: every block that enters the device prefix cache is copied to the host tier (``write_through``,
after each step) unless the host holds its hash already, so an eviction from the device pool costs nothing
and loses nothing the host tier can keep. We chose it over copying at eviction time because the evicted
block is reused by the very step that evicts it, so the copy would sit on the step's critical path; and
every cached block is written once either way, at a bandwidth (device -> host) far above the rate a prefill
fills blocks.

A request admitted with a longer prefix on the host than on the device (``match``) gets device blocks for
that run, which are loaded (``load``) before its prefill resumes at the first uncached token
(``engine.kv_tier.kv_fetch``). A pull that another server asked for is packed from device blocks and host
blocks alike (``locate`` + ``pack``). Every copy runs on the ``BlockCopier``; until it ended, the device
blocks it reads or writes are held in the block manager and the host blocks it reads are acquired in the
host pool, so neither side can reuse them. ``poll`` releases them and reports what ended.

Loop thread only (the copier's worker runs the copy functions built here, over block ids fixed at submit).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from duet.engine.block_manager import BlockManager
from duet.engine.kv_events import KVEvent
from duet.engine.kv_tier.block_copier import BlockCopier, CopyJob
from duet.engine.kv_tier.host_block_pool import HostBlockPool
from duet.engine.kv_tier.kv_fetch import KVFetch
from duet.engine.request import Request
from duet.kernels.kv_blocks import gather_kv_blocks, scatter_kv_blocks

logger = logging.getLogger(__name__)


@dataclass
class HostTierStats:
    offload_blocks: int = 0
    offload_bytes: int = 0
    load_blocks: int = 0
    load_bytes: int = 0
    load_failures: int = 0
    load_seconds_sum: float = 0.0
    load_seconds_max: float = 0.0
    pack_blocks: int = 0
    """Blocks copied into pull slabs for other servers (device and host sources)."""

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(eq=False)
class _Holds:
    """What one copy keeps from reuse until it ended, and whom to tell."""

    device_ids: list[int]
    read_ids: list[int] = field(default_factory=list)
    """Host blocks it reads (acquired)."""
    written_ids: list[int] = field(default_factory=list)
    """Host blocks it writes (WRITING)."""
    owner: Any = None
    """A ``KVFetch`` (load) or the caller's tag (pack)."""


class HostKVTier:
    def __init__(self, block_manager: BlockManager, kv_cache: torch.Tensor, num_blocks: int,
                 copier: BlockCopier | None = None):
        """kv_cache  # [num_layers, 2, num_device_blocks, block_size, num_kv_heads, head_dim]: the device pool"""
        self.bm = block_manager
        self.kv_cache = kv_cache
        self.num_layers = kv_cache.shape[0]
        self.block_size = kv_cache.shape[3]
        self.pool = HostBlockPool(num_blocks, tuple(kv_cache.shape), kv_cache.dtype, pin_memory=kv_cache.is_cuda)
        self.copier = copier or BlockCopier(kv_cache.device)
        self.stats = HostTierStats()
        block_manager.track_cached = True

    @property
    def block_bytes(self) -> int:
        return self.pool.block_bytes

    @property
    def busy(self) -> bool:
        """Copies are in flight (the owner should poll soon)."""
        return self.copier.busy

    # ---- write-through ------------------------------------------------------------------------------------
    def write_through(self) -> None:
        """Copy every block that entered the device prefix cache since the last call to the host tier."""
        device_ids, host_ids = [], []
        for cb in self.bm.drain_cached():
            if self.bm.blocks[cb.block_id].block_hash != cb.block_hash:
                continue  # evicted since it was cached: its KV is gone
            if self.pool.holds(cb.block_hash):
                self.pool.touch(cb.block_hash)
                continue
            host_id = self.pool.begin_write(cb.block_hash, cb.parent_hash, cb.token_ids)
            if host_id is not None:
                device_ids.append(cb.block_id)
                host_ids.append(host_id)
        if not device_ids:
            return
        self.bm.hold(device_ids)
        src = self._ids(device_ids, self.kv_cache.device)
        dst = self._ids(host_ids, torch.device("cpu"))

        def offload() -> None:
            slab = gather_kv_blocks(self.kv_cache, src, 0, self.num_layers)  # [L, 2, n, bs, heads, head_dim]
            scatter_kv_blocks(slab.cpu(), dst, 0, self.num_layers, self.pool.kv)

        self.copier.submit("offload", offload, len(device_ids) * self.block_bytes,
                           _Holds(device_ids, written_ids=host_ids))

    # ---- loads --------------------------------------------------------------------------------------------
    def match(self, req: Request, start_block: int) -> list[int]:
        """Host blocks continuing ``req``'s cached prefix from block ``start_block`` (its device hits end there).
        At least one prompt token is always left to compute (its logits give the first token)."""
        hashes = req.update_block_hashes(self.block_size)
        bs = self.block_size
        found: list[int] = []
        for i in range(start_block, (req.num_tokens - 1) // bs):
            host_id = self.pool.find(hashes[i], req.token_slice(i * bs, (i + 1) * bs))
            if host_id is None:
                break
            found.append(host_id)
        return found

    def load(self, fetch: KVFetch, host_ids: list[int]) -> None:
        """Copy ``host_ids`` into the blocks of ``fetch``'s host part (allocated to its request)."""
        part = fetch.part("host")
        device_ids = fetch.request.block_ids[part.start_block:part.end_block]
        if len(device_ids) != len(host_ids):
            raise ValueError(f"{fetch.request.request_id}: {len(host_ids)} host blocks for {len(device_ids)} device blocks")
        self.pool.acquire(host_ids)
        self.bm.hold(device_ids)
        src = self._ids(host_ids, torch.device("cpu"))
        dst = self._ids(device_ids, self.kv_cache.device)

        def load() -> None:
            slab = gather_kv_blocks(self.pool.kv, src, 0, self.num_layers)  # [L, 2, n, bs, heads, head_dim]
            scatter_kv_blocks(slab.to(self.kv_cache.device), dst, 0, self.num_layers, self.kv_cache)

        self.copier.submit("load", load, len(host_ids) * self.block_bytes, _Holds(device_ids, read_ids=host_ids,
                                                                                  owner=fetch))

    # ---- pulls served to other servers --------------------------------------------------------------------
    def locate(self, token_ids: list[int], block_hashes: list[int]) -> list[tuple[str, int]]:
        """Where each leading full block of ``token_ids`` is cached here: ``("device", block id)`` or
        ``("host", host block id)``, up to the first block cached in neither."""
        bs = self.block_size
        out: list[tuple[str, int]] = []
        for i, h in enumerate(block_hashes):
            tokens = token_ids[i * bs:(i + 1) * bs]
            device_id = self.bm.cached_block(h, tokens)
            if device_id is not None:
                out.append(("device", device_id))
                continue
            host_id = self.pool.find(h, tokens)
            if host_id is None:
                break
            out.append(("host", host_id))
        return out

    def pack(self, slab: torch.Tensor, where: list[tuple[str, int]], tag: Any) -> None:
        """Copy the blocks ``where`` names (``locate``) into ``slab``, in order; ``tag`` comes back from ``poll``.

        slab  # [num_layers, 2, len(where), block_size, num_kv_heads, head_dim] on the device (a pull's staging)
        """
        device_pos = [i for i, (tier, _) in enumerate(where) if tier == "device"]
        host_pos = [i for i, (tier, _) in enumerate(where) if tier == "host"]
        device_ids = [where[i][1] for i in device_pos]
        host_ids = [where[i][1] for i in host_pos]
        self.bm.hold(device_ids)
        self.pool.acquire(host_ids)
        dev = slab.device
        parts = [(self.kv_cache, self._ids(device_ids, self.kv_cache.device), self._ids(device_pos, dev)),
                 (self.pool.kv, self._ids(host_ids, torch.device("cpu")), self._ids(host_pos, dev))]

        def pack() -> None:
            for pool, ids, pos in parts:
                if ids.numel():
                    slab.index_copy_(2, pos, gather_kv_blocks(pool, ids, 0, self.num_layers).to(dev))

        self.copier.submit("pack", pack, len(where) * self.block_bytes, _Holds(device_ids, read_ids=host_ids, owner=tag))

    # ---- completions --------------------------------------------------------------------------------------
    def poll(self) -> list[CopyJob]:
        """Release what ended copies held; returns the ended loads (tag: their ``KVFetch``, already told) and
        packs (tag: the caller's), in the order they ended."""
        out = []
        for job in self.copier.finished():
            holds: _Holds = job.tag
            ok = job.error is None
            self.bm.release(holds.device_ids)
            self.pool.release(holds.read_ids)
            for host_id in holds.written_ids:
                self.pool.end_write(host_id, ok)
            n = len(holds.device_ids)
            if job.kind == "offload":
                self.stats.offload_blocks += n if ok else 0
                self.stats.offload_bytes += job.num_bytes if ok else 0
                continue
            job.tag = holds.owner
            if job.kind == "load":
                holds.owner.finish("host", ok)
                self.stats.load_blocks += n if ok else 0
                self.stats.load_bytes += job.num_bytes if ok else 0
                self.stats.load_failures += not ok
                self.stats.load_seconds_sum += job.seconds
                self.stats.load_seconds_max = max(self.stats.load_seconds_max, job.seconds)
            else:
                self.stats.pack_blocks += len(holds.device_ids) + len(holds.read_ids) if ok else 0
            out.append(job)
        return out

    def drain_events(self) -> list[KVEvent]:
        return self.pool.drain_events()

    def close(self) -> None:
        """Finish the copies in flight (they write memory this engine owns) and release what they held."""
        self.copier.close()
        self.poll()

    @staticmethod
    def _ids(ids: list[int], device: torch.device) -> torch.Tensor:  # [n] int64
        return torch.tensor(ids, dtype=torch.int64, device=device)
