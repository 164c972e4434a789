"""The contract between the HTTP front end and whatever generates tokens behind it.

The OpenAI front end (``engine.router.app``) tokenizes, validates, detokenizes and applies stop strings; it
hands a ``GenerateRequest`` (token ids in, token ids out) to a ``Dispatcher`` and consumes ``TokenDelta``s.
Two implementations:

- ``engine.router.local_dispatcher.LocalDispatcher``: an in-process ``AsyncEngine`` (``engine.serve --role
  both``: the colocated server, baseline of every disaggregated comparison);
- ``engine.router.cluster.ClusterDispatcher``: ZeroMQ clients of prefill and decode server processes
  (``engine.router``), which picks servers and runs the disaggregated flow.

All methods are called from the front end's asyncio event loop and must not block it.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import AsyncIterator

from duet.engine.protocol import TokenDelta
from duet.engine.sampling_params import SamplingParams

__all__ = ["DispatchError", "Dispatcher", "GenerateRequest", "TokenDelta"]


@dataclass
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    """Sampling parameters; ``stop`` strings are the front end's job and arrive here empty."""
    zone: str | None = None
    """Data-locality zone the request must stay in (``X-Duet-Zone``), or None."""
    queued_s: float = 0.0
    """Seconds the request waited in the dispatcher's admission queue before it was first sent to a server;
    set by the dispatcher before its first delta (0 where there is no admission queue). The front end's
    ``vllm:request_queue_time_seconds``."""


class DispatchError(Exception):
    """A request that cannot be placed; ``status`` is the HTTP status to return (400, 429, 503). ``retryable``:
    the failure says nothing about the request (the server was draining, say), so another server may take it."""

    def __init__(self, message: str, status: int = 503, retry_after_s: float | None = None, retryable: bool = False,
                 param: str | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.retryable = retryable
        self.param = param
        """The request field or header at fault (400s)."""


class Dispatcher(abc.ABC):
    """Generates tokens for requests. One instance per front end, used from its event loop."""

    model_name: str
    max_model_len: int
    vocab_size: int

    async def start(self) -> None:
        """Connect / warm up. Called once before the first request."""

    async def close(self) -> None:
        """Release everything; in-flight requests end with finish_reason ``abort``."""

    @abc.abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Stream deltas until one with ``finished=True``. Raises ``DispatchError`` before the first delta
        if the request cannot be placed. Closing the iterator early (client went away) aborts the request
        everywhere it runs."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Abort a running request (no-op if unknown)."""

    @abc.abstractmethod
    def healthy(self) -> bool:
        """At least one backend can serve requests (``GET /health`` returns 503 otherwise)."""

    async def trace(self, request_id: str) -> dict[str, dict[str, float]]:
        """Stage timestamps (unix seconds) of one request, by component (``router``, server addresses);
        empty when unknown. Served by ``GET /debug/requests/{id}`` when the front end enables it."""
        return {}

    async def metrics(self) -> list:
        """Backend families for ``GET /metrics`` (``prometheus_client`` ``Metric``s, e.g. from
        ``engine.metrics.server_stats.stats_families``), served after the front end's own. Their names must not
        repeat the front end's (``engine.metrics.request_metrics``, ``http_*``, ``duet_requests_running``)."""
        return []
