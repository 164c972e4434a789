"""``make demo``: generate a tiny random checkpoint, then run Duet's main job on it.

Offline batched generation through the embedding API, then the same prompts streamed through AsyncEngine.
The weights are random, so the text is gibberish; what the demo shows is the whole path working: HF-format
checkpoint, tokenizer, paged KV engine, sampling, streaming.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from pathlib import Path

from engine import LLM, AsyncEngine, SamplingParams
from engine.tools.make_tiny_model import make_tiny_model

PROMPTS = [
    "The capital of France is",
    "Write a haiku about paged attention:",
    "café naïve 東京 🙂",
    "1, 2, 3, 4,",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory (default: a tiny random llama made now)")
    parser.add_argument("--arch", default="llama", help="architecture of the generated tiny model")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    model = args.model
    if model is None:
        model = str(make_tiny_model(args.arch, Path(tempfile.mkdtemp(prefix="duet-demo-")) / args.arch))
        print(f"made a tiny random {args.arch} checkpoint at {model}")

    llm = LLM(model)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, seed=0)
    t0 = time.perf_counter()
    outputs = llm.generate(PROMPTS, params)
    elapsed = time.perf_counter() - t0
    for out in outputs:
        print(f"\n> {llm.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=True)!r}")
        print(f"  {out.text!r}  [{len(out.token_ids)} tokens, finish={out.finish_reason}]")
    total = sum(len(o.token_ids) for o in outputs)
    print(f"\nbatched generation: {total} tokens in {elapsed:.2f}s ({total / elapsed:.0f} tok/s)")

    async def stream() -> None:
        engine = AsyncEngine(engine=llm.engine)
        try:
            print("\nstreaming:", end=" ")
            async for out in engine.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0)):
                print(repr(out.new_text), end=" ", flush=True)
            print()
        finally:
            engine.shutdown()

    asyncio.run(stream())
    print(f"KV blocks free after the run: {llm.engine.num_free_blocks}/{llm.engine.num_total_blocks}")


if __name__ == "__main__":
    main()
