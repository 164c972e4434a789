"""Shared by the model-parallel tests."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def one_omp_thread():
    """Worker ranks inherit the environment; without OMP_NUM_THREADS=1 each would use every core (restored after)."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)


def child_pids(parent: int | None = None) -> set[int]:
    """Live (non-zombie) processes whose parent is ``parent`` (default: this process), from /proc.

    multiprocessing's resource tracker, which the first spawned process starts and which lives as long
    as the interpreter, is not counted.
    """
    parent = os.getpid() if parent is None else parent
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        state, ppid = fields[0], int(fields[1])
        if ppid == parent and state != "Z" and not _is_resource_tracker(stat.parent):
            pids.add(int(stat.parent.name))
    return pids


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _is_resource_tracker(proc: Path) -> bool:
    try:
        return b"resource_tracker" in (proc / "cmdline").read_bytes()
    except OSError:
        return False
