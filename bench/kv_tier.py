"""Multi-turn conversations on device pools too small to keep them: host KV tier off vs on vs on + pulls.

    python -m bench.kv_tier [--quick] [--conversations N] [--repeats R] [--record]

Two decode servers (native executor, each prefilling its own requests, KV over ZeroMQ) behind the cluster
router, in one process with this script. A seeded workload of ``--conversations`` conversations shares one
system prompt (1024 tokens here, the issue's 2k scaled to two CPU cores); each opens with a long document of
its own, then comes back with short follow-ups. Conversation i starts at ``i x gap_s``; each next turn arrives
``think_s`` after the previous reply ended (``num_conversations x gap_s``: every other conversation runs in
between), so by the time a conversation returns, other traffic has evicted it from a device pool that holds
the system prompt and about three conversations. Three configurations, fresh servers each:

- ``off``: no host tier: a returning conversation recomputes everything after the shared system prompt;
- ``host``: ``--host-kv-gib`` on both servers: its blocks come back from the host tier;
- ``host+pulls``: the same, and the router may plan pulls of a prefix another server holds (``--kv-pulls``).

Measured per configuration: TTFT p50 / p99 of every request, of returning conversations (turn >= 2) and of first
turns, prompt tokens prefilled (the servers' ``prompt_tokens_computed``) and where the rest came from (device hits,
host tier, pulls). Configurations run in alternating order over ``--repeats`` rounds (off, host, pulls, then
pulls, host, off, ...) and their requests are pooled: the machine is shared, so a slow minute lands on every
configuration alike.

Prediction: before the runs, the component costs are measured on the same servers: prefill time against
prompt length (TTFT of cold prompts, fitted ``a + b t + c t^2``), a decode step (inter-token gap), a host-tier
load per token (the tier's own copy path on a pool of the servers' shape), and a pull's fixed and per-byte cost
(two real pulls between the servers). ``bench.router_sim`` then replays the same trace (start times, lengths,
think times) on two simulated servers with those costs, the same pool sizes and the router's real scoring, and
its TTFT and prefill tokens stand next to the measured ones. The router is given the same measured costs as
its priors (it keeps learning from the servers' reports).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from duet.bench.router_sim import Conversation, SimConfig, Simulation, Turn
from duet.engine.block_hash import block_hashes
from duet.engine.launcher import ServerProcess, query_server
from duet.engine.protocol import Generate, Hello, PeerRef, PullKV, RemotePull, ServerInfo
from duet.engine.router.cluster import ClusterDispatcher
from duet.engine.router.dispatcher import DispatchError, GenerateRequest
from duet.engine.router.scoring import RouterPolicy
from duet.engine.router.tier_cost import TierPolicy
from duet.engine.sampling_params import SamplingParams
from duet.engine.tools.make_tiny_model import make_tiny_model

logger = logging.getLogger(__name__)

MODEL = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768, vocab_size=4096,
             max_position_embeddings=4096)
BLOCK = 16
MIN_TOKEN, MAX_TOKEN = 5, 4096
CONFIGS = ("off", "host", "host+pulls")
HEARTBEAT_S = 2.0
"""What the router expects (servers beat every 0.2 s): 6 s of silence before a server counts as dead, since on
a shared 2-core machine a long prefill step can hold a server's heartbeat thread back for a second."""


@dataclass(frozen=True)
class Workload:
    num_conversations: int = 24
    num_turns: int = 3
    system_tokens: int = 1024
    doc_tokens: tuple[int, int] = (384, 640)
    followup_tokens: tuple[int, int] = (32, 64)
    reply_tokens: int = 16
    gap_s: float = 0.6
    """Between two conversations' first turns."""
    device_blocks: int = 192
    """Per server: the system prompt (64 blocks) and about three conversations."""
    host_gib: float = 0.25
    seed: int = 0

    @property
    def think_s(self) -> float:
        return self.num_conversations * self.gap_s

    def turns(self) -> list[list[list[int]]]:
        """Per conversation, the user tokens of each turn (the first starts with the shared system prompt)."""
        rng = random.Random(self.seed)
        tok = lambda n: [rng.randrange(MIN_TOKEN, MAX_TOKEN) for _ in range(n)]  # noqa: E731
        system = tok(self.system_tokens)
        return [[system + tok(rng.randint(*self.doc_tokens))]
                + [tok(rng.randint(*self.followup_tokens)) for _ in range(self.num_turns - 1)]
                for _ in range(self.num_conversations)]


