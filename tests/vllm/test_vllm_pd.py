"""``--executor vllm``: vLLM V1 engines as Duet prefill and decode servers, real processes on 127.0.0.1.

Skipped where vLLM is not importable (``pip install -e .[vllm]``; see README). On a CPU-only host vLLM's
CPU attention needs head_dim in {32, 64, ...} (hence the checkpoint shape) and block_size a multiple of 32:
the vLLM servers run on their defaults (``--executor vllm`` picks block size 32 and the checkpoint's
float32 itself), the native ones get ``--block-size 32`` to pair with them. Both engines run in float32,
where vLLM's and Duet's CPU kernels give identical greedy tokens on these prompts (the assertions are exact).

Checked: vLLM prefill + vLLM decode through Duet's router equal vLLM colocated (``engine.serve --executor
vllm``) and Duet native colocated, token for token; the KV moved through Duet's connector (bytes and
per-layer sends in both servers' stats); mixed pairs (vLLM prefill -> native decode and the reverse) work;
vLLM's KV events reach the router's prefix index as Duet hashes; a vLLM prefill killed while its layers are
in flight leaves the decode side recomputing (vLLM's load-failure policy) with no block leaked.
"""
from __future__ import annotations

import signal
import threading
import time
import urllib.request
from concurrent import futures
from dataclasses import asdict

import pytest

pytest.importorskip("vllm")
psutil = pytest.importorskip("psutil")
openai = pytest.importorskip("openai")

from duet.engine.block_hash import block_hashes
from duet.engine.launcher import ServerProcess, query_server
from duet.engine.protocol import Hello, KVEvents, ServerInfo, StatsRequest, Welcome
from duet.transfer.wire import decode

pytestmark = pytest.mark.timeout(900)

BLOCK = 32
VLLM_COMMON = ("--num-kv-blocks", "64", "--max-model-len", "512", "--kv-transport", "zmq")  # default dtype, block
COMMON = VLLM_COMMON + ("--block-size", str(BLOCK))
SERVE = tuple(a for a in COMMON if a not in ("--kv-transport", "zmq"))
VLLM_SERVE = tuple(a for a in VLLM_COMMON if a not in ("--kv-transport", "zmq"))
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_LOGGING_LEVEL": "WARNING"}
NUM_LAYERS = 2


def prompts(n: int, offset: int = 0) -> list[list[int]]:
    return [[5 + (i * 31 + j * 7 + offset) % 480 for j in range(3 + (i * 29) % 90)] for i in range(n)]


def stats(proc: ServerProcess) -> dict[str, float]:
    [reply] = query_server(proc.address, [StatsRequest(1)], 1, timeout_s=30)
    return asdict(reply.values)


def vllm_server(module: str, model: str, *args: str) -> ServerProcess:
    return ServerProcess(module, model, "--executor", "vllm", *args, env=VLLM_ENV)


def router(model: str, prefill: ServerProcess, decode: ServerProcess) -> ServerProcess:
    # Two vLLM servers (each with its engine-core process) share CI's 2 cores: one was seen silent for over
    # 0.6 s (3 x the default 0.2 s heartbeat) under 8 concurrent requests. 3 x 0.5 s tolerates that.
    return ServerProcess("router", model, "--prefill", prefill.address, "--decode", decode.address,
                         "--served-model-name", "llama", "--disagg-threshold-tokens", "0", "--heartbeat-s", "0.5")


def kill_tree(proc: ServerProcess) -> None:
    """SIGKILL a server and the vLLM processes under it (they would notice their parent's death, slowly)."""
    parent = psutil.Process(proc.proc.pid)
    for p in [*parent.children(recursive=True), parent]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.proc.wait(30)


