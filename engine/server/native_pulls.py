"""``NativePulls``: both directions of one native server's prefix pulls, over its hand-off and its engine's tiers.

A pull moves the KV of a prompt prefix that server A caches (device pool or host tier) to server B, which then
computes only the rest of the prompt (``engine.protocol``'s module docstring has the messages). It is the
hand-off's own machinery (``transfer.handoff``): on A a ``SendTransfer`` packed at once by the host tier's
copier (``begin_pull`` / ``pull_packed``), on B a ``RecvTransfer`` with ``pull=True`` that completes without a
first token, scattering into the request's blocks (its ``KVFetch``'s ``peer`` part).

- Serving (A, ``serve``): the prefix's blocks are located (device first, then host), pinned, and copied into
  the transfer's slab; a block that is cached in neither tier fails the pull at once (B recomputes). The
  pins go when the copy ends, the slab when the send does; the router hears ``PullDone``.
- Pulling (B, ``start``): the engine admits the request with blocks for the whole pulled run, less its own
  device hits and host run (``LLMEngine.add_pulled_request``); on any failure (A killed, deadline, KVCancel,
  error) the blocks not in place are computed here (``LLMEngine.pull_ended(ok=False)``): a pull never fails a
  request.

Loop thread only (the copier's worker only runs the copies).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from duet.engine.block_hash import block_hashes
from duet.engine.llm_engine import LLMEngine
from duet.engine.protocol import PullDone, ServerStats
from duet.engine.sampling_params import SamplingParams
from duet.kernels.kv_blocks import gather_kv_blocks
from duet.transfer.handoff import Handoff
from duet.transfer.recv_transfer import RecvState, RecvTransfer
from duet.transfer.send_transfer import SendState, SendTransfer

logger = logging.getLogger(__name__)


@dataclass
class PullStats:
    started: int = 0
    completed: int = 0
    failed: int = 0
    bytes_received: int = 0
    seconds_sum: float = 0.0
    served: int = 0
    served_failed: int = 0
    bytes_served: int = 0


class NativePulls:
    def __init__(self, engine: LLMEngine, handoff: Handoff):
        self.engine = engine
        self.handoff = handoff
        self.incoming: dict[str, str] = {}  # transfer id -> request id of a pull into this server
        self.outgoing: dict[str, str] = {}  # transfer id -> engine request id of a pull served from here
        self.stats = PullStats()

    # ---- pulling (B) ------------------------------------------------------------------------------------
    def start(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, transfer_id: str,
              owner: str, num_blocks: int, timeout_s: float) -> bool:
        """See ``Executor.add_pulled``."""
        fetch = self.engine.add_pulled_request(request_id, prompt_token_ids, params, num_blocks)
        if isinstance(fetch, str):
            self.handoff.decline(transfer_id, owner, f"nothing pulled: {fetch}")
            return False
        part = fetch.part("peer")
        part.transfer_id = transfer_id
        req = fetch.request
        ids = torch.tensor(req.block_ids[part.start_block:part.end_block], dtype=torch.int64,
                           device=self.engine.runner.device)
        self.handoff.expect_recv(transfer_id, timeout_s, pull=True)
        self.handoff.recv_blocks(transfer_id, request_id, ids, part.start_block)
        self.handoff.peer_ready(transfer_id, owner)
        self.incoming[transfer_id] = request_id
        self.stats.started += 1
        return True

    def fail(self, transfer_id: str, reason: str) -> None:
        """The owner is gone (the router says so): stop waiting now, not at the receive's deadline."""
        if transfer_id in self.incoming:
            self.handoff.fail_recv(transfer_id, reason)

    def recv_ended(self, r: RecvTransfer) -> bool:
        """A receive ended; True when it was a pull (handled here: the request resumes either way)."""
        request_id = self.incoming.pop(r.transfer_id, None)
        if request_id is None:
            return False
        ok = r.state is RecvState.COMPLETE
        if ok:
            self.stats.completed += 1
            self.stats.bytes_received += r.nbytes
        else:
            self.stats.failed += 1
            if not r.cancelled:
                logger.warning("pull %s for %s failed (%s): computing those blocks here", r.transfer_id, request_id,
                               r.error)
        self.stats.seconds_sum += time.monotonic() - r.started_at
        self.engine.pull_ended(request_id, ok)
        return True

    # ---- serving (A) ------------------------------------------------------------------------------------
    def serve(self, engine_request_id: str, transfer_id: str, router_request_id: str, prefix_token_ids: list[int],
              timeout_s: float) -> None:
        """See ``Executor.add_pull_send``."""
        bs = self.engine.runner.block_size
        if not prefix_token_ids or len(prefix_token_ids) % bs:
            raise ValueError(f"prefix_token_ids: a pull moves whole blocks of {bs} tokens, got {len(prefix_token_ids)}")
        hashes = block_hashes(prefix_token_ids, bs)
        tier = self.engine.tier
        if tier is not None:
            where = tier.locate(prefix_token_ids, hashes)
        else:
            where = []
            for i, h in enumerate(hashes):
                block_id = self.engine.block_manager.cached_block(h, prefix_token_ids[i * bs:(i + 1) * bs])
                if block_id is None:
                    break
                where.append(("device", block_id))
        h = self.handoff
        h.expect_send(transfer_id, router_request_id, timeout_s, local_id=engine_request_id)
        self.outgoing[transfer_id] = engine_request_id
        if h.reserve_send(transfer_id, len(hashes)) is not None:
            return  # no staging room: the send fails, the puller is told
        if len(where) < len(hashes):
            h.abort_send(transfer_id, f"only {len(where)} of {len(hashes)} blocks are cached here")
            return
        slab = h.begin_pull(transfer_id)
        if slab is None:
            return
        if tier is not None:
            tier.pack(slab, where, transfer_id)  # off the loop; take_packed() ends it
            return
        ids = torch.tensor([i for _, i in where], dtype=torch.int64, device=slab.device)
        gather_kv_blocks(self.engine.runner.kv_cache, ids, 0, slab.shape[0], out=slab)  # device copy, in place
        h.pull_packed(transfer_id)

    def take_packed(self) -> None:
        """Copies into pull slabs that ended: their layers go out from the next hand-off advance."""
        packs, self.engine.packs_done = self.engine.packs_done, []
        for job in packs:
            self.handoff.pull_packed(job.tag, job.error)

    def send_ended(self, s: SendTransfer) -> PullDone | None:
        """A send ended; its ``PullDone`` when it was a pull served from here."""
        engine_request_id = self.outgoing.pop(s.transfer_id, None)
        if engine_request_id is None:
            return None
        ok = s.state is SendState.DONE
        self.stats.served += ok
        self.stats.served_failed += not ok
        self.stats.bytes_served += s.num_bytes if ok else 0
        return PullDone(engine_request_id, s.transfer_id, ok, s.error, s.slab.shape[2] if s.slab is not None else 0,
                        s.num_bytes, time.monotonic() - s.started_at)

    @property
    def open(self) -> int:
        return len(self.incoming) + len(self.outgoing)


