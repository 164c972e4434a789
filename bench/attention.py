"""Paged attention microbenchmark: Duet's Triton decode and prefill kernels against named baselines.

    python -m bench.attention [--quick] [--device cpu|cuda]

Every row is one shape, timed in this run next to its baselines:

- decode: our ``paged_decode_attention`` (split-K chosen automatically) vs torch "gather + SDPA" (gather
  each sequence's blocks from the paged cache into contiguous K/V, then
  ``scaled_dot_product_attention``). Reported as achieved GB/s (K/V bytes read + q/out bytes) and as a
  share of the device-to-device copy bandwidth measured in the same run, the roofline of a
  memory-bound kernel.
- prefill: our ``paged_prefill_attention`` over a paged prefix + new tokens vs torch SDPA on K/V that
  are already contiguous (flash backend on CUDA when there is no prefix; lower-right causal mask
  otherwise), reported in TFLOP/s of causal attention.
- vLLM's Triton ``unified_attention`` for both, only when ``vllm`` imports (absent on CPU machines).

Default shapes are the targets on CUDA: bf16, 32 query heads, 8 KV heads, head_dim 128, block 16;
decode batch 1-256 x context 1k-32k, prefill 4k-16k new tokens with and without a paged prefix.
``--quick`` runs tiny fp32 shapes, meant for CPU through the Triton interpreter, where times measure the
interpreter, not a kernel. Results land in ``bench/runs/<device>/attention.{json,md,png}`` (``--record``:
``bench/results/<device>/``).
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from duet.bench.report import add_record_arg, copy_bandwidth_bytes_per_s, time_fn, time_fn_graph, write_results
from duet.engine import envs

logger = logging.getLogger(__name__)

COLUMNS = [
    "kernel", "batch", "context", "q_len", "heads", "kv_heads", "head_dim", "block_size", "dtype", "splits",
    "ours_us", "GB/s", "TFLOP/s", "%copy_bw", "torch_us", "torch_baseline", "speedup_vs_torch", "vllm_us",
    "rel_err_vs_torch",
]
# Calls faster than this are re-timed as 20 calls in one CUDA graph: from Python, a launch and its checks
# cost ~50-90 us (measured on an H100), which would hide the kernel. Slower calls keep their eager time.
GRAPH_TIMING_BELOW_S = 300e-6
# Decode rows whose K+V would pass this many tokens are skipped: gather + SDPA needs two more copies.
MAX_DECODE_TOKENS = 1 << 21


@dataclass(frozen=True)
class Shape:
    kernel: str  # "decode" or "prefill"
    batch: int  # sequences
    context: int  # tokens per sequence in the cache, new ones included
    q_len: int  # new (query) tokens per sequence; 1 for decode
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    num_splits: int | None = None  # decode split-K; None = the kernel's automatic choice


def default_shapes() -> list[Shape]:
    common = dict(heads=32, kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16)
    shapes = [
        Shape("decode", batch, context, 1, **common)
        for batch in (1, 16, 64, 256)
        for context in (1024, 4096, 16384, 32768)
        if batch * context <= MAX_DECODE_TOKENS
    ]
    # (sequences, new tokens each, cached prefix each): 4k-16k new tokens per step.
    for batch, q_len, prefix in ((1, 4096, 0), (1, 4096, 4096), (2, 4096, 0), (2, 4096, 4096),
                                 (4, 2048, 6144), (4, 4096, 0), (1, 16384, 0)):
        shapes.append(Shape("prefill", batch, prefix + q_len, q_len, **common))
    return shapes


def quick_shapes() -> list[Shape]:
    common = dict(heads=4, kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32)
    return [
        Shape("decode", 1, 256, 1, **common),
        Shape("decode", 1, 256, 1, **common, num_splits=4),  # the split-K path the interpreter never picks
        Shape("decode", 4, 64, 1, **common),
        Shape("decode", 8, 128, 1, **common),
        Shape("prefill", 1, 64, 64, **common),
        Shape("prefill", 2, 96, 32, **common),
    ]


def make_inputs(shape: Shape, device: torch.device) -> dict:
    """Paged K/V for ``batch`` sequences of ``context`` tokens behind a shuffled block table."""
    blocks_per_seq = -(-shape.context // shape.block_size)
    num_blocks = shape.batch * blocks_per_seq
    cache_shape = (num_blocks, shape.block_size, shape.kv_heads, shape.head_dim)
    block_tables = torch.randperm(num_blocks, device=device).view(shape.batch, blocks_per_seq).to(torch.int32)
    return dict(
        query=torch.randn(shape.batch * shape.q_len, shape.heads, shape.head_dim, device=device, dtype=shape.dtype),
        k_cache=torch.randn(cache_shape, device=device, dtype=shape.dtype),
        v_cache=torch.randn(cache_shape, device=device, dtype=shape.dtype),
        block_tables=block_tables,
        seq_lens=torch.full((shape.batch,), shape.context, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.arange(0, shape.batch + 1, device=device, dtype=torch.int32) * shape.q_len,
        scale=shape.head_dim ** -0.5,
    )


def gather_contiguous(cache: torch.Tensor, block_tables: torch.Tensor, context: int) -> torch.Tensor:
    """[num_blocks, block_size, kv_heads, D] paged -> [batch, kv_heads, context, D] (one gather copy)."""
    batch = block_tables.shape[0]
    kv = cache[block_tables.long()]  # [batch, blocks_per_seq, block_size, kv_heads, D]
    return kv.view(batch, -1, cache.shape[2], cache.shape[3])[:, :context].transpose(1, 2)


def vllm_unified_attention() -> Callable | None:
    """vLLM's Triton unified-attention launcher when vLLM is installed (its module moved between releases)."""
    for module in ("vllm.v1.attention.ops.triton_unified_attention", "vllm.attention.ops.triton_unified_attention"):
        try:
            return __import__(module, fromlist=["unified_attention"]).unified_attention
        except Exception:  # noqa: BLE001 - ImportError, or vLLM failing its own import-time checks
            continue
    return None


