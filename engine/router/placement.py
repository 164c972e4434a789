"""Where a request goes: the router's live view of each server and the choice of decode / prefill server.

``ServerView`` is what the router knows of one server (from the handshake and its ``LoadReport`` events).
``Placement.choose`` picks a decode server (least loaded, fitting) and decides whether a prefill server
should compute the prompt: only when the prompt has at least ``min_prefill_tokens`` tokens and a prefill
server exists — short prompts are prefilled by the decode server itself (conditional disaggregation).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from engine.router.dispatcher import DispatchError, GenerateRequest

STALE_AFTER_S = 10.0


@dataclass
class ServerView:
    server_id: str
    kind: str
    zone: str | None = None
    healthy: bool = True
    waiting: int = 0
    running: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    queued_prefill_tokens: int = 0
    running_tokens: int = 0
    draining: bool = False
    last_report: float = 0.0

    def update_load(self, msg) -> None:
        self.waiting, self.running = msg.waiting + msg.waiting_for_kv, msg.running
        self.free_blocks, self.total_blocks = msg.free_blocks, msg.total_blocks
        self.queued_prefill_tokens, self.running_tokens = msg.queued_prefill_tokens, msg.running_tokens
        self.draining = msg.draining
        self.last_report = time.monotonic()

    @property
    def load(self) -> float:
        return self.running_tokens + self.queued_prefill_tokens + 64 * (self.running + self.waiting)


@dataclass
class Choice:
    decode_index: int
    prefill_index: int | None
    reason: str


class Placement:
    def __init__(self, policy: str = "least_loaded", min_prefill_tokens: int = 0):
        if policy not in ("round_robin", "least_loaded"):
            raise ValueError(f"policy must be round_robin or least_loaded, got {policy!r}")
        if min_prefill_tokens < 0:
            raise ValueError(f"min_prefill_tokens must be >= 0, got {min_prefill_tokens}")
        self.policy = policy
        self.min_prefill_tokens = min_prefill_tokens
        self._rr_decode = itertools.count()
        self._rr_prefill = itertools.count()

    def _eligible(self, views: list[ServerView], zone: str | None) -> list[int]:
        return [i for i, v in enumerate(views) if v.healthy and not v.draining and (zone is None or v.zone == zone)]

    def _pick(self, views: list[ServerView], idx: list[int], counter) -> int:
        if self.policy == "round_robin":
            return idx[next(counter) % len(idx)]
        start = next(counter)  # rotate among equally loaded servers
        return min(idx, key=lambda i: (views[i].load, (i - start) % len(views)))

    def choose(self, request: GenerateRequest, decodes: list[ServerView], prefills: list[ServerView]) -> Choice:
        d_idx = self._eligible(decodes, request.zone)
        if not d_idx:
            where = f" in zone {request.zone!r}" if request.zone else ""
            raise DispatchError(f"no healthy decode server{where}", status=503)
        d = self._pick(decodes, d_idx, self._rr_decode)
        p_idx = self._eligible(prefills, request.zone)
        if p_idx and len(request.prompt_token_ids) >= self.min_prefill_tokens:
            return Choice(d, self._pick(prefills, p_idx, self._rr_prefill), "disaggregated")
        return Choice(d, None, "local_prefill")