QUICK = Workload(num_conversations=6, num_turns=2, system_tokens=256, doc_tokens=(128, 192), followup_tokens=(16, 32),
                 reply_tokens=4, gap_s=0.3, device_blocks=64, host_gib=0.05)
GREEDY = dict(temperature=0.0, ignore_eos=True)


# ---- servers and the router -------------------------------------------------------------------------------------


def start_servers(model: str, w: Workload, host: bool) -> list[ServerProcess]:
    args = ["--kv-transport", "zmq", "--num-kv-blocks", str(w.device_blocks), "--max-num-batched-tokens", "4096",
            "--max-model-len", "4096"]
    if host:
        args += ["--host-kv-gib", str(w.host_gib)]
    procs = [ServerProcess("decode", model, *args) for _ in range(2)]
    for p in procs:
        p.wait_ready(300)
    return procs


def stop(procs: list[ServerProcess]) -> None:
    for p in procs:
        p.stop()


def router_policy(costs: dict, pulls: bool) -> RouterPolicy:
    return RouterPolicy(prior_overhead_s=max(costs["prefill_a_s"], 1e-3), prior_tokens_per_s=1 / costs["prefill_b_s"],
                        prior_quadratic_s_per_token2=costs["prefill_c_s"], tiers=TierPolicy(
                            pulls=pulls, host_load_s_per_token=costs["host_load_s_per_token"],
                            pull_overhead_s=costs["pull_overhead_s"], pull_bytes_per_s=costs["pull_bytes_per_s"]))


async def server_totals(disp: ClusterDispatcher) -> dict[str, float]:
    totals: dict[str, float] = {}
    for stats in (await disp.server_stats(timeout_s=30)).values():
        for key, value in asdict(stats.values).items():
            totals[key] = totals.get(key, 0) + value
    return totals


async def generate(disp, rid: str, prompt: list[int], max_tokens: int) -> tuple[float | None, list[int], str | None]:
    """(TTFT in seconds, output tokens, error) of one greedy request through the router."""
    t0 = time.perf_counter()
    ttft, out, error = None, [], None
    try:
        async for delta in disp.generate(GenerateRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))):
            if delta.token_ids and ttft is None:
                ttft = time.perf_counter() - t0
            out += delta.token_ids
            if delta.error:
                error = delta.error
    except DispatchError as e:
        error = str(e)
    return ttft, out, error


async def run_config(name: str, model: str, w: Workload, costs: dict, turns: list[list[list[int]]],
                     tag: str) -> tuple[list[dict], dict]:
    """One configuration on fresh servers: every conversation of ``turns`` on its schedule."""
    procs = start_servers(model, w, host=name != "off")
    disp = ClusterDispatcher([], [p.address for p in procs], "m", router_policy(costs, pulls=name == "host+pulls"),
                             connect_timeout_s=120, request_timeout_s=600, queue_timeout_s=120,
                             heartbeat_s=HEARTBEAT_S)
    records: list[dict] = []
    try:
        await disp.start()
        for k in range(4):  # warm both servers (first-call allocations), outside the counters
            await generate(disp, f"warm-{tag}-{k}", [MIN_TOKEN + k] * 40, 2)
        before = await server_totals(disp)
        t0 = time.monotonic()

        async def conversation(i: int) -> None:
            await asyncio.sleep(max(0.0, t0 + i * w.gap_s - time.monotonic()))
            history: list[int] = []
            for k, user in enumerate(turns[i]):
                prompt = history + user
                ttft, out, error = await generate(disp, f"{tag}-c{i}-t{k}", prompt, w.reply_tokens)
                records.append({"config": name, "conversation": i, "turn": k, "prompt_tokens": len(prompt),
                                "ttft_s": ttft, "error": error})
                history = prompt + out
                if k + 1 < len(turns[i]):
                    await asyncio.sleep(w.think_s)

        await asyncio.gather(*(conversation(i) for i in range(len(turns))))
        after = await server_totals(disp)
        counters = {k: after[k] - before.get(k, 0) for k in after}
        counters.update({f"router_{k}": v for k, v in disp.router_metrics.event_counts().items()})
        return records, counters
    finally:
        await disp.close()
        stop(procs)


