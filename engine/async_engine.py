"""``AsyncEngine``: streaming generation from asyncio code.

The synchronous ``LLMEngine`` runs on one worker thread; the event loop never blocks on the model. Requests
and aborts cross to the worker through a lock-protected inbox applied between steps, and outputs come back
through per-request asyncio queues (``loop.call_soon_threadsafe``).

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
from typing import AsyncIterator, Sequence

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None):
        if engine is None and config is None:
            raise ValueError("config: AsyncEngine needs an EngineConfig or an LLMEngine")
        self._owns_engine = engine is None
        self.engine = engine or LLMEngine(config)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[tuple[str, object]] = []
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="duet-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield incremental outputs until the request finishes (or is aborted). Bad input raises ValueError."""
        if self._error is not None:
            raise RuntimeError("engine worker died") from self._error
        request_id = request_id or f"async-{next(self._ids)}"
        with self._lock:
            req = self.engine.make_request(request_id, prompt, params)  # validates; raises ValueError
            queue: asyncio.Queue = asyncio.Queue()
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
            self._inbox.append(("add", req))
            self._wake.notify()
        try:
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise RuntimeError("engine worker died") from out
                yield out
                if out.finished:
                    return
        finally:
            with self._lock:
                if self._queues.pop(request_id, None) is not None and self.engine.get_request(request_id):
                    self._inbox.append(("abort", request_id))  # consumer went away early
                    self._wake.notify()

    async def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))
            self._wake.notify()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine thread; an engine this object created is closed too (its worker processes exit)."""
        with self._lock:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout_s)
        if self._owns_engine:
            self.engine.close()

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
                for kind, item in inbox:
                    if kind == "add":
                        engine.scheduler.add(item)
                    else:
                        engine.abort_request(item)
                for out in engine.step():
                    self._deliver(out.request_id, out)
        except BaseException as e:  # deliver the failure to every waiter rather than hanging them
            logger.exception("engine worker failed")
            self._error = e
            with self._lock:
                for rid in list(self._queues):
                    self._deliver(rid, e)

    def _deliver(self, request_id: str, item) -> None:
        entry = self._queues.get(request_id)
        if entry is not None:
            loop, queue = entry
            loop.call_soon_threadsafe(queue.put_nowait, item)
