"""AsyncEngine streams incremental outputs equal to the batch API's, and aborts free everything."""
from __future__ import annotations

import asyncio

import pytest

from duet.engine import AsyncEngine, EngineConfig, LLM, SamplingParams


@pytest.fixture(scope="module")
def async_engine(llama_dir):
    engine = AsyncEngine(EngineConfig(model=llama_dir, show_progress=False, num_kv_blocks=64))
    yield engine
    engine.shutdown()


def test_stream_matches_batch_generation(async_engine, llama_dir):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    async def run(prompt, rid):
        deltas, last = [], None
        async for out in async_engine.generate(prompt, params, request_id=rid):
            deltas.extend(out.new_token_ids)
            last = out
        return deltas, last

    async def main():
        return await asyncio.gather(run("first prompt", "a"), run("a second, longer prompt", "b"))

    results = asyncio.run(main())
    ref = LLM(llama_dir, show_progress=False, num_kv_blocks=64).generate(
        ["first prompt", "a second, longer prompt"], params)
    for (deltas, last), r in zip(results, ref):
        assert deltas == last.token_ids == r.token_ids
        assert last.finished and last.text == r.text
    assert async_engine.snapshot().num_free_blocks == 64


def test_abort_mid_stream_and_bad_input(async_engine):
    async def main():
        with pytest.raises(ValueError, match="max_tokens"):
            async for _ in async_engine.generate([1, 2, 3], SamplingParams(max_tokens=10**6)):
                pass
        seen = []
        async for out in async_engine.generate([5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True),
                                               request_id="victim"):
            seen.append(out)
            if len(seen) == 3:
                await async_engine.abort("victim")
        return seen

    seen = asyncio.run(main())
    assert seen[-1].finished and seen[-1].finish_reason == "abort"
    assert len(seen[-1].token_ids) < 40
    for _ in range(100):
        if async_engine.snapshot().num_free_blocks == 64:
            break
        asyncio.run(asyncio.sleep(0.01))
    assert async_engine.snapshot().num_free_blocks == 64
