"""KV transfer benchmark: packed slabs vs one descriptor per block, prefill process -> decode process.

    python -m bench.transfer [--quick] [--backend nixl|zmq] [--tokens N] [--device cpu|cuda]

Two processes, each with a paged KV pool ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``
(Llama-3-8B geometry: 32 layers, 8 KV heads, head dim 128, bf16, 16-token blocks, so one block of one
layer's K or V is 32 KiB). One request's KV moves from the prefill pool (this process) to the decode pool
(a spawned process) three ways:

- ``slab x1``: the whole request gathered into one staging slab, one descriptor.
- ``slab per layer``: one WRITE of one descriptor per layer (Duet's layer-wise streaming).
- ``per block``: one WRITE with one descriptor per 16-token block per layer per K/V, pool to pool at
  scattered block ids (what vLLM's NixlConnector posts).

Time is measured on the writer from the first post to the last handle DONE (the receiver drives its
progress in a loop). The ``+ pack/unpack`` row adds the time packing and unpacking the same
request on this device with Duet's gather / scatter ops (csrc/): the cost the packed path pays to send slabs.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from duet.bench.report import add_record_arg, time_fn, write_results
from duet.kernels.kv_blocks import gather_kv_blocks, scatter_kv_blocks
from duet.transfer import RemoteRegion, make_transport
from duet.transfer.factory import nixl_importable
from duet.transfer.wire import Message, decode, encode

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
DEADLINE_S = 120.0  # any single step of the benchmark


@dataclass
class BenchReady(Message):
    TYPE = "bench.transfer.ready"
    name: str
    metadata: bytes
    pool: RemoteRegion
    slab: RemoteRegion


@dataclass
class BenchDone(Message):
    TYPE = "bench.transfer.done"
    num_notifs: int


def _pool(num_blocks: int, device: str) -> torch.Tensor:
    # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    return torch.empty(NUM_LAYERS, 2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=device)


def _decode_main(kind: str, num_pool_blocks: int, num_req_blocks: int, device: str, conn) -> None:
    """Decode side: register pool and slab, drive progress until the b"stop" notification."""
    torch.set_num_threads(1)
    transport = make_transport(kind, "bench-decode")
    pool = _pool(num_pool_blocks, device).zero_()
    slab = _pool(num_req_blocks, device).zero_()  # [num_layers, 2, num_req_blocks, ...]: one request packed
    pool_region, slab_region = transport.register(pool), transport.register(slab)
    conn.send_bytes(encode(BenchReady(transport.name, transport.metadata(), transport.describe(pool_region),
                                      transport.describe(slab_region))))
    num_notifs, give_up = 0, time.monotonic() + DEADLINE_S * 10
    while time.monotonic() < give_up:
        notifs = transport.notifications()
        num_notifs += len(notifs)
        if any(n == b"stop" for _, n in notifs):
            break
        if not notifs:
            time.sleep(20e-6)
    conn.send_bytes(encode(BenchDone(num_notifs)))
    transport.close()


def _wait_all(transport, handles) -> None:
    give_up = time.monotonic() + DEADLINE_S
    pending = list(handles)
    while pending:
        pending = [h for h in pending if transport.poll(h) == "PENDING"]
        if any(h.state == "ERROR" for h in handles):
            raise RuntimeError(f"transfer failed: {[h.error for h in handles if h.error]}")
        if time.monotonic() > give_up:
            raise TimeoutError(f"{len(pending)} transfers not done after {DEADLINE_S}s")
        if pending:
            time.sleep(0)
    for h in handles:
        transport.release(h)


def _timed(transport, post, iters: int) -> float:
    """Median seconds from first post to all DONE."""
    samples = []
    for i in range(iters + 1):  # +1 warm-up (connection set-up, page faults)
        t0 = time.perf_counter()
        _wait_all(transport, post(i))
        if i:
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def run_backend(kind: str, num_tokens: int, iters: int, device: str) -> list[dict]:
    num_req_blocks = -(-num_tokens // BLOCK_SIZE)
    num_pool_blocks = 2 * num_req_blocks  # the request's blocks are scattered over a pool twice its size
    block_bytes = BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    layer_bytes = 2 * num_req_blocks * block_bytes
    total_bytes = NUM_LAYERS * layer_bytes

    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_decode_main, args=(kind, num_pool_blocks, num_req_blocks, device, child_conn),
                       daemon=True)
    proc.start()
    transport = make_transport(kind, "bench-prefill")
    try:
        pool = _pool(num_pool_blocks, device).normal_()
        slab = _pool(num_req_blocks, device)
        pool_region, slab_region = transport.register(pool), transport.register(slab)
        if not conn.poll(DEADLINE_S):
            raise TimeoutError("decode process did not start")
        ready = decode(conn.recv_bytes())
        assert isinstance(ready, BenchReady)
        transport.connect(ready.name, ready.metadata)

        rng = np.random.default_rng(0)
        src_ids = rng.permutation(num_pool_blocks)[:num_req_blocks]
        dst_ids = rng.permutation(num_pool_blocks)[:num_req_blocks]
        # Byte offset of (layer, kv, block) in an LTNBHD pool with num_pool_blocks blocks.
        lkv = np.arange(NUM_LAYERS * 2, dtype=np.int64)[:, None] * num_pool_blocks * block_bytes
        block_ranges = np.stack([
            (lkv + src_ids[None, :] * block_bytes).ravel(),
            (lkv + dst_ids[None, :] * block_bytes).ravel(),
            np.full(NUM_LAYERS * 2 * num_req_blocks, block_bytes, dtype=np.int64),
        ], axis=1)  # [num_layers * 2 * num_req_blocks, 3]

        def post_slab(i):
            return [transport.write(slab_region, 0, total_bytes, ready.slab, 0, notif=b"s%d" % i)]

        def post_layers(i):
            return [transport.write(slab_region, layer * layer_bytes, layer_bytes, ready.slab, layer * layer_bytes,
                                    notif=b"l%d:%d" % (i, layer)) for layer in range(NUM_LAYERS)]

        def post_blocks(i):
            return [transport.write_many(pool_region, ready.pool, block_ranges, notif=b"b%d" % i)]

        results = [
            ("slab x1", 1, total_bytes, _timed(transport, post_slab, iters)),
            ("slab per layer", NUM_LAYERS, layer_bytes, _timed(transport, post_layers, iters)),
            ("per block", len(block_ranges), block_bytes, _timed(transport, post_blocks, iters)),
        ]
        expected_notifs = (iters + 1) * (1 + NUM_LAYERS + 1) + 1
        transport.send_notif(ready.name, b"stop")
        if not conn.poll(DEADLINE_S):
            raise TimeoutError("decode process did not finish")
        done = decode(conn.recv_bytes())
        assert isinstance(done, BenchDone) and done.num_notifs == expected_notifs, (done, expected_notifs)

        # What packing costs on this device, measured with torch's gather / scatter on the same request.
        src_idx = torch.as_tensor(src_ids, device=device)
        dst_pool = _pool(num_pool_blocks, device)
        dst_idx = torch.as_tensor(dst_ids, device=device)
        dev = torch.device(device)
        # Duet's pack / unpack ops (kernels/kv_blocks.py: the csrc/ extension, torch references without it).
        pack_s = time_fn(lambda: gather_kv_blocks(pool, src_idx, 0, NUM_LAYERS, out=slab), dev, warmup=1, iters=iters)
        unpack_s = time_fn(lambda: scatter_kv_blocks(slab, dst_idx, 0, NUM_LAYERS, dst_pool), dev, warmup=1,
                           iters=iters)
    finally:
        transport.close()
        proc.join(DEADLINE_S)
        if proc.is_alive():
            proc.kill()

    rows = []
    for mode, num_descs, desc_bytes, seconds in results:
        rows.append(_row(kind, mode, num_descs, desc_bytes, total_bytes, seconds))
    layer_s = results[1][3]
    rows.append(_row(kind, "slab per layer + pack/unpack", NUM_LAYERS, layer_bytes, total_bytes,
                     layer_s + pack_s + unpack_s, pack_ms=pack_s * 1e3, unpack_ms=unpack_s * 1e3))
    return rows


def _row(kind, mode, num_descs, desc_bytes, total_bytes, seconds, **extra) -> dict:
    return {"backend": kind, "mode": mode, "descs": num_descs, "desc_KiB": desc_bytes / 1024,
            "total_MiB": total_bytes / 2**20, "ms": seconds * 1e3, "GB/s": total_bytes / seconds / 1e9, **extra}


def _plot(rows):
    def plot(ax):
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        backends = list(dict.fromkeys(r["backend"] for r in rows))
        width = 0.8 / len(backends)
        for b, backend in enumerate(backends):
            values = [next((r["GB/s"] for r in rows if r["backend"] == backend and r["mode"] == m), 0) for m in modes]
            xs = [i + b * width for i in range(len(modes))]
            bars = ax.bar(xs, values, width, label=backend)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(modes))])
        ax.set_xticklabels(modes, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("GB/s (one request, prefill -> decode)")
        ax.legend()

    return plot


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small request and few iterations (seconds on CPU)")
    parser.add_argument("--backend", choices=["nixl", "zmq"], help="default: every backend available")
    parser.add_argument("--tokens", type=int, help="request length (default 256 quick, 2048 full)")
    parser.add_argument("--iters", type=int, help="timed iterations per mode (default 3 quick, 10 full)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_record_arg(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    num_tokens = args.tokens or (256 if args.quick else 2048)
    iters = args.iters or (3 if args.quick else 10)
    backends = [args.backend] if args.backend else (["nixl"] if nixl_importable() else []) + ["zmq"]

    rows = []
    for kind in backends:
        rows += run_backend(kind, num_tokens, iters, args.device)
    name = ("transfer_quick" if args.quick else "transfer") + (f"_{args.backend}" if args.backend else "")
    write_results(
        name, rows, ["backend", "mode", "descs", "desc_KiB", "total_MiB", "ms", "GB/s"], device=args.device,
        extra={"tokens": num_tokens, "iters": iters, "geometry": f"L{NUM_LAYERS} H{NUM_KV_HEADS} D{HEAD_DIM} "
               f"B{BLOCK_SIZE} {str(DTYPE).removeprefix('torch.')}", "timing": "writer: first post -> all DONE, median",
               "processes": "2 (spawn), same host"},
        plot=_plot(rows), record=args.record,
    )


if __name__ == "__main__":
    main()
