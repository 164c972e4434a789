"""CPU paged attention microbenchmark: the compiled ops of ``kernels.cpu_attention`` against torch baselines.

    python -m bench.cpu_attention [--quick] [--threads N] [--out-name cpu_attention]

Rows are shapes at the 28M benchmark model's attention (8 query heads, 4 KV heads, head_dim 64, fp32) plus a
Llama-3-8B-like one (32 / 8 / 128, bf16), each timed in this run next to its baselines:

- decode: ``paged_decode_attention`` vs ``reference.batched_paged_decode_attention`` (gather every
  sequence's blocks into a padded batch, two batched matmuls: the torch path the engine ran before), in GB/s
  of K/V read. Block tables are shuffled, so blocks are scattered as in a long-running server.
- prefill: ``paged_prefill_attention`` (causal, all tokens new, or a cached prefix) vs ``reference.paged_attention``
  (full score matrix per sequence) and torch SDPA on K/V that are already contiguous (no paging, is_causal),
  in GFLOP/s of causal attention.

Results: ``bench/results/cpu/<out-name>.{json,md,png}``, with the kernels' instruction set and thread count.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from duet.bench.report import time_fn, write_results
from duet.kernels import cpu_attention, reference

COLUMNS = ["kernel", "batch", "context", "q_len", "heads", "kv_heads", "head_dim", "block_size", "dtype", "ours_ms",
           "GB/s", "GFLOP/s", "torch_ms", "torch_baseline", "speedup", "sdpa_ms", "rel_err"]


@dataclass(frozen=True)
class Shape:
    kernel: str  # "decode" or "prefill"
    batch: int
    context: int  # tokens per sequence in the cache, new ones included
    q_len: int
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype


def shapes(quick: bool) -> list[Shape]:
    small = dict(heads=8, kv_heads=4, head_dim=64, block_size=16, dtype=torch.float32)
    big = dict(heads=32, kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16)
    if quick:
        return [Shape("decode", 8, 300, 1, **small), Shape("prefill", 1, 512, 512, **small)]
    out = [Shape("decode", b, c, 1, **small) for b, c in ((1, 2048), (8, 300), (16, 300), (64, 300), (64, 1024))]
    out += [Shape("decode", b, 1024, 1, **big) for b in (1, 16)]
    out += [Shape("prefill", 1, n, n, **small) for n in (128, 512, 2048)]
    out += [Shape("prefill", 4, 1024, 512, **small), Shape("prefill", 1, 2048, 2048, **big)]
    return out


def make_inputs(s: Shape, gen: torch.Generator):
    blocks_per_seq = -(-s.context // s.block_size)
    num_blocks = s.batch * blocks_per_seq + 8
    k = torch.randn(num_blocks, s.block_size, s.kv_heads, s.head_dim, generator=gen).to(s.dtype)
    v = torch.randn(num_blocks, s.block_size, s.kv_heads, s.head_dim, generator=gen).to(s.dtype)
    tables = torch.randperm(num_blocks, generator=gen)[:s.batch * blocks_per_seq].view(s.batch, -1).to(torch.int32)
    seq_lens = torch.full((s.batch,), s.context, dtype=torch.int32)
    query = torch.randn(s.batch * s.q_len, s.heads, s.head_dim, generator=gen).to(s.dtype)
    cu = torch.arange(0, s.batch * s.q_len + 1, s.q_len, dtype=torch.int32)
    return query, k, v, tables, seq_lens, cu


def bench_shape(s: Shape) -> dict:
    query, k, v, tables, seq_lens, cu = make_inputs(s, torch.Generator().manual_seed(0))
    scale = s.head_dim ** -0.5
    cpu = torch.device("cpu")
    row = {"kernel": s.kernel, "batch": s.batch, "context": s.context, "q_len": s.q_len, "heads": s.heads,
           "kv_heads": s.kv_heads, "head_dim": s.head_dim, "block_size": s.block_size,
           "dtype": str(s.dtype).removeprefix("torch.")}
    if s.kernel == "decode":
        ours = lambda: cpu_attention.paged_decode_attention(query, k, v, tables, seq_lens, scale)  # noqa: E731
        base = lambda: reference.batched_paged_decode_attention(query, k, v, tables, seq_lens, scale)  # noqa: E731
        row["torch_baseline"] = "gather + batched matmul"
        kv_bytes = 2 * s.batch * s.context * s.kv_heads * s.head_dim * k.element_size()
    else:
        ours = lambda: cpu_attention.paged_prefill_attention(query, k, v, tables, cu, seq_lens, scale)  # noqa: E731
        base = lambda: reference.paged_attention(query, k, v, tables, cu, seq_lens, scale)  # noqa: E731
        row["torch_baseline"] = "reference (full scores)"
    ours_s = time_fn(ours, cpu, warmup=2, iters=7)
    base_s = time_fn(base, cpu, warmup=1, iters=3)
    row.update(ours_ms=1e3 * ours_s, torch_ms=1e3 * base_s, speedup=base_s / ours_s)
    out, ref = ours().float(), base().float()
    row["rel_err"] = ((out - ref).norm() / ref.norm()).item()
    if s.kernel == "decode":
        row["GB/s"] = kv_bytes / ours_s / 1e9
    else:
        # Causal attention FLOPs: QK^T and PV over the visible keys (prefix + the lower triangle).
        prefix = s.context - s.q_len
        visible = s.q_len * prefix + s.q_len * (s.q_len + 1) / 2
        row["GFLOP/s"] = 4 * s.batch * s.heads * s.head_dim * visible / ours_s / 1e9
        if prefix == 0:  # contiguous K/V, no paging: what SDPA needs
            group = s.heads // s.kv_heads
            kc = k[tables.long()].flatten(1, 2)[:, :s.context].transpose(1, 2).repeat_interleave(group, 1)
            vc = v[tables.long()].flatten(1, 2)[:, :s.context].transpose(1, 2).repeat_interleave(group, 1)
            qc = query.view(s.batch, s.q_len, s.heads, s.head_dim).transpose(1, 2)
            row["sdpa_ms"] = 1e3 * time_fn(lambda: F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale),
                                           cpu, warmup=1, iters=3)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out-name", default="cpu_attention")
    ap.add_argument("--results-dir", help="write <dir>/cpu/<out-name>.* instead of bench/results/cpu/ (exploratory runs)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [bench_shape(s) for s in shapes(args.quick)]

    def plot(ax) -> None:
        xs = range(len(rows))
        ax.bar(list(xs), [r["speedup"] for r in rows])
        ax.set_yscale("log")
        ax.set_xticks(list(xs), [f"{r['kernel']}\nb{r['batch']} ctx{r['context']}\n{r['dtype']} d{r['head_dim']}"
                                 for r in rows], fontsize=6)
        ax.set_ylabel("speed-up over the torch baseline (log)")

    if args.results_dir:
        from duet.bench import report

        report.RESULTS_ROOT = Path(args.results_dir)
    write_results(args.out_name, rows, COLUMNS, device="cpu", plot=plot,
                  extra={"isa": cpu_attention.isa(), "threads": args.threads, "quick": args.quick})


if __name__ == "__main__":
    main()