def tier_stats_into(stats: ServerStats, engine: LLMEngine, pulls: PullStats) -> None:
    """The KV tiers' counters in the server's stats (``ServerStats``'s tier fields)."""
    sched = engine.scheduler
    stats.tier_lookups = sched.num_tier_lookups
    stats.host_hits, stats.host_hit_tokens = sched.num_tier_hits["host"], sched.fetched_tokens["host"]
    stats.pull_hits, stats.pulled_tokens = sched.num_tier_hits["peer"], sched.fetched_tokens["peer"]
    stats.pulls_started, stats.pull_bytes_received, stats.pull_seconds_sum = (pulls.started, pulls.bytes_received,
                                                                              pulls.seconds_sum)
    stats.pulls_served, stats.pulls_served_failed, stats.pull_bytes_served = (pulls.served, pulls.served_failed,
                                                                              pulls.bytes_served)
    tier = engine.tier
    if tier is None:
        return
    t, pool = tier.stats, tier.pool
    stats.host_tier_blocks, stats.host_tier_cached_blocks = pool.num_blocks, pool.num_cached_blocks
    stats.host_tier_busy_blocks = pool.num_read_blocks + pool.num_writing_blocks
    stats.host_offload_blocks, stats.host_offload_bytes = t.offload_blocks, t.offload_bytes
    stats.host_load_blocks, stats.host_load_bytes, stats.host_load_failures = t.load_blocks, t.load_bytes, t.load_failures
    stats.host_load_seconds_sum, stats.host_load_seconds_max = t.load_seconds_sum, t.load_seconds_max
    stats.host_evictions, stats.host_writes_refused = pool.stats.evictions, pool.stats.writes_refused
