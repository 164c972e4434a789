"""Start a model-parallel engine's worker processes, and stop them.

``start_parallel_runner`` (rank 0, from ``LLMEngine``) serves a TCPStore on a free port, starts ranks
1..N-1 as ``python -m engine.parallel.workers`` (the engine config travels as JSON on the command line;
a fresh interpreter never re-imports the caller's main script, so no ``__main__`` guard is needed), waits
for each to check in, joins the process groups with them and returns rank 0's runner. Closing that runner
(``LLMEngine.close``, or at interpreter exit) broadcasts a shutdown, joins the workers under a deadline and
kills any that remain.

A worker exits when rank 0 says so, when a collective fails (rank 0 or a peer died: gloo reports the
closed connection at once), when no step or heartbeat came within the deadline, or when its parent
process is gone (a watchdog thread; covers rank 0 being killed outright).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from duet.engine import envs
from duet.engine.config import EngineConfig
from duet.engine.model_config import ModelConfig
from duet.engine.parallel.comm import ParallelComm, make_store
from duet.engine.parallel.layout import ParallelLayout
from duet.engine.parallel.runner import DistributedModelRunner

logger = logging.getLogger(__name__)

_PARENT_POLL_S = 0.5
_JOIN_TIMEOUT_S = 10.0
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the ``engine`` package


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """Rank r uses the r-th GPU after the configured one; CPU ranks share the CPU."""
    device = config.torch_device()
    if device.type != "cuda":
        return device
    index = (device.index or 0) + rank
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"tensor_parallel_size x pipeline_parallel_size = {config.world_size} ranks need GPUs "
            f"{device.index or 0}..{index}, but only {torch.cuda.device_count()} are visible"
        )
    return torch.device("cuda", index)


def start_parallel_runner(
    config: EngineConfig, model_config: ModelConfig, max_model_len: int
) -> DistributedModelRunner:
    """Rank 0: start the workers and build rank 0's runner; on any failure the workers are killed."""
    world = config.world_size
    for rank in range(world):
        rank_device(config, rank)  # refuse too few GPUs before starting anything
    store = make_store(world, config.distributed_timeout_s)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
    level = logging.getLogger("duet").getEffectiveLevel()
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(1, world):
            cmd = [
                sys.executable, "-m", "duet.engine.parallel.workers", "--rank", str(rank), "--port", str(store.port),
                "--parent-pid", str(os.getpid()), "--log-level", str(level), "--max-model-len", str(max_model_len),
                "--config", json.dumps(dataclasses.asdict(config)),
            ]
            procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))
        _wait_for_workers(store, procs, config.distributed_timeout_s)
        layout = ParallelLayout.for_rank(0, config.tensor_parallel_size, config.pipeline_parallel_size,
                                         config.expert_parallel)
        device = rank_device(config, 0)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL works on the current device
        comm = ParallelComm(store, layout, device, config.distributed_timeout_s)
        runner = DistributedModelRunner(
            config, model_config, max_model_len, layout, comm, device,
            stop_workers=lambda: _stop(procs, _JOIN_TIMEOUT_S),
        )
    except BaseException:
        _stop(procs, timeout_s=0)
        raise
    logger.info("model-parallel engine: %d ranks (tp=%d, pp=%d, expert_parallel=%s)", world,
                config.tensor_parallel_size, config.pipeline_parallel_size, config.expert_parallel)
    return runner


def _wait_for_workers(store, procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Until every worker has checked in; a worker that exits first fails start-up now, not at the deadline."""
    keys = [f"worker/{rank}" for rank in range(1, len(procs) + 1)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        for rank, p in enumerate(procs, start=1):
            if p.poll() is not None:
                raise RuntimeError(f"model-parallel worker rank {rank} exited with code {p.returncode} during start-up")
        if time.monotonic() > deadline:
            raise TimeoutError(f"model-parallel workers did not start within distributed_timeout_s={timeout_s}")
        time.sleep(0.05)


def _stop(procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Wait for each worker until the shared deadline, then terminate, then kill what is left."""
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        for stop in (p.terminate, p.kill):
            if p.poll() is not None:
                break
            logger.warning("worker pid %d did not exit in time; stopping it", p.pid)
            stop()
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)  # rank 0 is gone; nothing here is worth flushing
        time.sleep(_PARENT_POLL_S)


def worker_main(rank: int, config: EngineConfig, max_model_len: int, store_port: int, parent_pid: int) -> None:
    """Rank ``rank`` > 0: join the groups, load this rank's shard, run steps until rank 0 says stop."""
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="duet-parent-watch", daemon=True).start()
    # Ctrl-C reaches the whole process group: rank 0 drains and then shuts this rank down, so ignore it here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if envs.torch_threads() > 0:
        torch.set_num_threads(envs.torch_threads())
    layout = ParallelLayout.for_rank(rank, config.tensor_parallel_size, config.pipeline_parallel_size,
                                     config.expert_parallel)
    device = rank_device(config, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = make_store(config.world_size, config.distributed_timeout_s, store_port)
    store.set(f"worker/{rank}", str(os.getpid()))
    model_config = ModelConfig.from_pretrained(config.model)
    comm = ParallelComm(store, layout, device, config.distributed_timeout_s)
    runner = DistributedModelRunner(config, model_config, max_model_len, layout, comm, device)
    runner.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Duet model-parallel worker (started by rank 0, not by hand)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True, help="rank 0's TCPStore port on 127.0.0.1")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--log-level", type=int, default=logging.WARNING)
    parser.add_argument("--max-model-len", type=int, required=True)
    parser.add_argument("--config", required=True, help="EngineConfig as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(format=f"%(asctime)s rank{args.rank} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("duet").setLevel(args.log_level)
    config = EngineConfig(**json.loads(args.config))
    worker_main(args.rank, config, args.max_model_len, args.port, args.parent_pid)


if __name__ == "__main__":
    main()