# ---- calibration ----------------------------------------------------------------------------------------------


def fit_quadratic(lengths: list[int], seconds: list[float]) -> tuple[float, float, float]:
    """Least-squares ``a + b t + c t^2`` with every coefficient kept >= 0 (refit without the ones that went < 0)."""
    x = np.array(lengths, dtype=float)
    y = np.array(seconds, dtype=float)
    cols = [np.ones_like(x), x, x * x]
    keep = [0, 1, 2]
    while True:
        coef, *_ = np.linalg.lstsq(np.stack([cols[i] for i in keep], 1), y, rcond=None)
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep = [k for k, c in zip(keep, coef) if c >= 0] or [1]
    out = [0.0, 0.0, 0.0]
    for k, c in zip(keep, coef):
        out[k] = max(float(c), 0.0)
    if out[1] <= 0:
        out[1] = max(float(y.mean() / x.mean()), 1e-6)
    return out[0], out[1], out[2]


def host_load_s_per_token(model: str, w: Workload) -> float:
    """The host tier's load path (copier thread, gather from host, scatter into the pool) on a pool of the
    servers' shape: seconds per token, median of a few 32-block loads."""
    from duet.engine.block_manager import BlockManager
    from duet.engine.kv_tier.host_tier import HostKVTier
    from duet.engine.kv_tier.kv_fetch import FetchPart, KVFetch
    from duet.engine.request import Request

    head_dim = MODEL["hidden_size"] // MODEL["num_heads"]
    kv = torch.zeros(MODEL["num_layers"], 2, w.device_blocks, BLOCK, MODEL["num_kv_heads"], head_dim)
    bm = BlockManager(w.device_blocks, BLOCK)
    tier = HostKVTier(bm, kv, 64)
    for i in range(32):  # 32 cached host blocks (their bytes do not matter to the copy)
        tier.pool.end_write(tier.pool.begin_write(1000 + i, 0, (i,)), ok=True)
    samples = []
    try:
        for k in range(5):
            req = Request(f"cal{k}", list(range(32 * BLOCK + 1)), SamplingParams(max_tokens=1))
            assert bm.allocate(req, 32 * BLOCK)
            fetch = KVFetch(req, 0, [FetchPart("host", 0, 32)])
            t0 = time.perf_counter()
            tier.load(fetch, [tier.pool.find(1000 + i, (i,)) for i in range(32)])
            while not tier.poll():
                time.sleep(1e-4)
            samples.append((time.perf_counter() - t0) / (32 * BLOCK))
            bm.free(req)
    finally:
        tier.close()
    return statistics.median(samples)


