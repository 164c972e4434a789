"""Process groups of one engine's ranks, built directly on a ``TCPStore`` rank 0 serves.

The groups are created without ``torch.distributed.init_process_group``, so no process-global state is
touched: several parallel engines can live in one process (tests do), and closing one leaves the others.
Every group has the engine's deadline (``distributed_timeout_s``): a collective that does not complete in
time raises instead of hanging, and a peer that dies makes its partners' next collective fail at once.

Groups of one rank:
- ``control``: gloo over all ranks, CPU tensors. Rank 0 broadcasts each step's inputs on it.
- ``data``: all ranks, activations. The control group on CPU; NCCL on CUDA. Pipeline stages send their
  hidden states to the next stage and the last stage sends logits to rank 0 on it (global ranks).
- ``tp``: the ranks of this rank's pipeline stage (TP all-reduces), ``None`` when tensor_parallel_size == 1.

Single host only: the store and gloo bind 127.0.0.1.
"""
from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from duet.engine.parallel.layout import ParallelLayout

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


class Group:
    """Collectives over one process group; ranks are the group's own. Every call blocks until done."""

    def __init__(self, backend, rank: int, size: int):
        self._pg = backend
        self.rank = rank
        self.size = size

    def all_reduce(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        """``x`` becomes the element-wise reduction over the group (in place)."""
        opts = dist.AllreduceOptions()
        opts.reduceOp = op
        self._pg.allreduce([x], opts).wait()

    def broadcast(self, x: torch.Tensor, src: int) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self._pg.broadcast([x], opts).wait()

    def send(self, x: torch.Tensor, dst: int) -> None:
        self._pg.send([x], dst, 0).wait()

    def recv(self, x: torch.Tensor, src: int) -> None:
        self._pg.recv([x], src, 0).wait()


def _gloo(store: dist.Store, prefix: str, rank: int, size: int, timeout: timedelta) -> Group:
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=HOST)]
    # Construction is the rendezvous: it blocks until every member has joined, or the deadline passes.
    return Group(dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size, opts), rank, size)


def _nccl(store: dist.Store, prefix: str, rank: int, size: int, timeout: timedelta) -> Group:
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return Group(dist.ProcessGroupNCCL(dist.PrefixStore(prefix, store), rank, size, opts), rank, size)


def make_store(world_size: int, timeout_s: float, port: int | None = None) -> dist.TCPStore:
    """Rank 0 (``port`` None) serves a store on a free port (``store.port``); the others connect to it."""
    timeout = timedelta(seconds=timeout_s)
    if port is None:
        return dist.TCPStore(HOST, 0, world_size, True, timeout, wait_for_workers=False)
    return dist.TCPStore(HOST, port, world_size, False, timeout)


class ParallelComm:
    """Every group one rank takes part in. All ranks must construct it (same arguments but ``layout``)."""

    def __init__(self, store: dist.Store, layout: ParallelLayout, device: torch.device, timeout_s: float):
        timeout = timedelta(seconds=timeout_s)
        self.store = store  # rank 0 serves it: it must outlive the groups
        self.layout = layout
        world = layout.world_size
        self.control = _gloo(store, "control", layout.rank, world, timeout)
        if device.type == "cuda":
            self.data = _nccl(store, "data", layout.rank, world, timeout)
            make = _nccl
        else:
            self.data = self.control
            make = _gloo
        self.tp: Group | None = None
        if layout.tp_size > 1:
            if layout.pp_size == 1:
                self.tp = self.data
            else:
                self.tp = make(store, f"tp{layout.pp_rank}", layout.tp_rank, layout.tp_size, timeout)
        logger.debug("rank %d: process groups ready (%s)", layout.rank, layout)

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` any rank passed (so every rank sizes its KV pool alike)."""
        t = torch.tensor([value], dtype=torch.int64)
        self.control.all_reduce(t, dist.ReduceOp.MIN)
        return int(t.item())
