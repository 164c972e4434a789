"""Disaggregated (prefill + decode + router) vs colocated serving of the same checkpoint, in one run.

    python -m bench.pd_vs_colocated [--quick] [--kv-transport nixl|zmq]

Launches, on 127.0.0.1, a colocated server (``engine.serve --role both``, the baseline) and a prefill server,
a decode server and the router, then drives both with the same trace through ``bench.serving`` (one request
at a time, as the reference measurements in the serving issue). Reports TTFT / ITL p50 / p90 per path and the
hand-off overhead = disaggregated TTFT - prefill compute time (p50), from the router's
``duet_prefill_compute_seconds`` histogram, plus the router's own per-request ``duet_handoff_seconds`` p50.

Configurations (random weights, made now): ``tiny`` = Llama hidden 128, 2 layers; ``small`` = hidden 512,
8 layers, vocab 4096 (~28M parameters). Prompts 256 tokens, 64 output tokens.

On a GPU (``--gpu``): the Qwen3-0.6B shape in bf16 with ``--load-format dummy`` weights, every server on the
one GPU with its own KV pool (``--num-kv-blocks``), KV over NIXL (CUDA IPC), CUDA graphs for decode;
``--prompt-lens 1024,4096 --output-len 128 --concurrency 8`` is the issue's shape. Results land in
``bench/runs/<gpu>/`` (``--record``: ``bench/results/<gpu>/``).
"""
from __future__ import annotations

import argparse
import tempfile
import urllib.request
from pathlib import Path

from duet.bench.report import add_record_arg, write_results
from duet.bench.serving import Histogram, build_trace, parse_prometheus, run_benchmark
from duet.engine.launcher import ServerProcess
from duet.engine.tools.make_tiny_model import make_tiny_model
from duet.transfer.factory import nixl_importable

GPU_CONFIG = dict(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, intermediate_size=3072,
                  vocab_size=151936, tie_word_embeddings=True)  # Qwen3-0.6B
CONFIGS = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256),
    "small": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1408,
                  vocab_size=4096),
}


def _histogram_p50(url: str, name: str) -> float | None:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    h = Histogram.from_samples(parse_prometheus(text), name)
    return None if h is None else h.quantile(0.5)


def run_config(name: str, kv: str, num_requests: int, prompt_len: int, output_len: int,
               concurrency: int = 1) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="duet-bench-")) / name
    if name == "qwen3-0.6b":
        model = str(make_tiny_model("qwen3", tmp, weights=False, dtype="bfloat16",
                                    max_position_embeddings=max(2048, 2 * (prompt_len + output_len)), **GPU_CONFIG))
        flags = ("--load-format", "dummy", "--dtype", "bfloat16", "--num-kv-blocks", "4096",
                 "--max-model-len", str(prompt_len + output_len + 16), "--max-num-batched-tokens", "4096")
        threads = 4
    else:
        model = str(make_tiny_model("llama", tmp, **CONFIGS[name]))
        flags, threads = (), 2
    colocated = ServerProcess("serve", model, *flags, threads=threads)
    # The prefill server gets both cores, as the colocated one (passive OpenMP waits: decode polls meanwhile).
    prefill = ServerProcess("prefill", model, *flags, "--kv-transport", kv, threads=threads,
                            env={"OMP_WAIT_POLICY": "PASSIVE"})
    decode = ServerProcess("decode", model, *flags, "--kv-transport", kv)
    router = ServerProcess("router", model, "--prefill", prefill.address, "--decode", decode.address,
                           "--disagg-threshold-tokens", "0")
    procs = [router, prefill, decode, colocated]
    try:
        router.wait_ready(300)
        colocated.wait_ready(300)
        vocab = {"small": 4096, "qwen3-0.6b": 151000}.get(name, 500)
        trace = build_trace(num_requests, prompt_len, output_len, seed=0, vocab_size=vocab)
        disagg = run_benchmark(router.url, trace, concurrency=concurrency, label=f"{name} disaggregated ({kv})",
                               num_warmup=2, prefill_metrics="auto")
        coloc = run_benchmark(colocated.url, trace, concurrency=concurrency, label=f"{name} colocated",
                              num_warmup=2)
        router_handoff = _histogram_p50(router.url, "duet_handoff_seconds")
    finally:
        for p in procs:
            p.stop()
    rows = []
    for run in (coloc, disagg):
        s = run["summary"]
        row = {"config": name, "prompt_len": prompt_len, "path": run["label"], "ttft_p50_ms": s["ttft_p50_ms"],
               "ttft_p90_ms": s["ttft_p90_ms"],
               "itl_p50_ms": s["itl_p50_ms"], "itl_p90_ms": s["itl_p90_ms"], "out_tok_per_s": s["out_tok_per_s"],
               "errors": s["errors"]}
        if run is disagg:
            h = run.get("handoff") or {}
            row["prefill_compute_p50_ms"] = h.get("prefill_compute_p50_ms")
            row["handoff_p50_ms"] = h.get("handoff_p50_ms")
            row["router_handoff_bucket_p50_ms"] = None if router_handoff is None else router_handoff * 1e3
            row["ttft_minus_colocated_ms"] = s["ttft_p50_ms"] - coloc["summary"]["ttft_p50_ms"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny config only, 8 requests")
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--kv-transport", default="nixl" if nixl_importable() else "zmq")
    ap.add_argument("--num-requests", type=int, default=20)
    ap.add_argument("--prompt-lens", default="256", help="comma-separated prompt lengths, one run each")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--gpu", action="store_true", help="the Qwen3-0.6B shape on the local GPU (see above)")
    add_record_arg(ap)
    args = ap.parse_args(argv)
    configs = ["tiny"] if args.quick else args.configs.split(",")
    if args.gpu:
        configs = ["qwen3-0.6b"]
    n = 8 if args.quick else args.num_requests
    rows = [r for c in configs for p in map(int, args.prompt_lens.split(","))
            for r in run_config(c, args.kv_transport, n, p, args.output_len, args.concurrency)]
    columns = ["config", "prompt_len", "path", "ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms", "itl_p90_ms", "out_tok_per_s",
               "errors", "prefill_compute_p50_ms", "handoff_p50_ms", "router_handoff_bucket_p50_ms",
               "ttft_minus_colocated_ms"]

    def plot(ax):
        labels = [f"{r['config']} {r['prompt_len']}\n{'P/D' if 'disagg' in r['path'] else 'colocated'}" for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["ttft_p50_ms"] for r in rows], 0.4, label="TTFT p50 (ms)")
        ax.bar([x + 0.2 for x in xs], [r["itl_p50_ms"] for r in rows], 0.4, label="ITL p50 (ms)")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("ms")
        ax.legend()

    write_results("pd_vs_colocated", rows, columns, device="cuda" if args.gpu else "cpu",
                  extra={"kv_transport": args.kv_transport, "prompt_lens": args.prompt_lens,
                         "output_len": args.output_len, "concurrency": args.concurrency}, plot=plot,
                  record=args.record)


if __name__ == "__main__":
    main()
