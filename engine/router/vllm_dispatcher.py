"""``VllmDispatcher``: the colocated server's ``Dispatcher`` over an in-process vLLM engine (``--executor vllm``).

``engine.serve --role both --executor vllm`` serves Duet's OpenAI front end (tokenization, chat template,
stop strings, detokenization) in front of vLLM's ``AsyncLLM``: the vLLM baseline of the disaggregated
comparisons, with the same HTTP surface as the native colocated server. Outputs arrive on the engine's
thread and are handed to each request's asyncio queue on the front end's loop; closing a request's delta
iterator early aborts it inside vLLM.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from duet.engine.config import EngineConfig
from duet.engine.metrics.server_stats import EngineStats, stats_families
from duet.engine.protocol import Tokens
from duet.engine.router.dispatcher import Dispatcher, DispatchError, GenerateRequest, TokenDelta
from duet.engine.server.vllm_engine import VllmEngine, engine_args

logger = logging.getLogger(__name__)


class VllmDispatcher(Dispatcher):
    def __init__(self, config: EngineConfig, model_name: str | None = None):
        self.model_name = model_name or config.model
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.engine = VllmEngine(engine_args(config), self._on_output)
        self.max_model_len = self.engine.max_model_len
        self.vocab_size = self.engine.vocab_size

    def _on_output(self, out: Tokens) -> None:  # engine thread
        entry = self._queues.get(out.request_id)
        if entry is not None:
            loop, q = entry
            loop.call_soon_threadsafe(q.put_nowait, out)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        if not self.healthy():
            raise DispatchError("engine is not running", status=503)
        rid = request.request_id
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = (asyncio.get_running_loop(), q)
        self.engine.submit(rid, request.prompt_token_ids, request.params)
        finished, num_sent = False, 0
        try:
            while not finished:
                out: Tokens = await q.get()
                delta = out.delta
                finished = delta.finished
                if delta.error is not None and num_sent == 0:
                    raise DispatchError(delta.error, status=delta.status)
                num_sent += 1
                yield delta
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self.engine.abort(rid)

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def healthy(self) -> bool:
        return self.engine.healthy()

    def stats(self) -> dict[str, float]:
        """The engine's stats under the keys servers report (``engine.metrics.server_stats``)."""
        load, total = self.engine.load, self.engine.num_total_blocks
        return {
            "free_blocks": round(total * (1.0 - load.kv_cache_usage)), "total_blocks": total,
            "running": load.running, "waiting": load.waiting, "prefix_query_tokens": load.prefix_query_tokens,
            "prefix_hit_tokens": load.prompt_tokens_local_hit, "prompt_tokens_computed": load.prompt_tokens_computed,
            "generated_tokens": load.generated_tokens, "preemptions": load.preemptions,
            "engine_healthy": 1.0 if self.healthy() else 0.0,
        }

    async def metrics(self) -> list:
        return stats_families(self.model_name, [EngineStats("0", "both", self.stats())])

    async def close(self) -> None:
        for rid in list(self._queues):
            self.engine.abort(rid)
        await asyncio.to_thread(self.engine.shutdown)