def calibrate(model: str, w: Workload, quick: bool) -> dict:
    """Component costs measured on two fresh tier-on servers (see the module docstring)."""
    procs = start_servers(model, w, host=True)
    rng = random.Random(w.seed + 99)
    try:
        costs: dict = {}

        async def prefill_and_decode() -> None:
            disp = ClusterDispatcher([], [procs[0].address], "m", RouterPolicy(), connect_timeout_s=120,
                                     heartbeat_s=HEARTBEAT_S)
            await disp.start()
            try:
                await generate(disp, "cal-warm", [MIN_TOKEN] * 40, 2)
                lengths, seconds = [], []
                top = w.system_tokens + w.doc_tokens[1] + w.num_turns * (w.followup_tokens[1] + w.reply_tokens)
                for length in sorted({16, 64, 256, top // 2, top} if not quick else {16, 64, top}):
                    samples = []
                    for rep in range(3):
                        prompt = [rng.randrange(MIN_TOKEN, MAX_TOKEN) for _ in range(length)]
                        samples.append((await generate(disp, f"cal-{length}-{rep}", prompt, 1))[0])
                    lengths.append(length)
                    seconds.append(statistics.median(samples))  # the machine is shared: one slow sample is noise
                costs["prefill_a_s"], costs["prefill_b_s"], costs["prefill_c_s"] = fit_quadratic(lengths, seconds)
                costs["prefill_samples"] = list(zip(lengths, seconds))
                t0 = time.perf_counter()
                ttft, out, _ = await generate(disp, "cal-decode", [MIN_TOKEN + 1] * 32, 33)
                costs["decode_step_s"] = (time.perf_counter() - t0 - ttft) / max(len(out) - 1, 1)
            finally:
                await disp.close()

        asyncio.run(prefill_and_decode())
        costs["host_load_s_per_token"] = host_load_s_per_token(model, w)
        costs.update(calibrate_pulls(procs, rng, 4 if quick else 96))
        return costs
    finally:
        stop(procs)


def calibrate_pulls(procs: list[ServerProcess], rng: random.Random, big_blocks: int, repeats: int = 3) -> dict:
    """Pulls from server 0 to server 1, ``repeats`` of 4 blocks and of ``big_blocks`` blocks: the fixed cost and
    the bandwidth, from the medians (a pull's seconds run from the owner's admission to its last WRITE)."""
    hello = Hello(ServerInfo("bench", "e", "router", "m"))
    a, b = (query_server(p.address, [hello], 1, timeout_s=60)[0].info for p in procs)
    points: dict[int, list[tuple[int, float]]] = {4: [], big_blocks: []}
    for k in range(repeats):
        for num_blocks in points:
            prompt = [rng.randrange(MIN_TOKEN, MAX_TOKEN) for _ in range(num_blocks * BLOCK + 1)]
            params = SamplingParams(max_tokens=1, **GREEDY)
            query_server(procs[0].address, [Generate(f"pc{k}-{num_blocks}", prompt, params)], 1, 120)
            done = {}
            tid = f"cal-pull-{k}-{num_blocks}"
            serve = threading.Thread(target=lambda: done.update(msg=query_server(procs[0].address, [
                PullKV(tid, tid, prompt[:num_blocks * BLOCK], PeerRef.of(b), 60)], 1, timeout_s=120)[0]))
            serve.start()
            query_server(procs[1].address, [Generate(tid, prompt, params,
                                                     pull=RemotePull(PeerRef.of(a), tid, num_blocks, 60))], 1, 120)
            serve.join()
            if not done["msg"].ok:
                raise RuntimeError(f"calibration pull failed: {done['msg'].error}")
            points[num_blocks].append((done["msg"].num_bytes, done["msg"].seconds))
    (small_bytes, small_s), (big_bytes, big_s) = ((p[0][0], statistics.median(s for _, s in p)) for p in points.values())
    per_byte = (big_s - small_s) / max(big_bytes - small_bytes, 1)
    if per_byte <= 0:  # the difference drowned in noise: charge everything to the bandwidth of the big pulls
        per_byte = big_s / big_bytes
    return {"pull_overhead_s": max(small_s - small_bytes * per_byte, 0.0), "pull_bytes_per_s": 1 / per_byte,
            "pull_samples": {n: p for n, p in points.items()}}


# ---- the simulator's prediction -----------------------------------------------------------------------------


def predict(w: Workload, costs: dict, turns: list[list[list[int]]], config: str) -> list[dict]:
    """``bench.router_sim`` on the same trace: per request (turn, TTFT, prompt tokens prefilled)."""
    head_dim = MODEL["hidden_size"] // MODEL["num_heads"]
    kv_bytes_per_token = MODEL["num_layers"] * 2 * MODEL["num_kv_heads"] * head_dim * 4
    host_blocks = int(w.host_gib * (1 << 30)) // (kv_bytes_per_token * BLOCK) if config != "off" else 0
    rng = np.random.default_rng(w.seed + 7)
    trace = []
    for i, conv_turns in enumerate(turns):
        stream: list[int] = []
        sim_turns = []
        for k, user in enumerate(conv_turns):
            stream += user
            sim_turns.append(Turn(len(stream), w.reply_tokens, w.think_s))
            stream += rng.integers(MIN_TOKEN, MAX_TOKEN, w.reply_tokens).tolist()  # its reply, as tokens
        trace.append(Conversation(i, i * w.gap_s, block_hashes(stream, BLOCK), sim_turns))
    cfg = SimConfig(num_prefill=0, num_decode=2, duration_s=10 * (w.num_conversations * w.gap_s + w.num_turns * w.think_s),
                    block_size=BLOCK, decode_blocks=w.device_blocks, prefill_blocks=1, max_tokens=w.reply_tokens,
                    vocab_size=MAX_TOKEN, slow_fraction=0.0, prefill_a_s=costs["prefill_a_s"],
                    prefill_b_s_per_token=costs["prefill_b_s"], prefill_c_s_per_token2=costs["prefill_c_s"],
                    prefill_noise=0.0, decode_step_s=costs["decode_step_s"], decode_step_s_per_seq=0.0,
                    decode_step_s_per_token=0.0, ttft_budget_s=600.0, host_blocks=host_blocks,
                    host_load_s_per_token=costs["host_load_s_per_token"], pull_overhead_s=costs["pull_overhead_s"],
                    pull_s_per_token=kv_bytes_per_token / costs["pull_bytes_per_s"], seed=w.seed)
    policy = router_policy(costs, pulls=config == "host+pulls")
    policy = replace(policy, tiers=replace(policy.tiers, kv_bytes_per_token=kv_bytes_per_token))
    sim = Simulation(cfg, policy, trace)
    sim.run()
    return [{"turn": r.turn_idx, "ttft_s": r.ttft_s, "computed_tokens": r.computed_tokens,
             "host_tokens": r.tier_tokens[0], "pulled_tokens": r.tier_tokens[1]} for r in sim.done]


# ---- report -------------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(config: str, records: list[dict], counters: list[dict], predicted: list[dict]) -> dict:
    ok = [r for r in records if r["error"] is None and r["ttft_s"] is not None]
    back = [r["ttft_s"] for r in ok if r["turn"] > 0]
    first = [r["ttft_s"] for r in ok if r["turn"] == 0]
    mean = lambda key: statistics.fmean(c.get(key, 0) for c in counters)  # noqa: E731 - per round
    computed, device = mean("prompt_tokens_computed"), mean("prefix_hit_tokens")
    host, pulled = mean("host_hit_tokens"), mean("pulled_tokens")
    prompt = computed + device + host + pulled
    p_back = [r["ttft_s"] for r in predicted if r["turn"] > 0]
    return {
        "config": config, "requests": len(records), "errors": len(records) - len(ok),
        "ttft_p50_ms": 1e3 * pct([r["ttft_s"] for r in ok], 50), "ttft_p99_ms": 1e3 * pct([r["ttft_s"] for r in ok], 99),
        "returning_ttft_p50_ms": 1e3 * pct(back, 50), "returning_ttft_p99_ms": 1e3 * pct(back, 99),
        "first_turn_ttft_p50_ms": 1e3 * pct(first, 50),
        "prefill_tokens_computed": computed, "device_hit_tokens": device, "host_hit_tokens": host,
        "pulled_tokens": pulled, "served_from_device": device / prompt if prompt else 0.0,
        "served_from_host": host / prompt if prompt else 0.0, "served_from_pulls": pulled / prompt if prompt else 0.0,
        "pulls_planned": mean("router_pulls_planned"), "pulls_failed": mean("router_pulls_failed"),
        "host_load_ms_mean": 1e3 * mean("host_load_seconds_sum") / max(mean("host_hits"), 1),
        "sim_returning_ttft_p50_ms": 1e3 * pct(p_back, 50), "sim_returning_ttft_p99_ms": 1e3 * pct(p_back, 99),
        "sim_ttft_p50_ms": 1e3 * pct([r["ttft_s"] for r in predicted], 50),
        "sim_prefill_tokens_computed": float(sum(r["computed_tokens"] for r in predicted)),
    }


COLUMNS = ["config", "requests", "errors", "returning_ttft_p50_ms", "sim_returning_ttft_p50_ms", "returning_ttft_p99_ms",
           "sim_returning_ttft_p99_ms", "first_turn_ttft_p50_ms", "ttft_p50_ms", "ttft_p99_ms",
           "prefill_tokens_computed", "sim_prefill_tokens_computed", "served_from_device", "served_from_host",
           "served_from_pulls", "pulls_planned", "speedup_returning_p50"]


def plot_rows(rows: list[dict]):
    def plot(ax) -> None:
        xs = np.arange(len(rows))
        width = 0.2
        for j, (key, label) in enumerate((("returning_ttft_p50_ms", "returning p50 (measured)"),
                                          ("sim_returning_ttft_p50_ms", "returning p50 (simulated)"),
                                          ("returning_ttft_p99_ms", "returning p99 (measured)"),
                                          ("sim_returning_ttft_p99_ms", "returning p99 (simulated)"))):
            ax.bar(xs + (j - 1.5) * width, [r[key] for r in rows], width, label=label,
                   hatch="//" if "sim" in key else None, alpha=0.6 if "sim" in key else 1.0)
        ax.set_xticks(xs, [r["config"] for r in rows])
        ax.set_ylabel("TTFT (ms)")
        ax.set_yscale("log")
        tokens = ax.twinx()
        tokens.plot(xs, [r["prefill_tokens_computed"] for r in rows], "ko-", label="prefill tokens (measured)")
        tokens.plot(xs, [r["sim_prefill_tokens_computed"] for r in rows], "kx--", label="prefill tokens (simulated)")
        tokens.set_ylabel("prompt tokens prefilled per round")
        tokens.set_ylim(bottom=0)
        handles = ax.get_legend_handles_labels()[0] + tokens.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper right")

    return plot


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small workload (tests, smoke runs)")
    ap.add_argument("--conversations", type=int)
    ap.add_argument("--repeats", type=int, default=2, help="rounds over the configurations, in alternating order")
    from duet.bench.report import add_record_arg, write_results

    add_record_arg(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    w = QUICK if args.quick else Workload()
    if args.conversations:
        w = replace(w, num_conversations=args.conversations)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    model = str(make_tiny_model("llama", Path(tempfile.mkdtemp(prefix="duet-kv-tier-")) / "model", **MODEL))
    turns = w.turns()
    costs = calibrate(model, w, args.quick)
    logger.warning("calibrated costs: %s", {k: v for k, v in costs.items() if not k.endswith("samples")})
    records = {c: [] for c in CONFIGS}
    counters = {c: [] for c in CONFIGS}
    order = list(CONFIGS)
    for round_idx in range(args.repeats):
        for config in order:
            recs, counts = asyncio.run(run_config(config, model, w, costs, turns, f"r{round_idx}"))
            records[config] += recs
            counters[config].append(counts)
        order.reverse()
    rows = [summarize(c, records[c], counters[c], predict(w, costs, turns, c)) for c in CONFIGS]
    base = rows[0]["returning_ttft_p50_ms"]
    for row in rows:
        row["speedup_returning_p50"] = base / row["returning_ttft_p50_ms"] if row["returning_ttft_p50_ms"] else 0.0

    write_results("kv_tier_quick" if args.quick else "kv_tier", rows, COLUMNS, device="cpu", plot=plot_rows(rows),
                  extra={"workload": asdict(w), "model": MODEL, "repeats": args.repeats, "costs": costs,
                         "order": "alternating", "requests": {c: records[c] for c in CONFIGS}, "counters": counters},
                  record=args.record)
    return rows


if __name__ == "__main__":
    main()
