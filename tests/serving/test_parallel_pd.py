"""Disaggregation across parallel layouts: real processes (gloo on CPU), driven through the router.

A prefill server with tensor parallelism 2 streams to a decode server with 1, and the other way round (and a
two-stage pipeline-parallel prefill server to a decode server with tensor parallelism 2); KV crosses the
wire in the whole model's layout and each side's rank 0 merges or splits the KV heads. Greedy outputs must
equal the single-process engine's, no block may leak, and a layout no mapping covers is still refused.
Also: ``engine.serve --role both --tensor-parallel-size 2``, and that no worker outlives its server.
"""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from duet.engine import LLM, SamplingParams
from duet.engine.launcher import ServerProcess, query_server
from duet.engine.llm_engine import LLMEngine
from duet.engine.protocol import Hello, PeerRef, Prefill, PrefillDone, ServerInfo, Welcome
from tests.parallel.helpers import child_pids, one_omp_thread, pid_alive
from tests.serving.test_router_http import greedy_completions, mixed_prompts, server_stats

NUM_BLOCKS = "96"
# The acceptance is CPU + gloo; on a GPU host a two-rank engine would want two GPUs.
CPU = ["--device", "cpu"]
MAX_TOKENS = 10
# (prefill flags, decode flags, KV transport)
LAYOUTS = {
    "prefill-tp2-to-decode-tp1": (["--tensor-parallel-size", "2"], [], "nixl"),
    "prefill-tp1-to-decode-tp2": ([], ["--tensor-parallel-size", "2"], "zmq"),
    # Layers split over two stages on one side, KV heads over two ranks on the other.
    "prefill-pp2-to-decode-tp2": (["--pipeline-parallel-size", "2"], ["--tensor-parallel-size", "2"], "zmq"),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_worker():
    with one_omp_thread():
        yield


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")  # 4 query heads, 2 KV heads: one KV head per rank at TP=2


@pytest.fixture(scope="module")
def reference(model):
    prompts = mixed_prompts(8)
    outs = LLM(model, show_progress=False, num_kv_blocks=96, device="cpu").generate(
        prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    return prompts, [o.text for o in outs]


def _sizes(flags: list[str]) -> tuple[int, int]:
    """(tensor, pipeline) parallel sizes a server's flags ask for."""
    def size(flag: str) -> int:
        return int(flags[flags.index(flag) + 1]) if flag in flags else 1

    return size("--tensor-parallel-size"), size("--pipeline-parallel-size")


def _assert_workers_exit(procs: dict[ServerProcess, set[int]], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    workers = {pid for pids in procs.values() for pid in pids}
    while any(pid_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in workers), "a model-parallel worker outlived its server"


@pytest.fixture(scope="module", params=list(LAYOUTS))
def cluster(request, model):
    p_flags, d_flags, kind = LAYOUTS[request.param]
    p = ServerProcess("prefill", model, "--kv-transport", kind, "--num-kv-blocks", NUM_BLOCKS, *CPU, *p_flags)
    d = ServerProcess("decode", model, "--kv-transport", kind, "--num-kv-blocks", NUM_BLOCKS, *CPU, *d_flags)
    r = ServerProcess("router", model, "--prefill", p.address, "--decode", d.address, "--served-model-name", "llama",
                      "--disagg-threshold-tokens", "0")
    workers: dict[ServerProcess, set[int]] = {}
    try:
        r.wait_ready()
        p.wait_ready(), d.wait_ready()
        workers = {proc: child_pids(proc.proc.pid) for proc in (p, d)}
        yield request.param, p, d, r, workers
    finally:
        codes = {proc: proc.stop() for proc in (r, p, d)}
    for proc in (p, d):  # SIGTERM: drain, close the engine (its workers), exit cleanly
        assert codes[proc] == 0, proc.output()[-3000:]
        assert "did not exit in time" not in proc.output()
    _assert_workers_exit(workers)


def test_greedy_outputs_match_single_process_and_no_block_leaks(cluster, reference):
    name, p, d, r, workers = cluster
    assert [len(w) for w in workers.values()] == [tp * pp - 1 for tp, pp in map(_sizes, LAYOUTS[name][:2])]
    prompts, expected = reference
    d_before, p_before = server_stats(d), server_stats(p)
    got = greedy_completions(r.url, prompts, MAX_TOKENS)
    assert [g[1] for g in got] == expected
    assert all(g[2] == MAX_TOKENS for g in got)
    d_after, p_after = server_stats(d), server_stats(p)
    # Every prompt's KV came over the transport: decode computed none of it and never fell back.
    assert d_after["kv_transfers_received"] - d_before["kv_transfers_received"] == len(prompts)
    assert d_after["prompt_tokens_computed"] == d_before["prompt_tokens_computed"]
    assert d_after["kv_fallbacks"] == d_before["kv_fallbacks"]
    assert p_after["prompt_tokens_computed"] > p_before["prompt_tokens_computed"]
    assert p_after["kv_bytes_sent"] - p_before["kv_bytes_sent"] == d_after["kv_bytes_received"] - d_before[
        "kv_bytes_received"]
    for stats in (d_after, p_after):
        assert stats["free_blocks"] == stats["total_blocks"]


def test_welcome_carries_both_layouts_and_prefill_refuses_what_no_mapping_covers(cluster):
    name, p, d, _, _ = cluster
    [pw] = query_server(p.address, [Hello(ServerInfo("t", "e", "router", "m"))], 1, timeout_s=30)
    [dw] = query_server(d.address, [Hello(ServerInfo("t", "e", "router", "m"))], 1, timeout_s=30)
    assert isinstance(pw, Welcome) and isinstance(dw, Welcome)
    for info, flags in ((pw.info, LAYOUTS[name][0]), (dw.info, LAYOUTS[name][1])):
        assert (info.tensor_parallel_size, info.pipeline_parallel_size) == _sizes(flags)
    # The wire layout is the whole model's on both sides, so the hashes agree across TP sizes.
    assert pw.info.layout == dw.info.layout and pw.info.compat_hash == dw.info.compat_hash
    assert (pw.info.layout.num_kv_heads, pw.info.layout.tp_size) == (2, 1)

    # A decode peer whose layout no mapping covers is refused before any KV moves, naming the field.
    for i, (field, value) in enumerate((("block_size", 32), ("head_dim", 8), ("num_kv_heads", 4),
                                        ("model", "other:model"))):
        peer = PeerRef.of(dataclasses.replace(dw.info, layout=dataclasses.replace(pw.info.layout, **{field: value})))
        prefill = Prefill(f"r{i}", f"t{i}", [1, 2, 3], SamplingParams(max_tokens=1), peer)
        [done] = query_server(p.address, [prefill], 1, timeout_s=30)
        assert isinstance(done, PrefillDone) and not done.ok and field in done.error, done


def test_colocated_server_with_tensor_parallelism(model, reference):
    prompts, expected = reference
    s = ServerProcess("serve", model, "--num-kv-blocks", NUM_BLOCKS, "--served-model-name", "llama", *CPU,
                      "--tensor-parallel-size", "2")
    workers: dict[ServerProcess, set[int]] = {}
    try:
        s.wait_ready()
        workers = {s: child_pids(s.proc.pid)}
        assert len(workers[s]) == 1
        got = greedy_completions(s.url, prompts[:4], MAX_TOKENS)
        assert [g[1] for g in got] == expected[:4]
    finally:
        code = s.stop()
    assert code == 0 and "did not exit in time" not in s.output(), s.output()[-3000:]
    _assert_workers_exit(workers)


# ---- the runner's KV in / out, in one process per engine (no servers) -----------------------------------------
RUNNER_CASES = {
    "tp2": (dict(), dict(tensor_parallel_size=2)),
    "pp2-3layers": (dict(num_layers=3), dict(pipeline_parallel_size=2)),
    # One KV head replicated on both TP ranks of each of two stages: four ranks.
    "tp2-pp2-mqa": (dict(num_kv_heads=1, num_layers=3), dict(tensor_parallel_size=2, pipeline_parallel_size=2)),
}


def _kv_out(engine: LLMEngine, request_id: str, prompt: list[int], blocks: list[int] | None = None):
    """Run ``prompt`` streaming KV out; per layer, the whole model's KV of ``blocks`` (default: the prompt's).

    Also reads a second, one-block list each layer, to check lists are kept apart.
    """
    runner, got = engine.runner, {}
    engine.add_request(request_id, prompt, SamplingParams(max_tokens=1, temperature=0))

    def on_schedule(sched):
        req = sched.chunks[0].request
        assert blocks is None or not set(blocks) & set(req.block_ids), "test blocks must not be the prompt's"
        ids = torch.tensor(req.block_ids if blocks is None else blocks)
        runner.plan_gather([ids, ids[-1:]])

        def hook(layer: int) -> None:
            out = torch.empty(runner.slab_shape(len(ids))[1:], dtype=runner.dtype).unsqueeze(0)
            last = torch.empty(runner.slab_shape(1)[1:], dtype=runner.dtype).unsqueeze(0)
            runner.gather_layer(layer, 0, out)
            runner.gather_layer(layer, 1, last)
            assert torch.equal(last, out[:, :, -1:])
            got[layer] = out

        return hook

    while engine.has_unfinished_requests():
        engine.step(on_schedule=on_schedule)
    return got


@pytest.mark.parametrize("case", list(RUNNER_CASES))
def test_runner_merges_kv_heads_out_and_splits_them_in(tiny_model, case):
    ckpt_kw, parallel_kw = RUNNER_CASES[case]
    path = tiny_model("llama", **ckpt_kw)
    ref = LLM(path, show_progress=False, num_kv_blocks=24, device="cpu").engine
    par = LLM(path, show_progress=False, num_kv_blocks=24, device="cpu", **parallel_kw).engine
    try:
        num_layers = par.model_config.num_layers
        # Out: every layer's KV of a 3-block prompt, all heads, as the single-process engine has it.
        prompt = list(range(5, 45))
        expected, got = _kv_out(ref, "p", prompt), _kv_out(par, "p", prompt)
        assert sorted(got) == list(range(num_layers))
        for layer in range(num_layers):
            assert (got[layer] - expected[layer]).abs().max().item() < 1e-4, layer
        # In: a whole-model slab written in two layer ranges lands in every rank's slice.
        blocks = [par.num_total_blocks - 1, par.num_total_blocks - 4]
        slab = torch.randn(par.runner.slab_shape(len(blocks)), dtype=par.runner.dtype)
        ids = torch.tensor(blocks)
        par.runner.scatter_layers(slab[:1].contiguous(), ids, 0, 1)
        par.runner.scatter_layers(slab[1:].contiguous(), ids, 1, num_layers)
        back = _kv_out(par, "x", [7], blocks)
        for layer in range(num_layers):
            assert torch.equal(back[layer], slab[layer:layer + 1]), layer
        assert par.num_free_blocks == par.num_total_blocks
    finally:
        par.close()