def run_vllm(fn: Callable, shape: Shape, x: dict, out: torch.Tensor) -> None:
    fn(q=x["query"], k=x["k_cache"], v=x["v_cache"], out=out, cu_seqlens_q=x["cu_seqlens_q"],
       max_seqlen_q=shape.q_len, seqused_k=x["seq_lens"], max_seqlen_k=shape.context,
       softmax_scale=x["scale"], causal=True, window_size=(-1, -1), block_table=x["block_tables"],
       softcap=0, q_descale=None, k_descale=None, v_descale=None)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_decode(shape: Shape, device: torch.device, timer: Callable, vllm_fn: Callable | None) -> dict:
    from duet.kernels.decode_attention import choose_num_splits, paged_decode_attention
    from duet.kernels.triton_utils import num_parallel_units

    x = make_inputs(shape, device)
    out = torch.empty_like(x["query"])
    args = (x["query"], x["k_cache"], x["v_cache"], x["block_tables"], x["seq_lens"], x["scale"])
    ours_s = timer(lambda: paged_decode_attention(*args, out=out, num_splits=shape.num_splits))

    def torch_decode() -> torch.Tensor:
        k = gather_contiguous(x["k_cache"], x["block_tables"], shape.context)
        v = gather_contiguous(x["v_cache"], x["block_tables"], shape.context)
        q = x["query"].unsqueeze(2)  # [batch, heads, 1, D]
        return F.scaled_dot_product_attention(q, k, v, scale=x["scale"], enable_gqa=True).squeeze(2)

    torch_s = try_time(timer, torch_decode, "torch decode (gather+sdpa)")
    kv_bytes = 2 * shape.batch * shape.context * shape.kv_heads * shape.head_dim * x["k_cache"].element_size()
    io_bytes = 2 * x["query"].numel() * x["query"].element_size()
    splits = shape.num_splits or choose_num_splits(
        shape.batch, shape.kv_heads, x["block_tables"].shape[1] * shape.block_size, num_parallel_units(device)
    )
    row = dict(ours_s=ours_s, torch_s=torch_s, num_bytes=kv_bytes + io_bytes, flops=None, splits=splits,
               torch_baseline="gather+sdpa",
               rel_err=None if torch_s is None else relative_error(out, torch_decode()))
    if vllm_fn is not None:
        row["vllm_s"] = try_time(timer, lambda: run_vllm(vllm_fn, shape, x, torch.empty_like(out)), "vllm decode")
    return row


def bench_prefill(shape: Shape, device: torch.device, timer: Callable, vllm_fn: Callable | None) -> dict:
    from duet.kernels.prefill_attention import paged_prefill_attention

    x = make_inputs(shape, device)
    out = torch.empty_like(x["query"])
    ours_s = timer(lambda: paged_prefill_attention(
        x["query"], x["k_cache"], x["v_cache"], x["block_tables"], x["cu_seqlens_q"], x["seq_lens"],
        x["scale"], shape.q_len, out=out,
    ))

    # The baseline gets contiguous K/V expanded to every query head, prepared outside the timing.
    group = shape.heads // shape.kv_heads
    k = gather_contiguous(x["k_cache"], x["block_tables"], shape.context).repeat_interleave(group, 1).contiguous()
    v = gather_contiguous(x["v_cache"], x["block_tables"], shape.context).repeat_interleave(group, 1).contiguous()
    q = x["query"].view(shape.batch, shape.q_len, shape.heads, shape.head_dim).transpose(1, 2).contiguous()
    prefix = shape.context - shape.q_len
    if prefix == 0:
        name = "sdpa-flash" if device.type == "cuda" else "sdpa"

        def torch_prefill() -> torch.Tensor:
            if device.type == "cuda":
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=x["scale"])
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=x["scale"])
    else:
        from torch.nn.attention.bias import causal_lower_right

        name = "sdpa-causal_lower_right"
        mask = causal_lower_right(shape.q_len, shape.context)

        def torch_prefill() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=x["scale"])

    torch_s = try_time(timer, torch_prefill, f"torch prefill ({name})")
    # Causal: query i of a sequence attends prefix + i + 1 keys; QK^T and PV are 2 flops per MAC each.
    keys_per_seq = shape.q_len * (prefix + 1) + shape.q_len * (shape.q_len - 1) // 2
    flops = 4 * shape.batch * shape.heads * shape.head_dim * keys_per_seq
    rel_err = None
    if torch_s is not None:
        ref = torch_prefill().transpose(1, 2).reshape_as(out)
        rel_err = relative_error(out, ref)
    row = dict(ours_s=ours_s, torch_s=torch_s, num_bytes=None, flops=flops, splits="", torch_baseline=name,
               rel_err=rel_err)
    if vllm_fn is not None:
        row["vllm_s"] = try_time(timer, lambda: run_vllm(vllm_fn, shape, x, torch.empty_like(out)), "vllm prefill")
    return row


