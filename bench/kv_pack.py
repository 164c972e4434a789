"""KV pack / unpack microbenchmark: duet::gather_kv_blocks / scatter_kv_blocks against named baselines.

    python -m bench.kv_pack [--quick] [--device cpu|cuda]

Each shape is a request's blocks (a shuffled subset of a pool four times larger) over a layer range.
For gather (pack into one staging slab) and scatter (unpack it into the pool), three implementations are
timed in the same run:

- ``duet``: the compiled op (all layers of the range in one call / one CUDA launch); when the extension
  is not built this is the torch reference fallback and the row says so.
- ``index_select``: one ``torch.index_select`` (gather) / ``index_copy_`` (scatter) per layer tensor.
- ``per-block copy``: one Python-level ``copy_`` per (layer, K/V, block), the naive path a transfer
  layer ends up with when it handles blocks one by one.

GB/s counts bytes read plus bytes written (2 x the staging size), like the device-to-device copy
bandwidth measured in this run (``copy_GB/s``), so ``%copy_bw`` is the share of that roofline.
Default shapes (for CUDA): Llama-3-8B (32 layers, 8 KV heads, head_dim 128, bf16, 16-token blocks,
256 blocks = a 4k-token prompt) with all layers in one launch and with one layer (the layer-wise streaming
step), and a Llama-3-70B TP-8 shard (80 layers, 1 KV head per GPU: 4 KiB chunks). ``--quick`` runs small
shapes on CPU in seconds. Results land in ``bench/runs/<device>/kv_pack.{json,md,png}`` (``--record``:
``bench/results/<device>/``).
"""
from __future__ import annotations

import argparse
import textwrap
from dataclasses import dataclass
from typing import Callable

import torch

from duet.bench.report import add_record_arg, copy_bandwidth_bytes_per_s, time_fn, write_results
from duet.kernels import kv_blocks, reference

COLUMNS = [
    "model", "layers", "blocks", "block_size", "kv_heads", "head_dim", "dtype", "op", "impl", "time_us",
    "GB/s", "%copy_bw", "x_duet_time",
]
IMPLS = ("duet", "index_select", "per-block copy")
POOL_FACTOR = 4  # pool blocks per selected block: the request's blocks are scattered through the pool


@dataclass(frozen=True)
class Shape:
    model: str
    num_layers: int  # layers in the range packed by one call (the pool has exactly these)
    num_ids: int  # blocks of the request
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


def default_shapes() -> list[Shape]:
    return [
        Shape("llama3-8b", 32, 256, 16, 8, 128, torch.bfloat16),
        Shape("llama3-8b 1 layer", 1, 256, 16, 8, 128, torch.bfloat16),
        Shape("llama3-70b tp8", 80, 256, 16, 1, 128, torch.bfloat16),
    ]


def quick_shapes() -> list[Shape]:
    return [
        Shape("llama3-8b-like", 4, 64, 16, 8, 128, torch.bfloat16),
        Shape("llama3-8b-like 1 layer", 1, 64, 16, 8, 128, torch.bfloat16),
        Shape("small heads", 8, 64, 16, 1, 64, torch.float32),
    ]


def gather_fns(kv_cache, ids, out) -> dict[str, Callable[[], object]]:
    """kv_cache [L, 2, pool_blocks, S, H, D]; ids [n]; out [L, 2, n, S, H, D]."""
    num_layers = kv_cache.shape[0]
    id_list = ids.tolist()

    def per_layer() -> None:
        for layer in range(num_layers):
            torch.index_select(kv_cache[layer], 1, ids, out=out[layer])

    def per_block() -> None:
        for layer in range(num_layers):
            for kv in range(2):
                for j, block in enumerate(id_list):
                    out[layer, kv, j].copy_(kv_cache[layer, kv, block])

    return {
        "duet": lambda: kv_blocks.gather_kv_blocks(kv_cache, ids, 0, num_layers, out),
        "index_select": per_layer,
        "per-block copy": per_block,
    }


