"""Refused sizes, worker start-up and shutdown, and what happens when a rank dies."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from duet.engine import LLM, EngineConfig, SamplingParams
from tests.parallel.helpers import child_pids, pid_alive

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("kwargs, field", [
    (dict(tensor_parallel_size=0), "tensor_parallel_size"),
    (dict(tensor_parallel_size=True), "tensor_parallel_size"),
    (dict(pipeline_parallel_size="2"), "pipeline_parallel_size"),
    (dict(expert_parallel="yes"), "expert_parallel"),
    (dict(distributed_timeout_s=0), "distributed_timeout_s"),
])
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(model="/nonexistent", **kwargs)


@pytest.mark.parametrize("arch, ckpt_kw, parallel_kw, message", [
    ("llama", {}, dict(tensor_parallel_size=3), r"tensor_parallel_size=3 must divide .*num_attention_heads=4"),
    ("llama", dict(hidden_size=48, num_heads=12, num_kv_heads=6), dict(tensor_parallel_size=4),
     r"tensor_parallel_size=4 and .*num_key_value_heads=6"),
    ("llama", dict(intermediate_size=98), dict(tensor_parallel_size=4),
     r"tensor_parallel_size=4 .*intermediate_size=98"),
    ("llama", {}, dict(tensor_parallel_size=2, expert_parallel=True), r"expert_parallel: .* has no experts"),
    ("mixtral", dict(num_experts=3), dict(tensor_parallel_size=2, expert_parallel=True),
     r"expert_parallel: tensor_parallel_size=2 must divide .*num_experts=3"),
    ("llama", {}, dict(pipeline_parallel_size=3), r"pipeline_parallel_size=3 exceeds the model's 2 layers"),
])
def test_sizes_the_model_cannot_split_are_refused_before_any_worker_starts(
    tiny_model, arch, ckpt_kw, parallel_kw, message
):
    path = tiny_model(arch, **ckpt_kw)
    with pytest.raises(ValueError, match=message):
        LLM(path, show_progress=False, num_kv_blocks=16, **parallel_kw)
    assert not child_pids()


def test_idle_workers_outlive_the_deadline_and_a_dead_worker_fails_the_step(tiny_model):
    # Deadline 8 s: rank 0's heartbeats (every 2 s) must keep idle workers waiting past it.
    llm = LLM(tiny_model("llama"), show_progress=False, num_kv_blocks=16, tensor_parallel_size=2,
              distributed_timeout_s=8)
    try:
        first = llm.generate(["idle"], GREEDY)[0].token_ids
        time.sleep(9)
        assert llm.generate(["idle"], GREEDY)[0].token_ids == first
        (worker,) = child_pids()
        os.kill(worker, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="model-parallel"):
            llm.generate(["after the crash"], GREEDY)
        assert time.monotonic() - start < 5, "a dead peer must be noticed at once, not at the deadline"
        with pytest.raises(RuntimeError, match="failed earlier"):
            llm.generate(["again"], GREEDY)
    finally:
        llm.close()
    assert not child_pids()


def _run_rank0(script: str) -> tuple[subprocess.CompletedProcess, list[int]]:
    """Run ``script`` as a rank 0 process; it prints its workers' pids. Returns the run and those pids."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    workers = [int(p) for p in proc.stdout.split()]
    assert len(workers) == 1, (proc.stdout, proc.stderr)
    return proc, workers


def _assert_gone_soon(pids: list[int], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in pids)


def test_workers_exit_when_rank0_is_killed(tiny_model):
    proc, workers = _run_rank0(f"""
        import os, signal
        from duet.engine import LLM, SamplingParams
        from tests.parallel.helpers import child_pids
        llm = LLM({tiny_model("qwen3")!r}, show_progress=False, num_kv_blocks=16, pipeline_parallel_size=2)
        llm.generate(["hi"], SamplingParams(max_tokens=2, temperature=0))
        print(*child_pids(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    _assert_gone_soon(workers)


def test_interpreter_exit_without_close_stops_the_workers(tiny_model):
    # No __main__ guard, no close(): workers are fresh interpreters and atexit shuts them down.
    proc, workers = _run_rank0(f"""
        from duet.engine import LLM
        from tests.parallel.helpers import child_pids
        llm = LLM({tiny_model("llama")!r}, show_progress=False, num_kv_blocks=16, tensor_parallel_size=2)
        print(*child_pids(), flush=True)
    """)
    assert proc.returncode == 0, proc.stderr
    _assert_gone_soon(workers, timeout_s=1)
