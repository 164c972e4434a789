"""How much of this host's CPU went to other people's work during a benchmark run (the foreign-load probe).

On a shared machine a run can be slowed by processes that are not ours. ``ForeignLoad`` brackets one run:

    with ForeignLoad() as probe:
        run()
    row.update(probe.result)

and records ``load_1m_before`` / ``load_1m_after`` (``/proc/loadavg``), ``spin_ms_before`` / ``spin_ms_after``
(the best of three timings of a fixed single-core Python loop: grows when the cores are contended) and
``foreign_cpu_share``: CPU time spent on the host during the run (``/proc/stat``) minus the CPU time of this
process and its descendants (``/proc/<pid>/stat``), over ``wall x cores``. 0 means nothing else ran; 0.25 on
two cores means someone else used half a core. ``own_cpu_share`` is the benchmark's own part on the same scale. Descendants that exit inside the window are counted as
foreign, so end the window before stopping the servers it measured. Linux only; elsewhere the fields are None.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
SPIN_ITERATIONS = 200_000


def spin_ms() -> float:
    """Best of three timings (ms) of a fixed single-core loop."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        total = 0
        for i in range(SPIN_ITERATIONS):
            total += i * i
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def _busy_s() -> float | None:
    """Non-idle CPU seconds of the whole host since boot (all cores)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    steal = values[7] if len(values) > 7 else 0  # another VM's time: not ours, not theirs on this host
    return (sum(values[:8]) - idle - steal) / _CLOCK_TICKS


def _process_tree_cpu_s() -> dict[int, float] | None:
    """CPU seconds (user + system) of this process (with its reaped children) and of each live descendant."""
    try:
        parents, cpu = {}, {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                raw = Path(entry.path, "stat").read_text()
            except OSError:
                continue  # exited meanwhile
            fields = raw[raw.rindex(")") + 2:].split()
            pid = int(entry.name)
            parents[pid] = int(fields[1])
            own = int(fields[11]) + int(fields[12])
            if pid == os.getpid():
                own += int(fields[13]) + int(fields[14])  # children this process waited for
            cpu[pid] = own / _CLOCK_TICKS
    except OSError:
        return None
    tree, frontier = {os.getpid()}, [os.getpid()]
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in tree:
                tree.add(child)
                frontier.append(child)
    return {pid: cpu[pid] for pid in tree if pid in cpu}


def _load_1m() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


class ForeignLoad:
    """Context manager around one run; ``result`` holds the probe fields afterwards."""

    def __init__(self) -> None:
        self.result: dict[str, float | None] = {}

    def __enter__(self) -> "ForeignLoad":
        self.result["load_1m_before"] = _load_1m()
        self.result["spin_ms_before"] = spin_ms()
        self._t0, self._busy0, self._own0 = time.monotonic(), _busy_s(), _process_tree_cpu_s()
        return self

    def __exit__(self, *exc) -> None:
        wall_s, busy1, own1 = time.monotonic() - self._t0, _busy_s(), _process_tree_cpu_s()
        share = own_share = None
        if None not in (self._busy0, busy1, self._own0, own1) and wall_s > 0:
            own_s = sum(cpu - self._own0.get(pid, 0.0) for pid, cpu in own1.items())
            capacity_s = wall_s * (os.cpu_count() or 1)
            share = max(0.0, (busy1 - self._busy0 - own_s) / capacity_s)
            own_share = own_s / capacity_s
        self.result["foreign_cpu_share"] = share
        self.result["own_cpu_share"] = own_share
        self.result["load_1m_after"] = _load_1m()
        self.result["spin_ms_after"] = spin_ms()