def try_time(timer: Callable, fn: Callable, what: str) -> float | None:
    """Time a baseline; a baseline that cannot run this shape leaves its cell empty instead of aborting."""
    try:
        return timer(fn)
    except Exception as e:  # noqa: BLE001 - any backend refusal (unsupported dtype, mask, GPU) is a skip
        logger.warning("%s skipped: %s", what, e)
        return None


def to_row(shape: Shape, m: dict, copy_bytes_per_s: float) -> dict:
    us = lambda s: None if s is None else s * 1e6  # noqa: E731
    row = dict(
        kernel=shape.kernel, batch=shape.batch, context=shape.context, q_len=shape.q_len, heads=shape.heads,
        kv_heads=shape.kv_heads, head_dim=shape.head_dim, block_size=shape.block_size,
        dtype=str(shape.dtype).replace("torch.", ""), splits=m["splits"], ours_us=us(m["ours_s"]),
        torch_us=us(m["torch_s"]), torch_baseline=m["torch_baseline"], vllm_us=us(m.get("vllm_s")),
        rel_err_vs_torch=m["rel_err"],
    )
    if m["num_bytes"] is not None:
        row["GB/s"] = m["num_bytes"] / m["ours_s"] / 1e9
        row["%copy_bw"] = 100 * m["num_bytes"] / m["ours_s"] / copy_bytes_per_s
    if m["flops"] is not None:
        row["TFLOP/s"] = m["flops"] / m["ours_s"] / 1e12
    if m["torch_s"] is not None:
        row["speedup_vs_torch"] = m["torch_s"] / m["ours_s"]
    return {k: v for k, v in row.items() if v is not None}


def plot(rows: list[dict], note: str = "") -> Callable:
    def draw(ax) -> None:
        labels = [
            f"{r['kernel'][:3]} b{r['batch']} c{r['context']}"
            + (f" q{r['q_len']}" if r["q_len"] > 1 else f" s{r['splits']}")
            for r in rows
        ]
        series = [("ours (Triton)", "ours_us"), ("torch", "torch_us"), ("vLLM Triton", "vllm_us")]
        series = [(name, key) for name, key in series if any(key in r for r in rows)]
        width = 0.8 / len(series)
        for i, (name, key) in enumerate(series):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
            ax.bar(xs, [r.get(key, 0) for r in rows], width, label=name)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("time per call (µs, log)")
        ax.legend(fontsize=8)
        if note:
            ax.text(0.01, 0.98, note, transform=ax.transAxes, va="top", fontsize=8, color="firebrick")

    return draw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny fp32 shapes (CPU interpreter smoke run)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    add_record_arg(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if device.type == "cpu":
        # Triton reads this when the kernels' @triton.jit decorators run, i.e. on first import below.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    shapes = quick_shapes() if args.quick else default_shapes()
    warmup, iters = (1, 3) if args.quick else (3, 10)
    def timer(fn):
        seconds = time_fn(fn, device, warmup=warmup, iters=iters)
        if seconds < GRAPH_TIMING_BELOW_S:  # launch overhead would show: time the GPU alone (CUDA graph)
            seconds = time_fn_graph(fn, device, iters=iters) or seconds
        return seconds

    vllm_fn = vllm_unified_attention() if device.type == "cuda" else None
    copy_bytes_per_s = copy_bandwidth_bytes_per_s(device)
    rows = []
    for shape in shapes:
        logger.info("%s", shape)
        measure = bench_decode if shape.kernel == "decode" else bench_prefill
        rows.append(to_row(shape, measure(shape, device, timer, vllm_fn), copy_bytes_per_s))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_results(
        "attention", rows, COLUMNS, device=device, record=args.record,
        plot=plot(rows, "Triton interpreter: times measure numpy emulation, not GPU kernels"
                  if envs.triton_interpret() else ""),
        extra={"copy_GB/s": copy_bytes_per_s / 1e9, "quick": args.quick,
               "triton_interpret": envs.triton_interpret(),
               "vllm_baseline": vllm_fn is not None,
               "timing": f"calls under {GRAPH_TIMING_BELOW_S * 1e6:.0f} us timed inside a CUDA graph (no launch "
                         "overhead), others eagerly with CUDA events"},
    )


if __name__ == "__main__":
    main()
