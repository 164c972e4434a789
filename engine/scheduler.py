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
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus

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
            cached = bm.find_cached_prefix(req) if req.num_computed_tokens == 0 else []
            del cached[req.max_prefix_hit_tokens // bm.block_size:]
            remaining = req.num_tokens - req.num_computed_tokens - len(cached) * bm.block_size
            num_new = min(remaining, budget)
            if not bm.allocate(req, num_new, cached):
                break
            del self.waiting[idx]
            req.num_cached_tokens = len(cached) * bm.block_size
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
