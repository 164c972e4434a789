"""``LocalDispatcher``: the colocated server's ``Dispatcher``, an in-process ``AsyncEngine``.

Request path: the front end's ``GenerateRequest`` goes to ``AsyncEngine.generate`` (token ids in); each
``RequestOutput`` that comes back becomes a ``TokenDelta`` carrying only the new tokens and their logprobs.
Closing the delta iterator early closes the engine's iterator, which queues an abort for the engine thread,
so the request's KV blocks are freed. ``close()`` aborts whatever is still running, waits for those requests
to drain (bounded), then stops the engine thread.

The engine runs on its own thread and nothing here calls it directly: ``stats()`` reads the engine's
snapshot (refreshed after every step, so a value may be one step stale), ``healthy()`` its public health.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from duet.engine.async_engine import AsyncEngine
from duet.engine.metrics.server_stats import EngineStats, stats_families
from duet.engine.protocol import FinishReason, TokenDelta
from duet.engine.router.dispatcher import Dispatcher, DispatchError, GenerateRequest

logger = logging.getLogger(__name__)


class LocalDispatcher(Dispatcher):
    def __init__(self, engine: AsyncEngine, model_name: str | None = None, *, owns_engine: bool = True,
                 drain_timeout_s: float = 5.0):
        """``owns_engine``: ``close()`` shuts the engine's thread down. ``drain_timeout_s``: how long
        ``close()`` waits for aborted requests to report back."""
        self.engine = engine
        llm = engine.engine
        self.model_name = model_name or llm.config.model
        self.max_model_len = llm.max_model_len
        self.vocab_size = llm.model_config.vocab_size
        self.owns_engine = owns_engine
        self.drain_timeout_s = drain_timeout_s
        self._active: set[str] = set()
        self._closed = False

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        if self._closed:
            raise DispatchError("server is shutting down", status=503)
        if not self.healthy():
            raise DispatchError("engine is not running", status=503)
        outputs = self.engine.generate(request.prompt_token_ids, request.params, request.request_id)
        self._active.add(request.request_id)
        num_sent = 0
        try:
            while True:
                try:
                    out = await outputs.__anext__()
                except StopAsyncIteration:
                    return
                except ValueError as e:  # rejected by the engine's validation: nothing was allocated
                    if num_sent:
                        raise
                    raise DispatchError(str(e), status=400) from None
                except RuntimeError as e:  # the engine thread died
                    logger.error("request %s failed: %s", request.request_id, e)
                    if num_sent == 0:
                        raise DispatchError("engine failed", status=503) from None
                    yield TokenDelta.failure("engine failed", 503)
                    return
                new_ids = list(out.new_token_ids)
                logprobs = None
                if out.logprobs is not None:
                    start = len(out.token_ids) - len(new_ids)
                    logprobs = list(out.logprobs[start:start + len(new_ids)])
                num_sent += 1
                yield TokenDelta(
                    token_ids=new_ids,
                    logprobs=logprobs,
                    finished=out.finished,
                    finish_reason=FinishReason.of(out.finish_reason),
                    stop_reason=out.stop_reason if isinstance(out.stop_reason, int) else None,
                    num_cached_tokens=out.num_cached_tokens,
                    error=out.error,
                    prompt_logprobs=out.prompt_logprobs,
                    prompt_token_ranks=out.prompt_token_ranks,
                )
                if out.finished:
                    return
        finally:
            self._active.discard(request.request_id)
            await outputs.aclose()  # aborts the request in the engine if it had not finished

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def healthy(self) -> bool:
        return self.engine.healthy()

    def stats(self) -> dict[str, float]:
        """The engine's stats under the keys servers report (``engine.metrics.server_stats``)."""
        snap = self.engine.snapshot()
        return {
            "free_blocks": snap.num_free_blocks, "total_blocks": snap.num_total_blocks,
            "cached_blocks": snap.num_cached_blocks, "running": snap.num_running, "waiting": snap.num_waiting,
            "prefix_query_tokens": snap.prefix_cache_query_tokens, "prefix_hit_tokens": snap.prefix_cache_hit_tokens,
            "prompt_tokens_computed": snap.num_prompt_tokens_computed, "prompt_tokens_external": 0,
            "generated_tokens": snap.num_generated_tokens, "preemptions": snap.num_preemptions,
            "engine_healthy": 1.0 if self.healthy() else 0.0,
        }

    async def metrics(self) -> list:
        return stats_families(self.model_name, [EngineStats("0", "both", self.stats())])

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for request_id in list(self._active):
            await self.engine.abort(request_id)
        # Aborts queued by closed iterators are applied by the engine thread between steps: let them land
        # before stopping it, so the KV pool is whole again when close() returns.
        deadline = time.monotonic() + self.drain_timeout_s
        while (self._active or (self.owns_engine and self.engine.snapshot().num_unfinished)) and self.healthy():
            if time.monotonic() > deadline:
                logger.warning("closing with %d requests still active", len(self._active))
                break
            await asyncio.sleep(0.01)
        if self.owns_engine:
            await asyncio.to_thread(self.engine.shutdown)
