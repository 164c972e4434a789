"""vLLM engines as Duet peers: P/D through Duet's router and KV connector vs colocated, vLLM and native.

    python -m bench.vllm_peer [--quick] [--kv-transport zmq|nixl]

Launches on 127.0.0.1, for one random-weight Llama checkpoint (made now; head_dim 32 and block size 32, which
vLLM's CPU attention needs): vLLM prefill + vLLM decode + router (``--executor vllm``, KV through
``transfer.vllm_connector``), vLLM prefill + native decode + router (a mixed pair), native prefill + native
decode + router, and the two colocated baselines (``engine.serve --executor vllm`` and native). Each path
serves the same trace, one request at a time, through ``bench.serving``. Reports TTFT / ITL p50 per path and,
for the P/D paths, the KV bytes and per-layer WRITEs per request and the decode side's mean transfer time
(from the servers' stats). Exits with a message, not an error, where vLLM is not installed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.report import write_results
from bench.serving import build_trace, run_benchmark
from engine.launcher import ServerProcess, query_server
from engine.tools.make_tiny_model import make_tiny_model
from transfer.messages import StatsRequest

MODEL = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=256)
FLAGS = ("--dtype", "float32", "--block-size", "32", "--num-kv-blocks", "256", "--max-model-len", "1024")
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def _server(module: str, model: str, executor: str, *args: str) -> ServerProcess:
    if executor == "vllm":
        return ServerProcess(module, model, "--executor", "vllm", *FLAGS, *args, env=VLLM_ENV)
    return ServerProcess(module, model, *FLAGS, *args)


def _stats(proc: ServerProcess) -> dict[str, float]:
    [reply] = query_server(proc.address, [StatsRequest(1)], 1, timeout_s=30)
    return reply.values


def run_path(model: str, label: str, trace, prefill: str | None, decode: str, kv: str) -> dict:
    """One path: ``prefill`` None means colocated ``engine.serve`` with executor ``decode``."""
    procs: list[ServerProcess] = []
    try:
        if prefill is None:
            url_proc = _server("serve", model, decode)
            procs.append(url_proc)
            url_proc.wait_ready(600)
        else:
            p = _server("prefill", model, prefill, "--kv-transport", kv)
            d = _server("decode", model, decode, "--kv-transport", kv)
            procs += [p, d]
            p.wait_ready(600)
            d.wait_ready(600)
            url_proc = ServerProcess("router", model, "--prefill", p.address, "--decode", d.address,
                                     "--disagg-threshold-tokens", "0")
            procs.append(url_proc)
            url_proc.wait_ready(120)
            p0, d0 = _stats(p), _stats(d)
        run = run_benchmark(url_proc.url, trace, concurrency=1, label=label, num_warmup=2)
        s = run["summary"]
        row = {"path": label, "ttft_p50_ms": s["ttft_p50_ms"], "ttft_p90_ms": s["ttft_p90_ms"],
               "itl_p50_ms": s["itl_p50_ms"], "out_tok_per_s": s["out_tok_per_s"], "errors": s["errors"]}
        if prefill is not None:
            p1, d1 = _stats(p), _stats(d)
            n = max(1.0, d1.get("kv_transfers_received", 0) - d0.get("kv_transfers_received", 0))
            row["kv_kib_per_request"] = (d1["kv_bytes_received"] - d0["kv_bytes_received"]) / n / 1024
            if "kv_layer_sends" in p1:
                row["layer_writes_per_request"] = (p1["kv_layer_sends"] - p0["kv_layer_sends"]) / n
            row["kv_transfer_mean_ms"] = 1e3 * (d1["kv_transfer_seconds_sum"] - d0["kv_transfer_seconds_sum"]) / n
            row["kv_transfers"] = n
        return row
    finally:
        for proc in procs:
            proc.stop(30)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 requests of 128 prompt tokens")
    ap.add_argument("--kv-transport", default="zmq", choices=["zmq", "nixl"])
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=32)
    args = ap.parse_args(argv)
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vLLM is not installed (pip install -e .[vllm]): nothing to measure", file=sys.stderr)
        return
    n, prompt_len = (8, 128) if args.quick else (args.num_requests, args.prompt_len)
    model = str(make_tiny_model("llama", Path(tempfile.mkdtemp(prefix="duet-bench-")) / "llama", **MODEL))
    trace = build_trace(n, prompt_len, args.output_len, seed=0, vocab_size=500)
    kv = args.kv_transport
    rows = [
        run_path(model, "vllm colocated", trace, None, "vllm", kv),
        run_path(model, f"vllm P -> vllm D ({kv})", trace, "vllm", "vllm", kv),
        run_path(model, f"vllm P -> native D ({kv})", trace, "vllm", "native", kv),
        run_path(model, "native colocated", trace, None, "native", kv),
        run_path(model, f"native P -> native D ({kv})", trace, "native", "native", kv),
    ]
    columns = ["path", "ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms", "out_tok_per_s", "errors", "kv_kib_per_request",
               "layer_writes_per_request", "kv_transfer_mean_ms", "kv_transfers"]
    def plot(ax):
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["ttft_p50_ms"] for r in rows], 0.4, label="TTFT p50 (ms)")
        ax.bar([x + 0.2 for x in xs], [r["itl_p50_ms"] for r in rows], 0.4, label="ITL p50 (ms)")
        ax.set_xticks(list(xs), [r["path"].replace(" -> ", "\n-> ") for r in rows], fontsize=7)
        ax.set_ylabel("ms")
        ax.legend()

    write_results("vllm_peer", rows, columns, device="cpu", plot=plot,
                  extra={"model": MODEL, "prompt_len": prompt_len, "output_len": args.output_len, "concurrency": 1,
                         "kv_transport": kv})


if __name__ == "__main__":
    main()
