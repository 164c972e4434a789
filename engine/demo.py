"""``make demo``: Duet's main job on a tiny random checkpoint, all on 127.0.0.1.

1. Writes a tiny random Llama in Hugging Face format (weights + byte-level BPE tokenizer).
2. Starts a prefill server, a decode server (KV over NIXL, or ZeroMQ without it), the OpenAI router, and a
   colocated server (``engine.serve --role both``) as the baseline.
3. Sends a completion, a chat and a streamed request through the router with the ``openai`` client.
4. Prints a small TTFT / inter-token latency table, disaggregated vs colocated, and the decode server's
   proof that the KV came over the wire.
5. Shuts everything down.

The weights are random, so the text is gibberish; what the demo shows is the whole path working.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import openai

from duet.engine.launcher import ServerProcess, query_server
from duet.engine.tools.make_tiny_model import make_tiny_model
from duet.transfer.factory import nixl_importable
from duet.engine.protocol import StatsRequest


def stream_timings(client: openai.OpenAI, prompt: str, max_tokens: int) -> tuple[float, list[float], str]:
    start = time.perf_counter()
    arrivals, text = [], ""
    for chunk in client.completions.create(model="duet-demo", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True}):
        if chunk.choices:
            arrivals.append(time.perf_counter())
            text += chunk.choices[0].text
    ttft = arrivals[0] - start
    return ttft, [b - a for a, b in zip(arrivals, arrivals[1:])], text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model directory (default: a tiny random llama made now)")
    ap.add_argument("--requests", type=int, default=5)
    args = ap.parse_args(argv)
    model = args.model or str(make_tiny_model("llama", Path(tempfile.mkdtemp(prefix="duet-demo-")) / "llama",
                                              hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2))
    print(f"model: {model}")
    kv = "nixl" if nixl_importable() else "zmq"
    common = ("--served-model-name", "duet-demo")
    prefill = ServerProcess("prefill", model, "--kv-transport", kv, *common)
    decode = ServerProcess("decode", model, "--kv-transport", kv, *common)
    router = ServerProcess("router", model, "--prefill", prefill.address, "--decode", decode.address,
                           "--disagg-threshold-tokens", "0", *common)
    colocated = ServerProcess("serve", model, *common)
    procs = [router, prefill, decode, colocated]
    try:
        router.wait_ready()
        colocated.wait_ready()
        print(f"prefill {prefill.address} -> decode {decode.address} (KV over {kv}); router {router.url}; "
              f"colocated {colocated.url}\n")
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="demo")
        done = client.completions.create(model="duet-demo", prompt="The capital of France is", max_tokens=16,
                                         temperature=0.8, seed=1)
        print(f"completion: {done.choices[0].text!r}  ({done.usage.completion_tokens} tokens)")
        chat = client.chat.completions.create(model="duet-demo", max_tokens=16, temperature=0,
                                              messages=[{"role": "user", "content": "Say hello to Duet."}])
        print(f"chat:       {chat.choices[0].message.content!r}")
        print("streaming:  ", end="")
        for chunk in client.completions.create(model="duet-demo", prompt="Once upon a time", max_tokens=16,
                                               temperature=0, stream=True):
            print(repr(chunk.choices[0].text) if chunk.choices else "", end=" ", flush=True)
        print("\n")

        prompt = "Disaggregated serving moves the KV cache from prefill to decode. " * 3
        rows = []
        for label, url in (("disaggregated", router.url), ("colocated", colocated.url)):
            c = openai.OpenAI(base_url=url + "/v1", api_key="demo")
            stream_timings(c, prompt, 4)  # warm-up
            ttfts, itls, texts = [], [], set()
            for _ in range(args.requests):
                ttft, gaps, text = stream_timings(c, prompt, 24)
                ttfts.append(ttft)
                itls.extend(gaps)
                texts.add(text)
            rows.append((label, statistics.median(ttfts) * 1e3, statistics.median(itls) * 1e3, texts))
        print(f"{'path':<15}{'TTFT p50 ms':>13}{'ITL p50 ms':>12}")
        for label, ttft, itl, _ in rows:
            print(f"{label:<15}{ttft:>13.1f}{itl:>12.1f}")
        same = rows[0][3] == rows[1][3]
        print(f"greedy text identical on both paths: {same}")
        [stats] = query_server(decode.address, [StatsRequest(1)], 1)
        v = stats.values
        print(f"decode server: {v.kv_transfers_received} KV transfers, {v.kv_bytes_received} bytes received, "
              f"{v.prompt_tokens_computed} prompt tokens computed locally, {v.free_blocks}/{v.total_blocks} KV blocks "
              "free")
        if not same:
            raise SystemExit("disaggregated and colocated outputs differ")
    finally:
        for p in procs:
            p.stop()
        print("all servers stopped")


if __name__ == "__main__":
    main()
