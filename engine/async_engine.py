"""``AsyncEngine``: streaming generation from asyncio code.

Threading contract. ``LLMEngine`` is single-threaded: every call into it (``make_request``, ``add_request``,
``abort_request``, ``step``, reading its queues) happens on this object's one worker thread, never on the
event loop. The loop only puts commands in a lock-protected inbox (applied by the worker between steps) and
reads what the worker publishes: per-request asyncio queues of outputs (``loop.call_soon_threadsafe``) and an
``EngineSnapshot`` refreshed after every step. Bad input is found by the worker and raised from the first
``__anext__`` of ``generate`` as ``ValueError``.

    engine = AsyncEngine(EngineConfig(model=dir))
    async for out in engine.generate("Hello", SamplingParams(max_tokens=8), request_id="r1"):
        print(out.new_text, end="")
    await engine.abort("r2")
    engine.shutdown()
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from duet.engine.config import EngineConfig
from duet.engine.llm_engine import LLMEngine
from duet.engine.outputs import RequestOutput
from duet.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's gauges and counters after the latest step (read from any thread)."""

    num_total_blocks: int = 0
    num_free_blocks: int = 0
    num_cached_blocks: int = 0
    num_running: int = 0
    num_waiting: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_query_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    num_preemptions: int = 0
    num_unfinished: int = 0
    num_prompt_tokens_computed: int = 0
    num_generated_tokens: int = 0


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None):
        """``engine``: an engine to drive (this object then owns its thread: call nothing on it meanwhile)."""
        if engine is None and config is None:
            raise ValueError("config: AsyncEngine needs an EngineConfig or an LLMEngine")
        self._owns_engine = engine is None
        self.engine = engine or LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        """Immutable after construction: safe to use from the loop."""
        self.max_model_len = self.engine.max_model_len
        self.default_sampling = dict(self.engine.default_sampling)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[tuple] = []
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._error: BaseException | None = None
        self._snapshot = self._take_snapshot()
        self._thread = threading.Thread(target=self._run, name="duet-engine", daemon=True)
        self._thread.start()

    # ---- the event loop's side ----------------------------------------------------------------------
    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield incremental outputs until the request finishes (or is aborted). Bad input raises ValueError."""
        if self._error is not None:
            raise RuntimeError("engine worker died") from self._error
        request_id = request_id or f"async-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._queues:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
            self._inbox.append(("add", request_id, prompt, params))
            self._wake.notify()
        finished = False
        try:
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    if isinstance(out, ValueError):
                        raise out
                    raise RuntimeError("engine worker died") from out
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._queues.pop(request_id, None)
                if not finished:  # the consumer went away early (or the request was refused): nothing leaks
                    self._inbox.append(("abort", request_id))
                    self._wake.notify()

    async def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))
            self._wake.notify()

    def healthy(self) -> bool:
        """The worker thread runs and has not failed."""
        return self._error is None and self._thread.is_alive()

    def snapshot(self) -> EngineSnapshot:
        """The engine's state after the latest step."""
        return self._snapshot

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine thread; an engine this object created is closed too (its worker processes exit)."""
        with self._lock:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout_s)
        if self._owns_engine:
            self.engine.close()

    # ---- the worker thread: the only caller of the engine ----------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._lock:
                    while not self._stopped and not self._inbox and not engine.has_unfinished_requests():
                        self._wake.wait(timeout=1.0)
                    if self._stopped:
                        return
                    inbox, self._inbox = self._inbox, []
                for command in inbox:
                    self._apply(command)
                outputs = engine.step()
                self._snapshot = self._take_snapshot()  # before delivering: a reader of the last output sees it
                for out in outputs:
                    self._deliver(out.request_id, out)
        except BaseException as e:  # deliver the failure to every waiter rather than hanging them
            logger.exception("engine worker failed")
            self._error = e
            with self._lock:
                for rid in list(self._queues):
                    self._deliver(rid, e)

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt, params = command
            try:
                self.engine.add_request(request_id, prompt, params)
            except ValueError as e:  # refused before anything was allocated
                self._deliver(request_id, e)
        else:
            self.engine.abort_request(command[1])

    def _take_snapshot(self) -> EngineSnapshot:
        e, bm, s = self.engine, self.engine.block_manager, self.engine.scheduler
        return EngineSnapshot(
            num_total_blocks=bm.num_blocks, num_free_blocks=bm.num_free_blocks, num_cached_blocks=bm.num_cached_blocks,
            num_running=len(s.running), num_waiting=len(s.waiting), prefix_cache_queries=bm.stats.queries,
            prefix_cache_query_tokens=bm.stats.query_tokens, prefix_cache_hit_tokens=bm.stats.hit_tokens,
            num_preemptions=s.num_preemptions, num_unfinished=int(e.has_unfinished_requests()),
            num_prompt_tokens_computed=e.num_prompt_tokens_computed, num_generated_tokens=e.num_generated_tokens)

    def _deliver(self, request_id: str, item) -> None:
        entry = self._queues.get(request_id)
        if entry is not None:
            loop, queue = entry
            loop.call_soon_threadsafe(queue.put_nowait, item)
