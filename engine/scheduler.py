"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

There are no prefill and decode phases. Each step, running requests are served first (one token for a
decoding request, the next chunk for a partially prefilled one), then waiting requests are admitted in
arrival order while the step's token budget, the running-request cap and the KV blocks allow. A prompt
longer than the remaining budget is prefilled in chunks over several steps. When a running request needs a
block and none is free, the most recently admitted running request is preempted: its blocks are freed and
it goes back to the front of the queue, to be recomputed later (its prefix blocks usually still cached).

Requests in WAITING_FOR_KV (decode side of a disaggregated request) hold their blocks but are not
scheduled until their KV has arrived. A waiting request whose grammar is still compiling (structured
outputs) is passed over until it is ready, without losing its place. A request that wants prompt logprobs
takes a prefix-cache hit only for positions whose logprobs it already has (``Request.max_prefix_hit_tokens``).

With a host KV tier (``engine.kv_tier``), admission looks past a request's device prefix-cache hits into the
tier: when it holds more of the prompt, the request claims its device hits, gets blocks for its whole prompt,
and waits in WAITING_FOR_KV (``fetching``) while the host run loads (a ``KVFetch``); ``fetch_ended`` puts it back
at the front of the queue with the loaded tokens computed, and it prefills from the first token not in place. A
request that pulls a prefix from another server (``admit_for_pull``) waits the same way. Because its prompt's
blocks are all held from the fetch on, a request back from one never waits for blocks (waiting requests that
held only part of theirs could each wait, at the head of the queue, for blocks the others held).
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from duet.engine.block_manager import BlockManager
from duet.engine.kv_tier.kv_fetch import FetchPart, KVFetch
from duet.engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from duet.engine.kv_tier.host_tier import HostKVTier

logger = logging.getLogger(__name__)


