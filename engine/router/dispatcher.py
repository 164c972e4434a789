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
from dataclasses import dataclass, field
from typing import AsyncIterator

from engine.sampling_params import SamplingParams


@dataclass
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    """Sampling parameters; ``stop`` strings are the front end's job and arrive here empty."""
    zone: str | None = None
    """Data-locality zone the request must stay in (``X-Duet-Zone``), or None."""


@dataclass
class TokenDelta:
    """New tokens of one request since the previous delta."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    """One entry per new token (sampled token + top-N alternatives -> logprob), when requested."""
    finished: bool = False
    finish_reason: str | None = None
    """``stop``, ``length``, ``abort`` or ``error``."""
    stop_reason: int | None = None
    num_cached_tokens: int = 0
    """Prompt tokens that were served from a prefix cache (usage.prompt_tokens_details.cached_tokens)."""
    error: str | None = None
    """Set with finish_reason ``error``: what went wrong, safe to show to the client."""
    status: int = 500
    """HTTP status for an error that happens before the first token (e.g. 429, 503)."""
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """Once (first delta after the prompt was scored) when ``params.prompt_logprobs`` is set: per prompt position
    the prompt token then its top alternatives -> logprob; position 0 (no context) is None."""
    prompt_token_ranks: list[int | None] | None = None
    """With ``prompt_logprobs``: rank of each prompt token in its position's distribution (1 = most likely)."""


class DispatchError(Exception):
    """A request that cannot be placed; ``status`` is the HTTP status to return (400, 429, 503)."""

    def __init__(self, message: str, status: int = 503, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


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

    async def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """Backend samples for ``GET /metrics``: (name, labels, value). Names start with ``duet_``."""
        return []
