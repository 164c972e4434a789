"""Shared plumbing for benchmarks: device naming, timing, copy-bandwidth roofline, and result files.

A result is a list of row dicts. ``write_results`` prints a Markdown table and writes ``<name>.json`` (rows +
environment: commit, device, torch version), ``<name>.md`` and, when ``plot`` is given, ``<name>.png`` under
``bench/runs/<device>/`` (untracked), or, with ``record=True`` (every benchmark's ``--record``), under
``bench/results/<device>/``: the recorded results bench/NOTES.md cites, tracked by git. A plain run never
overwrites a recorded result.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from duet.engine import envs

logger = logging.getLogger(__name__)

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
"""Recorded results (tracked): written only with ``--record``."""
RUNS_ROOT = Path(__file__).resolve().parent / "runs"
"""Every other run (in .gitignore)."""


def device_slug(device: torch.device | str | None = None) -> str:
    """Folder name for a device: ``h100``, ``h200``, ``a100``... for GPUs, ``cpu`` otherwise."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for tag in ("h200", "h100", "b200", "a100", "l40s", "l4", "a10"):
        if tag in name:
            return tag
    return name.replace(" ", "_")


def device_description(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def git_commit() -> str:
    if envs.bench_commit():
        return envs.bench_commit()
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
            timeout=5, cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2]


def time_fn_graph(fn: Callable[[], object], device: torch.device, calls: int = 20, iters: int = 10) -> float | None:
    """Median GPU time of one ``fn()`` in seconds with launch overhead removed: ``calls`` calls captured in
    one CUDA graph, replayed ``iters`` times. None where the device is not CUDA or ``fn`` cannot be
    captured (it synchronises, say); then use ``time_fn``."""
    if device.type != "cuda":
        return None
    try:
        fn()  # warm-up outside the capture (compilation, allocator, library handles)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except (RuntimeError, torch.cuda.CudaError) as exc:  # noqa: BLE001 - any capture failure means "not capturable"
        torch.cuda.synchronize(device)
        logger.info("CUDA graph capture failed (%s): timing eagerly", str(exc).splitlines()[0])
        return None
    return time_fn(graph.replay, device, warmup=2, iters=iters) / calls


def copy_bandwidth_bytes_per_s(device: torch.device, num_bytes: int | None = None) -> float:
    """Device-to-device copy bandwidth (read + write bytes / s) measured now: the roofline of this run."""
    if num_bytes is None:
        num_bytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device, warmup=2, iters=5)
    return 2 * num_bytes / seconds


def add_record_arg(parser) -> None:
    """``--record``: the flag every benchmark takes to write its result where recorded results live."""
    parser.add_argument("--record", action="store_true",
                        help="write the result into bench/results/<device>/ (tracked; see bench/NOTES.md) instead of "
                        "bench/runs/<device>/ (untracked)")


def results_dir(device: torch.device | str | None = None, record: bool = False) -> Path:
    path = (RESULTS_ROOT if record else RUNS_ROOT) / device_slug(device)
    path.mkdir(parents=True, exist_ok=True)
    return path


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(
    name: str,
    rows: Sequence[dict],
    columns: Sequence[str],
    device: torch.device | str | None = None,
    extra: dict | None = None,
    plot: Callable[["object"], None] | None = None,
    record: bool = False,
) -> Path:
    """Print the table and write ``<name>.json`` (+ ``<name>.md``, + ``<name>.png`` via ``plot(ax)``) under
    ``bench/runs/<device>/``, or ``bench/results/<device>/`` when ``record``."""
    out_dir = results_dir(device, record)
    table = format_table(rows, columns)
    print(table)
    meta = {
        "name": name,
        "commit": git_commit(),
        "device": device_description(device),
        "torch": torch.__version__,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=1))
    (out_dir / f"{name}.md").write_text(
        f"# {name}\n\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n" + table + "\n"
    )
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        plot(ax)
        ax.set_title(f"{name} — {meta['device']} ({meta['commit']})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png", dpi=120)
        plt.close(fig)
    note = "recorded" if record else "not recorded; --record writes bench/results/ instead"
    print(f"wrote {out_dir / name}.json ({note})")
    return out_dir / f"{name}.json"
