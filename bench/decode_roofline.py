"""Decode step time against the memory-bandwidth roofline, at real model shapes with random weights.

    python -m bench.decode_roofline [--models qwen3-0.6b,llama3-8b] [--batches 1,8,32,64,128,256]
                                    [--context 1024] [--steps 20] [--quick]

A decode step must read every weight once and every sequence's KV once, so its floor is
``(weight bytes + KV bytes) / copy bandwidth``, the bandwidth measured in this run (device-to-device copy,
read + written bytes). For each model and batch the engine prefills ``batch`` prompts of ``context``
tokens, then times ``steps`` decode steps with CUDA graphs and the same number eagerly (same engine, same
requests). Reported per step: wall time, forward time (CUDA events around the model call), host time
(wall - forward: scheduling, input building, sampling, output bookkeeping), and the share of the roofline
reached (roofline / wall). Weights come from ``load_format="dummy"`` (no checkpoint is written).
``--quick`` runs a tiny model in seconds, on CPU too (forward time is then host-timed).
"""
from __future__ import annotations

import argparse
import gc
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from duet.bench.report import add_record_arg, copy_bandwidth_bytes_per_s, write_results
from duet.engine import LLM, SamplingParams
from duet.engine.tools.make_tiny_model import make_tiny_model

logger = logging.getLogger(__name__)