@dataclass
class ScheduledChunk:
    request: Request
    start: int
    """First token index computed this step (== request.num_computed_tokens when scheduled)."""
    num_tokens: int

    @property
    def samples(self) -> bool:
        """This chunk reaches the request's last known token, so its logits give the next token."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """What the runner computes this step. Plain data; the runner never mutates scheduler state."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int):
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.waiting_for_kv: dict[str, Request] = {}
        self.num_preemptions = 0
        self.tier: HostKVTier | None = None
        """The host KV tier, when the engine has one (its ``match`` and ``load`` are all the scheduler uses)."""
        self.fetching: dict[str, KVFetch] = {}
        """Requests whose prompt blocks are loading from a KV tier (status WAITING_FOR_KV)."""
        self.num_tier_lookups = 0
        """Admissions that looked into the host tier (or pulled), for its hit / miss counts."""
        self.num_tier_hits = {"host": 0, "peer": 0}
        """Fetches that put blocks from the host tier / from another server in place."""
        self.fetched_tokens = {"host": 0, "peer": 0}
        """Prompt tokens whose KV came from the host tier / another server and was used (not recomputed)."""

    # ---- queues --------------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, request_id: str) -> Request | None:
        for req in self.running:
            if req.request_id == request_id:
                return req
        for req in self.waiting:
            if req.request_id == request_id:
                return req
        return self.waiting_for_kv.get(request_id)

    def remove(self, req: Request) -> None:
        """Take ``req`` out of every queue and free its blocks (finish or abort, in any state)."""
        if req in self.running:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING_FOR_KV:
            self.waiting_for_kv.pop(req.request_id, None)
            self.fetching.pop(req.request_id, None)  # a copy into its blocks holds them until it ends
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.block_manager.free(req)
        req.status = RequestStatus.FINISHED

    # ---- remote KV (decode side of disaggregation) ---------------------------------------------------
    def admit_for_remote_kv(self, req: Request) -> bool:
        """Allocate every block of ``req``'s prompt now (prefix-cache hits first). False if no room."""
        cached = self.block_manager.find_cached_prefix(req)
        num_new = req.num_prompt_tokens - len(cached) * self.block_manager.block_size
        if not self.block_manager.allocate(req, num_new, cached):
            return False
        req.num_cached_tokens = req.num_computed_tokens
        req.status = RequestStatus.WAITING_FOR_KV
        self.waiting_for_kv[req.request_id] = req
        return True

    def remote_kv_arrived(self, req: Request) -> None:
        """All prompt KV is in place (the first output token was appended by the caller): start decoding."""
        del self.waiting_for_kv[req.request_id]
        req.num_computed_tokens = req.num_prompt_tokens
        self.block_manager.cache_computed_blocks(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def remote_kv_failed(self, req: Request) -> None:
        """Fall back to computing the prompt locally (policy ``recompute``): keep prefix hits, redo the rest."""
        del self.waiting_for_kv[req.request_id]
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    # ---- KV from the tiers (host tier, pulls from other servers) --------------------------------------
    def admit_for_pull(self, req: Request, num_blocks: int) -> KVFetch | str:
        """Admit ``req`` with its first ``num_blocks`` prompt blocks pulled from another server, less what this
        server caches (device hits, then a host run, which loads meanwhile). Returns the fetch, whose ``peer``
        part the caller receives into, or why nothing is pulled (this server caches enough of it, or has no KV
        room now): the request is then queued as any other and computes what it does not find."""
        bm = self.block_manager
        cached = bm.find_cached_prefix(req)
        host = self.tier.match(req, len(cached)) if self.tier is not None else []
        # A prompt-logprobs request must compute the positions it has no logprobs for: nothing past them comes in.
        num_blocks = min(num_blocks, (req.num_tokens - 1) // bm.block_size, req.max_prefix_hit_tokens // bm.block_size)
        del cached[num_blocks:]
        del host[max(0, num_blocks - len(cached)):]
        why = None
        if num_blocks <= len(cached) + len(host):
            why = f"{len(cached)} + {len(host)} of its {num_blocks} blocks are cached here (device + host)"
        elif not bm.allocate(req, req.num_tokens - len(cached) * bm.block_size, cached):  # its whole prompt
            why = f"no KV room for its prompt ({bm.num_free_blocks} blocks free)"
        if why is not None:
            self.add(req)
            return why
        self.num_tier_lookups += 1
        end = len(cached) + len(host)
        parts = [FetchPart("host", len(cached), end)] if host else []
        return self._fetch(req, len(cached), host, parts + [FetchPart("peer", end, num_blocks)])

    def fetch_ended(self, fetch: KVFetch) -> None:
        """Every part of ``fetch`` ended: the request resumes at its first block not in place (if not aborted)."""
        req = fetch.request
        if self.fetching.get(req.request_id) is not fetch:
            return  # aborted meanwhile (its blocks were freed when the copies let go of them)
        del self.fetching[req.request_id]
        num_valid_tokens = fetch.num_valid_blocks * self.block_manager.block_size
        for source in self.fetched_tokens:
            num_blocks = fetch.num_fetched_blocks(source)
            self.num_tier_hits[source] += num_blocks > 0
            self.fetched_tokens[source] += num_blocks * self.block_manager.block_size
        req.num_computed_tokens = num_valid_tokens
        req.num_cached_tokens = num_valid_tokens
        self.block_manager.cache_computed_blocks(req)
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def _fetch(self, req: Request, num_cached: int, host_ids: list[int], parts: list[FetchPart]) -> KVFetch:
        fetch = KVFetch(req, num_cached, parts)
        req.status = RequestStatus.WAITING_FOR_KV
        self.fetching[req.request_id] = fetch
        if host_ids:
            self.tier.load(fetch, host_ids)
        return fetch

    # ---- one step ------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        kept: list[Request] = []
        running = deque(self.running)
        while running and budget > 0:
            req = running.popleft()
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not bm.allocate(req, num_new):
                # Out of blocks: preempt the newest running request (possibly this one).
                victim = running.pop() if running else req
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, num_new))
                kept.append(req)
                budget -= num_new
        kept.extend(running)  # not reached this step (budget exhausted): still running
        self.running = kept

        idx = 0  # requests whose grammar is still compiling keep their place and are passed over
        while idx < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[idx]
            if not req.ready:
                idx += 1
                continue
            resumed = bool(req.block_ids)  # back from a fetch (maybe a failed one): no lookup, its blocks are held
            cached = bm.find_cached_prefix(req) if not resumed else []
            del cached[req.max_prefix_hit_tokens // bm.block_size:]
            host = self.tier.match(req, len(cached)) if self.tier is not None and not resumed else []
            del host[max(0, req.max_prefix_hit_tokens // bm.block_size - len(cached)):]
            if host:  # more of it on the host tier: load that first, prefill after
                # Blocks for its whole prompt now: a request back from a fetch never waits for blocks (it would
                # wait at the head of the queue for blocks that other fetched requests behind it hold).
                if not bm.allocate(req, req.num_tokens - len(cached) * bm.block_size, cached):
                    break
                del self.waiting[idx]
                self.num_tier_lookups += 1
                self._fetch(req, len(cached), host, [FetchPart("host", len(cached), len(cached) + len(host))])
                continue
            remaining = req.num_tokens - req.num_computed_tokens - len(cached) * bm.block_size
            num_new = min(remaining, budget)
            if not bm.allocate(req, num_new, cached):
                break
            del self.waiting[idx]
            if not resumed:
                req.num_cached_tokens = len(cached) * bm.block_size
                self.num_tier_lookups += self.tier is not None
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, num_new))
            budget -= num_new
        return out

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        logger.debug("preempted %s", req.request_id)