def greedy(url: str, batch: list[list[int]], max_tokens: int = 10) -> list[tuple[list[str], str]]:
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def one(p):
        r = c.completions.create(model="llama", prompt=p, max_tokens=max_tokens, temperature=0, logprobs=0,
                                 extra_body={"ignore_eos": True})
        return r.choices[0].logprobs.tokens, r.choices[0].text

    with futures.ThreadPoolExecutor(len(batch)) as pool:
        return list(pool.map(one, batch))


def wait_idle(proc: ServerProcess, timeout_s: float = 60) -> dict[str, float]:
    """Stats once every block is free again (vLLM reports its usage after each step)."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = stats(proc)
        if s["free_blocks"] == s["total_blocks"] or time.monotonic() > deadline:
            return s
        time.sleep(0.2)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama", hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=32)


@pytest.fixture(scope="module")
def servers(model):
    """vLLM P and D, native P and D, vLLM and native colocated; routers for the four P/D pairings."""
    procs = {
        "vp": vllm_server("prefill", model, *VLLM_COMMON), "vd": vllm_server("decode", model, *VLLM_COMMON),
        "np": ServerProcess("prefill", model, *COMMON), "nd": ServerProcess("decode", model, *COMMON),
        "vserve": vllm_server("serve", model, *VLLM_SERVE, "--served-model-name", "llama"),
        "nserve": ServerProcess("serve", model, *SERVE, "--served-model-name", "llama"),
    }
    try:
        for p in procs.values():
            p.wait_ready(600)
        procs["r_vv"] = router(model, procs["vp"], procs["vd"])
        procs["r_vn"] = router(model, procs["vp"], procs["nd"])
        procs["r_nv"] = router(model, procs["np"], procs["vd"])
        for name in ("r_vv", "r_vn", "r_nv"):
            procs[name].wait_ready(120)
        yield procs
    finally:
        for p in procs.values():
            p.stop(30)


def test_vllm_pd_matches_vllm_and_native_colocated(servers):
    batch = prompts(8)
    vp, vd = servers["vp"], servers["vd"]
    p0, d0 = stats(vp), stats(vd)
    disagg = greedy(servers["r_vv"].url, batch)
    vllm_coloc = greedy(servers["vserve"].url, batch)
    native_coloc = greedy(servers["nserve"].url, batch)
    assert disagg == vllm_coloc == native_coloc
    p1, d1 = wait_idle(vp), wait_idle(vd)
    # The KV crossed Duet's transport, one WRITE per layer per request.
    assert p1["kv_transfers_sent"] - p0["kv_transfers_sent"] == len(batch)
    assert p1["kv_layer_sends"] - p0["kv_layer_sends"] == len(batch) * NUM_LAYERS
    assert p1["kv_bytes_sent"] > p0["kv_bytes_sent"]
    assert d1["kv_transfers_received"] - d0["kv_transfers_received"] == len(batch)
    assert d1["kv_bytes_received"] - d0["kv_bytes_received"] == p1["kv_bytes_sent"] - p0["kv_bytes_sent"]
    assert d1["kv_transfers_failed"] == d0["kv_transfers_failed"]
    # vLLM counts every prompt token of these requests as external (it recomputes the last one, uncounted).
    assert d1["prompt_tokens_computed"] == d0["prompt_tokens_computed"]
    assert d1["prompt_tokens_external"] - d0["prompt_tokens_external"] == sum(map(len, batch))
    for s in (p1, d1):
        assert s["free_blocks"] == s["total_blocks"] > 0


@pytest.mark.parametrize("pair", ["r_vn", "r_nv"], ids=["vllm_prefill-native_decode", "native_prefill-vllm_decode"])
def test_mixed_pairs_work(servers, pair):
    batch = prompts(4, offset=3)
    decode = servers["nd"] if pair == "r_vn" else servers["vd"]
    d0 = stats(decode)
    assert greedy(servers[pair].url, batch) == greedy(servers["nserve"].url, batch)
    d1 = wait_idle(decode)
    assert d1["kv_transfers_received"] - d0["kv_transfers_received"] == len(batch)
    assert d1["kv_fallbacks" if pair == "r_vn" else "kv_transfers_failed"] == \
        d0["kv_fallbacks" if pair == "r_vn" else "kv_transfers_failed"]
    assert d1["free_blocks"] == d1["total_blocks"]


def test_kv_events_reach_the_router_prefix_index(servers):
    import zmq

    [w] = query_server(servers["vd"].address, [Hello(ServerInfo("probe", "e", "router", "llama"))], 1)
    assert isinstance(w, Welcome)
    events = []
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(w.info.event_address)
    time.sleep(0.5)  # PUB/SUB: let the subscription reach the server
    prompt = [7 + (j * 11) % 400 for j in range(3 * BLOCK + 5)]  # three full blocks
    stop = threading.Event()

    def collect():
        while not stop.is_set():
            if sub.poll(100):
                msg = decode(sub.recv())
                if isinstance(msg, KVEvents):
                    events.extend(msg.events)

    t = threading.Thread(target=collect)
    t.start()
    url = servers["r_vv"].url
    greedy(url, [prompt], 4)
    time.sleep(1.0)
    stop.set()
    t.join()
    sub.close(0)
    stored = {h for e in events if e.kind == "stored" for h in e.block_hashes}
    assert set(block_hashes(prompt, BLOCK)) <= stored  # vLLM's blocks, published under Duet's chained hashes

    # The router's index saw them too: the same prompt again is predicted to hit three blocks on the decode side.
    def predicted() -> float:
        text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
        line = next((ln for ln in text.splitlines() if ln.startswith("duet_router_prefix_hit_tokens_predicted_total")),
                    "x 0")
        return float(line.split()[-1])

    before = predicted()
    greedy(url, [prompt], 2)
    assert predicted() - before >= 3 * BLOCK


def test_killing_the_vllm_prefill_mid_transfer_recomputes_on_decode(servers, model):
    vd, nserve = servers["vd"], servers["nserve"]
    slow = vllm_server("prefill", model, *COMMON, "--debug-layer-delay-s", "3")
    r = None
    try:
        slow.wait_ready(600)
        r = router(model, slow, vd).wait_ready(120)
        d0 = stats(vd)
        batch = prompts(1, offset=11)
        with futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(greedy, r.url, batch)
            deadline = time.monotonic() + 120
            while stats(slow).get("kv_layer_sends", 0) < 1:  # layer 0 is on its way, layer 1 is not
                assert time.monotonic() < deadline, "the slow prefill never sent a layer"
                time.sleep(0.1)
            kill_tree(slow)
            result = fut.result(timeout=300)
        assert result == greedy(nserve.url, batch)
        d1 = wait_idle(vd)
        assert d1["kv_transfers_failed"] - d0["kv_transfers_failed"] == 1
        assert d1["prompt_tokens_computed"] - d0["prompt_tokens_computed"] == len(batch[0])  # recomputed locally
        assert d1["free_blocks"] == d1["total_blocks"]
    finally:
        if r is not None:
            r.stop()
        if slow.proc.poll() is None:
            kill_tree(slow)
        slow.log.close()


def test_vllm_scores_prompts_like_the_native_engine(servers):
    """echo + logprobs (prompt logprobs) from vLLM colocated and through vLLM P -> vLLM D equal the native
    engine's, position by position."""
    prompt = prompts(1, offset=5)[0]

    def echo(url: str):
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        return c.completions.create(model="llama", prompt=prompt, echo=True, logprobs=1, max_tokens=1,
                                    temperature=0).choices[0].logprobs

    want = echo(servers["nserve"].url)
    for name in ("vserve", "r_vv"):
        got = echo(servers[name].url)
        assert got.tokens == want.tokens and got.token_logprobs[0] is None
        assert all(abs(a - b) < 1e-3 for a, b in zip(got.token_logprobs[1:], want.token_logprobs[1:])), name
