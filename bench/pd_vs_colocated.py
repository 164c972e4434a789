"""Disaggregated (prefill + decode + router) vs colocated serving of the same checkpoint, in one run.

    python -m bench.pd_vs_colocated [--quick] [--kv-transport nixl|zmq]

Launches, on 127.0.0.1, a colocated server (``engine.serve --role both``, the baseline) and a prefill server,
a decode server and the router, then drives both with the same trace through ``bench.serving`` (one request
at a time, as the reference measurements in the serving issue). Reports TTFT / ITL p50 / p90 per path and the
hand-off overhead = disaggregated TTFT - prefill compute time (p50), from the router's
``duet_prefill_compute_seconds`` histogram, plus the router's own per-request ``duet_handoff_seconds`` p50.

Configurations (random weights, made now): ``tiny`` = Llama hidden 128, 2 layers; ``small`` = hidden 512,
8 layers, vocab 4096 (~28M parameters). Prompts 256 tokens, 64 output tokens.
"""
from __future__ import annotations

import argparse
import tempfile
import urllib.request
from pathlib import Path

from bench.report import write_results
from bench.serving import Histogram, build_trace, parse_prometheus, run_benchmark
from engine.launcher import ServerProcess
from engine.tools.make_tiny_model import make_tiny_model
from transfer.factory import nixl_importable

CONFIGS = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256),
    "small": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1408,
                  vocab_size=4096),
}


def _histogram_p50(url: str, name: str) -> float | None:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    h = Histogram.from_samples(parse_prometheus(text), name)
    return None if h is None else h.quantile(0.5)


def run_config(name: str, kv: str, num_requests: int, prompt_len: int, output_len: int) -> list[dict]:
    model = str(make_tiny_model("llama", Path(tempfile.mkdtemp(prefix="duet-bench-")) / name, **CONFIGS[name]))
    colocated = ServerProcess("serve", model, threads=2)
    # The prefill server gets both cores, as the colocated one (passive OpenMP waits: decode polls meanwhile).
    prefill = ServerProcess("prefill", model, "--kv-transport", kv, threads=2, env={"OMP_WAIT_POLICY": "PASSIVE"})
    decode = ServerProcess("decode", model, "--kv-transport", kv)
    router = ServerProcess("router", model, "--prefill", prefill.address, "--decode", decode.address,
                           "--disagg-threshold-tokens", "0")
    procs = [router, prefill, decode, colocated]
    try:
        router.wait_ready()
        colocated.wait_ready()
        vocab = 4096 if name == "small" else 500
        trace = build_trace(num_requests, prompt_len, output_len, seed=0, vocab_size=vocab)
        disagg = run_benchmark(router.url, trace, concurrency=1, label=f"{name} disaggregated ({kv})",
                               num_warmup=2, prefill_metrics="auto")
        coloc = run_benchmark(colocated.url, trace, concurrency=1, label=f"{name} colocated", num_warmup=2)
        router_handoff = _histogram_p50(router.url, "duet_handoff_seconds")
    finally:
        for p in procs:
            p.stop()
    rows = []
    for run in (coloc, disagg):
        s = run["summary"]
        row = {"config": name, "path": run["label"], "ttft_p50_ms": s["ttft_p50_ms"], "ttft_p90_ms": s["ttft_p90_ms"],
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
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args(argv)
    configs = ["tiny"] if args.quick else args.configs.split(",")
    n = 8 if args.quick else args.num_requests
    rows = [r for c in configs for r in run_config(c, args.kv_transport, n, args.prompt_len, args.output_len)]
    columns = ["config", "path", "ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms", "itl_p90_ms", "out_tok_per_s",
               "errors", "prefill_compute_p50_ms", "handoff_p50_ms", "router_handoff_bucket_p50_ms",
               "ttft_minus_colocated_ms"]

    def plot(ax):
        labels = [f"{r['config']}\n{'P/D' if 'disagg' in r['path'] else 'colocated'}" for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["ttft_p50_ms"] for r in rows], 0.4, label="TTFT p50 (ms)")
        ax.bar([x + 0.2 for x in xs], [r["itl_p50_ms"] for r in rows], 0.4, label="ITL p50 (ms)")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("ms")
        ax.legend()

    write_results("pd_vs_colocated", rows, columns, device="cpu",
                  extra={"kv_transport": args.kv_transport, "prompt_len": args.prompt_len,
                         "output_len": args.output_len, "concurrency": 1}, plot=plot)


if __name__ == "__main__":
    main()