def scatter_fns(staging, ids, kv_cache) -> dict[str, Callable[[], object]]:
    """staging [L, 2, n, S, H, D]; ids [n]; kv_cache [L, 2, pool_blocks, S, H, D] (written)."""
    num_layers = kv_cache.shape[0]
    id_list = ids.tolist()

    def per_layer() -> None:
        for layer in range(num_layers):
            kv_cache[layer].index_copy_(1, ids, staging[layer])

    def per_block() -> None:
        for layer in range(num_layers):
            for kv in range(2):
                for j, block in enumerate(id_list):
                    kv_cache[layer, kv, block].copy_(staging[layer, kv, j])

    return {
        "duet": lambda: kv_blocks.scatter_kv_blocks(staging, ids, 0, num_layers, kv_cache),
        "index_select": per_layer,
        "per-block copy": per_block,
    }


def bench_shape(shape: Shape, device: torch.device, copy_bw: float, duet_impl: str, quick: bool) -> list[dict]:
    pool_blocks = POOL_FACTOR * shape.num_ids
    block_shape = (shape.block_size, shape.num_kv_heads, shape.head_dim)
    kv_cache = torch.randn(shape.num_layers, 2, pool_blocks, *block_shape, device=device, dtype=shape.dtype)
    ids = torch.randperm(pool_blocks, device=device)[: shape.num_ids]
    staging = kv_cache.new_empty(shape.num_layers, 2, shape.num_ids, *block_shape)

    # Sanity before timing: the op must agree with the reference bit for bit.
    kv_blocks.gather_kv_blocks(kv_cache, ids, 0, shape.num_layers, staging)
    expected = reference.gather_kv_blocks(kv_cache, ids, 0, shape.num_layers)
    if not torch.equal(staging.view(torch.uint8), expected.view(torch.uint8)):
        raise RuntimeError(f"gather_kv_blocks disagrees with the reference for {shape}")

    moved_bytes = 2 * staging.numel() * staging.element_size()  # read + write
    rows = []
    for op, fns in (("gather", gather_fns(kv_cache, ids, staging)), ("scatter", scatter_fns(staging, ids, kv_cache))):
        times = {}
        for impl, fn in fns.items():
            # The per-block path is thousands of Python calls: fewer samples keep the run short.
            slow = impl == "per-block copy"
            times[impl] = time_fn(fn, device, warmup=1 if slow else 3, iters=3 if slow else 10)
        for impl in IMPLS:
            seconds = times[impl]
            bandwidth = moved_bytes / seconds
            rows.append({
                "model": shape.model, "layers": shape.num_layers, "blocks": shape.num_ids,
                "block_size": shape.block_size, "kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
                "dtype": str(shape.dtype).removeprefix("torch."), "op": op,
                "impl": duet_impl if impl == "duet" else impl,
                "time_us": seconds * 1e6, "GB/s": bandwidth / 1e9, "%copy_bw": 100 * bandwidth / copy_bw,
                "x_duet_time": seconds / times["duet"],
            })
    return rows


def plot_rows(rows: list[dict], copy_bw: float) -> Callable:
    groups = list(dict.fromkeys((r["model"], r["op"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))

    def plot(ax) -> None:
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            values = [
                next((r["GB/s"] for r in rows if (r["model"], r["op"]) == g and r["impl"] == impl), 0.0) for g in groups
            ]
            ax.bar([i + (k - (len(impls) - 1) / 2) * width for i in range(len(groups))], values, width, label=impl)
        ax.axhline(copy_bw / 1e9, color="black", linestyle="--", linewidth=1, label="device copy (same run)")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(["\n".join(textwrap.wrap(model, 14) + [op]) for model, op in groups], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("GB/s (read + write)")
        ax.legend(fontsize=7)

    return plot


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, seconds on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_record_arg(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    duet_impl = "duet" if kv_blocks.extension_available() else "duet (reference fallback)"
    copy_bw = copy_bandwidth_bytes_per_s(device)
    rows = []
    for shape in quick_shapes() if args.quick else default_shapes():
        rows += bench_shape(shape, device, copy_bw, duet_impl, args.quick)
    write_results(
        "kv_pack", rows, COLUMNS, device=device,
        extra={
            "copy_GB/s": round(copy_bw / 1e9, 2), "quick": args.quick, "extension": kv_blocks.extension_available(),
            "torch_threads": torch.get_num_threads(), "pool_blocks_per_request_block": POOL_FACTOR,
        },
        plot=plot_rows(rows, copy_bw), record=args.record,
    )


if __name__ == "__main__":
    main()
