"""``BlockCopier``: runs the host tier's block copies off the engine's loop thread.

A copy is a plain function that moves KV blocks between the device pool, the host pool and a staging slab with
the C++ gather / scatter ops (``kernels.kv_blocks``). The loop thread submits it and later collects it from
``finished``; meanwhile whoever submitted it holds every block it reads or writes (``BlockManager.hold``,
``HostBlockPool.acquire`` / ``begin_write``), so nothing a copy touches is reused before it ended.

One worker thread runs copies in submission order. On CUDA it runs them on its own stream, after the point the
compute stream had reached at submission (an event recorded there), so a copy of blocks the last step wrote
sees them, and the step loop never waits for a copy. ``threaded=False`` runs each copy inside ``submit`` (the
same code, synchronous: unit tests that want a fixed order). ``gate``, for tests: the worker waits for it before
each copy, which keeps copies in flight for as long as a test needs.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class CopyJob:
    kind: str
    """``offload`` (device -> host), ``load`` (host -> device) or ``pack`` (device / host -> a pull's slab)."""
    fn: Callable[[], None] = field(repr=False)
    num_bytes: int
    tag: Any = field(default=None, repr=False)
    """The submitter's record (what to release when it ends)."""
    submitted_at: float = 0.0
    seconds: float = 0.0
    """Submission to the end of the copy."""
    error: str | None = None
    done: bool = False
    ready: Any = field(default=None, repr=False)  # torch.cuda.Event recorded on the compute stream (CUDA only)


class BlockCopier:
    def __init__(self, device: torch.device, threaded: bool = True, gate: threading.Event | None = None):
        self.device = device
        self.threaded = threaded
        self.gate = gate
        self._finished: queue.SimpleQueue[CopyJob] = queue.SimpleQueue()
        self._todo: queue.SimpleQueue[CopyJob | None] = queue.SimpleQueue()
        self.num_in_flight = 0
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._worker: threading.Thread | None = None
        if threaded:
            self._worker = threading.Thread(target=self._run, name="duet-kv-copier", daemon=True)
            self._worker.start()

    def submit(self, kind: str, fn: Callable[[], None], num_bytes: int, tag: Any = None) -> CopyJob:
        """Run ``fn`` (a copy) after everything the compute stream has queued so far; never blocks."""
        job = CopyJob(kind, fn, num_bytes, tag, time.monotonic())
        if self._stream is not None:
            job.ready = torch.cuda.current_stream(self.device).record_event()
        self.num_in_flight += 1
        if self.threaded:
            self._todo.put(job)
        else:
            self._execute(job)
        return job

    def finished(self) -> list[CopyJob]:
        """Copies that ended since the last call, in the order they ended (loop thread)."""
        out = []
        while True:
            try:
                out.append(self._finished.get_nowait())
            except queue.Empty:
                break
        self.num_in_flight -= len(out)
        return out

    @property
    def busy(self) -> bool:
        return self.num_in_flight > 0

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish the queued copies and stop the worker."""
        if self._worker is not None and self._worker.is_alive():
            if self.gate is not None:
                self.gate.set()
            self._todo.put(None)
            self._worker.join(timeout_s)

    # ---- worker -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._todo.get()
            if job is None:
                return
            if self.gate is not None:
                self.gate.wait()
            self._execute(job)

    def _execute(self, job: CopyJob) -> None:
        try:
            with torch.inference_mode():
                if self._stream is None:
                    job.fn()
                else:
                    with torch.cuda.stream(self._stream):
                        self._stream.wait_event(job.ready)
                        job.fn()
                    self._stream.synchronize()
        except Exception as exc:  # noqa: BLE001 - a failed copy fails its blocks, never the engine
            logger.exception("KV block copy (%s) failed", job.kind)
            job.error = f"{type(exc).__name__}: {exc}"
        job.seconds = time.monotonic() - job.submitted_at
        job.done = True
        self._finished.put(job)
