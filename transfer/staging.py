"""Staging memory for packed KV: one registered byte tensor, carved into per-transfer slabs.

Registered once at start-up (NIXL registrations are slow and embedded in the agent metadata), then handed out
by a first-fit allocator. A slab whose remote writer may still write into it (transfer timed out or failed)
is quarantined for a while before reuse, so a late write can never corrupt a newer transfer.
"""
from __future__ import annotations

import time

import torch

ALIGN = 256


class StagingPool:
    def __init__(self, nbytes: int, device: torch.device, quarantine_s: float = 60.0):
        if nbytes < ALIGN:
            raise ValueError(f"staging bytes must be >= {ALIGN}, got {nbytes}")
        self.buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)  # [nbytes]
        self.nbytes = nbytes
        self.quarantine_s = quarantine_s
        self._free: list[tuple[int, int]] = [(0, nbytes)]  # sorted (offset, size)
        self._quarantined: list[tuple[float, int, int]] = []  # (release time, offset, size)

    @property
    def free_bytes(self) -> int:
        return sum(size for _, size in self._free)

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a new slab of ``nbytes`` (aligned), or None when no free run is large enough."""
        self._release_quarantined()
        size = -(-nbytes // ALIGN) * ALIGN
        for i, (off, run) in enumerate(self._free):
            if run >= size:
                if run == size:
                    del self._free[i]
                else:
                    self._free[i] = (off + size, run - size)
                return off
        return None

    def free(self, offset: int, nbytes: int, quarantine: bool = False) -> None:
        size = -(-nbytes // ALIGN) * ALIGN
        if quarantine:
            self._quarantined.append((time.monotonic() + self.quarantine_s, offset, size))
            return
        self._insert(offset, size)

    def view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A typed tensor over bytes [offset, offset + nbytes) of the buffer."""
        return self.buffer[offset:offset + nbytes].view(dtype).view(shape)

    def _insert(self, offset: int, size: int) -> None:
        runs = sorted(self._free + [(offset, size)])
        merged: list[tuple[int, int]] = []
        for off, run in runs:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + run)
            else:
                merged.append((off, run))
        self._free = merged

    def _release_quarantined(self) -> None:
        now = time.monotonic()
        keep = []
        for until, off, size in self._quarantined:
            if until <= now:
                self._insert(off, size)
            else:
                keep.append((until, off, size))
        self._quarantined = keep