# Real shapes (Hugging Face configs); vocab sizes are the released ones.
MODELS = {
    "qwen3-0.6b": dict(arch="qwen3", hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                       intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True),
    "llama3-8b": dict(arch="llama", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                      intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(arch="llama", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                 intermediate_size=256, tie_word_embeddings=False),
}
COLUMNS = ["model", "batch", "context", "graphs", "step_ms", "forward_ms", "host_ms", "host_pct", "roofline_ms",
           "pct_of_roofline", "weight_GB", "kv_GB", "tok_s"]


class ForwardTimer:
    """Wraps ``runner.run`` to time each model call: CUDA events on a GPU, the host clock elsewhere."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.inner = runner.run
        self.cuda = runner.device.type == "cuda"
        self.spans: list = []
        runner.run = self

    def __call__(self, step, layer_hook=None):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.inner(step, layer_hook)
            end.record()
            self.spans.append((start, end))
        else:
            t0 = time.perf_counter()
            out = self.inner(step, layer_hook)
            self.spans.append(time.perf_counter() - t0)
        return out

    def take_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            ms = [s.elapsed_time(e) for s, e in self.spans]
        else:
            ms = [1e3 * s for s in self.spans]
        self.spans = []
        return ms


def weight_bytes_per_step(llm: LLM, batch: int) -> int:
    """Bytes of weights one decode step reads: all of them, but only ``batch`` rows of an untied embedding."""
    model = llm.engine.runner.model
    total = 0
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight") and not llm.engine.model_config.tie_word_embeddings:
            total += batch * p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_step(llm: LLM, batch: int, context: int) -> int:
    mc = llm.engine.model_config
    elem = llm.engine.runner.kv_cache.element_size()
    return batch * context * mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * elem


def measure(llm: LLM, timer: ForwardTimer, batch: int, context: int, steps: int, graphs: bool) -> dict:
    """Time ``steps`` decode steps of the running batch with graphs on or off."""
    runner = llm.engine.runner
    saved = runner.graphs
    if not graphs:
        runner.graphs = None
    try:
        for _ in range(3):  # warm-up (first replays, allocator)
            llm.engine.step()
        timer.take_ms()
        walls = []
        for _ in range(steps):
            t0 = time.perf_counter()
            llm.engine.step()  # ends when the sampled tokens are on the host
            walls.append(1e3 * (time.perf_counter() - t0))
        forwards = timer.take_ms()
    finally:
        runner.graphs = saved
    step_ms, forward_ms = statistics.median(walls), statistics.median(forwards)
    return {"graphs": graphs, "step_ms": step_ms, "forward_ms": forward_ms, "host_ms": step_ms - forward_ms,
            "host_pct": 100 * (step_ms - forward_ms) / step_ms, "tok_s": 1e3 * batch / step_ms}


def run_model(name: str, batches: list[int], context: int, steps: int, device: str, copy_bw: float) -> list[dict]:
    spec = dict(MODELS[name])
    arch = spec.pop("arch")
    max_len = context + 2 * steps + 16
    model_dir = make_tiny_model(arch, Path(tempfile.mkdtemp(prefix="duet-roofline-")) / name,
                                max_position_embeddings=max(2048, 1 << max_len.bit_length()), weights=False,
                                dtype="bfloat16" if device == "cuda" else "float32", **spec)
    llm = LLM(str(model_dir), load_format="dummy", device=device, show_progress=False, max_num_seqs=max(batches),
              cuda_graph_max_batch=max(batches), max_num_batched_tokens=max(8192, max(batches)),
              max_model_len=max_len, enable_prefix_caching=False,
              gpu_memory_utilization=0.9)
    engine = llm.engine
    timer = ForwardTimer(engine.runner)
    vocab = engine.model_config.vocab_size
    rows = []
    g = torch.Generator().manual_seed(0)
    for batch in batches:
        params = SamplingParams(max_tokens=2 * (steps + 3) + 2, temperature=0, ignore_eos=True)
        ids = [f"{name}-{batch}-{i}" for i in range(batch)]
        for rid in ids:
            engine.add_request(rid, torch.randint(5, vocab, (context,), generator=g).tolist(), params)
        reqs = [engine.get_request(rid) for rid in ids]
        deadline = time.monotonic() + 600
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in reqs):  # prefill
            engine.step()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} batch {batch}: prefill did not finish in 600 s")
        weight_b = weight_bytes_per_step(llm, batch)
        kv_b = kv_bytes_per_step(llm, batch, context)
        roofline_ms = 1e3 * (weight_b + kv_b) / copy_bw
        for graphs in ([True, False] if engine.runner.graphs is not None else [False]):
            m = measure(llm, timer, batch, context, steps, graphs)
            rows.append({"model": name, "batch": batch, "context": context, **m, "roofline_ms": roofline_ms,
                         "pct_of_roofline": 100 * roofline_ms / m["step_ms"], "weight_GB": weight_b / 1e9,
                         "kv_GB": kv_b / 1e9})
            logger.info("%s", rows[-1])
        for rid in ids:
            engine.abort_request(rid)
        engine.step()
    llm.engine.close()
    del llm, engine, timer
    gc.collect()  # the timer and the runner refer to each other
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3-0.6b,llama3-8b")
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="the tiny model, batch 1,4, context 64, 5 steps")
    add_record_arg(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.quick:
        args.models, args.batches, args.context, args.steps = "tiny", "1,4", 64, 5
    batches = [int(b) for b in args.batches.split(",")]
    device = torch.device(args.device)
    copy_bw = copy_bandwidth_bytes_per_s(device)
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, batches, args.context, args.steps, args.device, copy_bw)

    def plot(ax):
        for name in dict.fromkeys(r["model"] for r in rows):
            for graphs, style in ((True, "o-"), (False, "s--")):
                sel = [r for r in rows if r["model"] == name and r["graphs"] == graphs]
                if sel:
                    ax.plot([r["batch"] for r in sel], [r["pct_of_roofline"] for r in sel], style,
                            label=f"{name} {'graphs' if graphs else 'eager'}")
        ax.axhline(70, color="black", linestyle=":", linewidth=1, label="target 70%")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decode batch")
        ax.set_ylabel("% of bandwidth roofline (roofline / step time)")
        ax.legend(fontsize=7)

    write_results("decode_roofline", rows, COLUMNS, device=device, plot=plot, record=args.record,
                  extra={"copy_GBps": copy_bw / 1e9, "steps": args.steps, "dtype": "bfloat16" if device.type == "cuda"
                         else "float32"})


if __name__ == "__main__":
    main()
