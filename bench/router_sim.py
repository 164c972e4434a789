"""Discrete-event simulation of Duet's router over hundreds of servers, comparing routing policies.

``python -m bench.router_sim [--quick] [--servers N] [--duration S] [--seed K]``

The simulator runs the router's real scoring (``engine.router.scoring``) and prefix index
(``engine.router.prefix_index``) against simulated servers, on a seeded multi-turn chat trace:

- Trace (``bench.sim_trace``). A few shared system prompts, picked Zipf-like. Conversations start as a bursty Poisson
  process (on/off periods). Each turn's prompt is the previous prompt + the reply + new user text, as
  token ids, so a conversation is one token stream and its chained block hashes are computed once.
  The next turn arrives a think time after the previous reply finished (closed loop per conversation).
- Servers. Prefill cost ``(a + b*t + c*t**2) / speed`` with noise; a quarter of the servers are slower.
  A decode step costs a base + per-sequence + per-context-token term. Each server has a KV pool of
  fixed-size blocks: blocks in use, idle cached blocks in LRU order, empty slots. Allocation evicts
  LRU blocks and emits KV "removed" events; finished prefills and finished requests emit "stored"
  events for their full blocks (prompt + reply, so the next turn can hit). A decode server runs local
  prefills before decode steps (no chunking), so local prefill stalls decoding, which is the cost that
  disaggregation avoids.
- Disaggregated path: the decode server allocates first, then the prefill server prefills, the KV
  transfer tail is ``tokens * transfer_s_per_token``, the prefill server frees its blocks, and the
  first token arrives with the KV.
- KV tiers (``host_blocks`` > 0, ``bench.sim_tiers``): each server keeps a write-through host tier of that many
  blocks under its device pool; the router sees its events (tier ``host``) and prices host hits and, with
  ``RouterPolicy.tiers.pulls``, pulls from other servers; a request's host loads and pull delay the start of
  its prefill by their copy time, without occupying the server.
- Closed-loop clients (``num_clients`` > 0, the shape of ``bench.serving --concurrency N``): instead of the
  chat trace, N clients each send a request of random tokens (no shared prefix) and the next one as soon as
  the previous finishes. With ``prefill_batch_tokens`` > 0 a prefill server computes every waiting prompt
  that fits that token budget in one step, as an engine step does, and reports to the router each prompt's
  time from its admission to the end of that step, as Duet's prefill servers do (``transfer.kv_sender``):
  the cost model then sees queueing and batching as prefill time. ``--c8`` runs the measured CPU P/D
  c8 setup under the placement rule before issue 17 (``headroom``) and after (``deadline``).
- The router sees load and KV events instantly (no staleness) and reports every observed prefill time
  to the scorer's cost models. Retryable rejections wait in a bounded FIFO at the router, retried
  every ``retry_interval_s``. When that FIFO is full, the request gets a 429 and its conversation ends.

Metrics per policy: prefix-hit rate (prompt tokens not recomputed / prompt tokens), TTFT p50/p90/p99,
load imbalance (coefficient of variation and max/mean of per-server busy time), disaggregated vs
local-prefill counts, 429s, and the median relative error of the router's predicted TTFT.
"""
from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Callable

from duet.engine.router.prefix_index import PrefixIndex
from duet.bench.sim_trace import Conversation, Turn, make_trace  # noqa: F401 - Turn: re-exported
from duet.engine.router.scoring import POLICIES, Decision, RequestInfo, RouterPolicy, Scorer, ServerState
from duet.engine.router.tier_cost import TierPolicy


@dataclass(frozen=True)
class SimConfig:
    num_prefill: int = 64
    num_decode: int = 192
    duration_s: float = 30.0
    """Conversations start and turns arrive only before this; the run then drains."""
    conversations_per_s: float = 600.0
    """Mean rate of new conversations (bursts above, lulls below)."""
    burst_factor: float = 2.5
    """Arrival rate during an 'on' period relative to the mean ('off' periods run at 0.2x the mean)."""
    burst_period_s: float = 4.0
    """Mean length of an on period plus an off period, halved."""
    mean_turns: float = 5.0
    mean_think_s: float = 6.0
    num_system_prompts: int = 4
    block_size: int = 16
    prefill_blocks: int = 4096
    decode_blocks: int = 4096
    max_tokens: int = 512
    vocab_size: int = 32_000
    slow_fraction: float = 0.25
    slow_speed: float = 0.6
    prefill_a_s: float = 0.008
    prefill_b_s_per_token: float = 1 / 20_000
    prefill_c_s_per_token2: float = 2e-9
    prefill_noise: float = 0.05
    decode_step_s: float = 0.010
    decode_step_s_per_seq: float = 0.00015
    decode_step_s_per_token: float = 2e-8
    transfer_s_per_token: float = 2e-6
    transfer_latency_s: float = 0.002
    ttft_budget_s: float = 20.0
    router_queue_limit: int = 512
    retry_interval_s: float = 0.05
    host_blocks: int = 0
    """KV tiers: host-tier blocks per server (0 = no host tier; see ``bench.sim_tiers``)."""
    host_load_s_per_token: float = 2e-6
    pull_overhead_s: float = 0.01
    pull_s_per_token: float = 2e-6
    num_clients: int = 0
    """> 0: closed-loop clients with independent random prompts instead of the chat trace."""
    requests_per_client: int = 16
    client_prompt_len: int = 512
    client_output_len: int = 64
    prefill_batch_tokens: int = 0
    """> 0: prefill servers batch waiting prompts up to this many tokens per step and report each prompt's
    admission-to-step-end time (see the module docstring); 0: one prompt at a time, its own compute time."""
    seed: int = 0


@dataclass
class SimRequest:
    conv: Conversation
    turn_idx: int
    arrival_s: float
    info: RequestInfo
    decision: Decision | None = None
    computed_tokens: int = 0  # prompt tokens actually prefilled (the rest were cache hits)
    generated: int = 0
    ttft_s: float = math.nan
    reply_len: int = 0
    finish_s: float = math.nan
    d_blocks: tuple[int, int] = (0, 0)  # (cached prefix blocks held, anonymous blocks held) on decode
    p_blocks: tuple[int, int] = (0, 0)
    tier_tokens: tuple[int, int] = (0, 0)  # KV tiers: prompt tokens loaded from the host tier, pulled

    @property
    def turn(self) -> Turn:
        return self.conv.turns[self.turn_idx]


class BlockPool:
    """A server's KV pool: referenced cached blocks, idle cached blocks (LRU), anonymous blocks."""

    def __init__(self, server_id: str, total: int, index: PrefixIndex) -> None:
        self.server_id, self.total, self.index = server_id, total, index
        self.ref: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.num_anon = 0

    @property
    def num_free(self) -> int:  # what the server reports: idle cached blocks count as free
        return self.total - len(self.ref) - self.num_anon

    def acquire(self, hashes: list[int], num_blocks: int) -> int | None:
        """Take ``num_blocks`` blocks for a request: its cached prefix of ``hashes`` (pinned) plus fresh
        ones. Returns the number of cached prefix blocks, or None (nothing taken) if the pool lacks room."""
        m = 0
        while m < len(hashes) and (hashes[m] in self.ref or hashes[m] in self.lru):
            m += 1
        num_anon = num_blocks - m
        num_idle_hits = sum(1 for h in hashes[:m] if h in self.lru)
        if self.total - len(self.ref) - self.num_anon - num_idle_hits < num_anon:
            return None
        for h in hashes[:m]:
            if h in self.lru:
                del self.lru[h]
                self.ref[h] = 1
            else:
                self.ref[h] += 1
        evicted = []
        while self.total - len(self.ref) - self.num_anon - len(self.lru) < num_anon:
            evicted.append(self.lru.popitem(last=False)[0])
        if evicted:
            self.index.removed(self.server_id, evicted)
        self.num_anon += num_anon
        return m

    def promote(self, hashes: list[int]) -> None:
        """Anonymous blocks now hold these full blocks: they enter the cache (KV 'stored' event)."""
        stored = []
        for h in hashes:
            self.num_anon -= 1
            if h in self.ref:  # someone stored the same block meanwhile: ours is a duplicate, freed
                self.ref[h] += 1
            elif h in self.lru:
                del self.lru[h]
                self.ref[h] = 1
            else:
                self.ref[h] = 1
                stored.append(h)
        if stored:
            self.index.stored(self.server_id, stored)

    def release(self, hashes: list[int], num_anon: int) -> None:
        for h in hashes:
            n = self.ref[h] - 1
            if n:
                self.ref[h] = n
            else:
                del self.ref[h]
                self.lru[h] = None
        self.num_anon -= num_anon


@dataclass
class SimServer:
    state: ServerState
    pool: BlockPool
    speed: float
    prefill_queue: deque = field(default_factory=deque)  # (request, num_tokens, remote, admitted_s)
    waiting: deque = field(default_factory=deque)  # admitted by the router, waiting for KV blocks
    running: list = field(default_factory=list)
    queued_tokens: int = 0  # prompt tokens in prefill_queue + waiting
    running_tokens: int = 0  # context tokens of running
    busy: bool = False
    busy_s: float = 0.0


class Simulation:
    def __init__(self, cfg: SimConfig, policy: RouterPolicy, trace: list[Conversation]) -> None:
        self.cfg, self.trace = cfg, trace
        self.rng = random.Random(cfg.seed + 1)
        self.index = PrefixIndex()
        self.scorer = Scorer(policy)
        self.events: list = []
        self.seq = 0
        self.now = 0.0
        self.servers: dict[str, SimServer] = {}
        fleet = (("prefill", cfg.num_prefill, cfg.prefill_blocks), ("decode", cfg.num_decode, cfg.decode_blocks))
        for role, n, blocks in fleet:
            for i in range(n):
                sid = f"{role[0]}{i:04d}"
                speed = cfg.slow_speed if self.rng.random() < cfg.slow_fraction else 1.0
                state = ServerState(sid, role=role, block_size=cfg.block_size, total_blocks=blocks, free_blocks=blocks)
                self.servers[sid] = SimServer(state, self._pool(sid, blocks), speed)
        self.states = [s.state for s in self.servers.values()]
        self.router_queue: deque[SimRequest] = deque()
        self.retry_scheduled = False
        self.done: list[SimRequest] = []
        self.num_rejected = 0
        self.num_queued = 0
        self.reject_reasons: dict[str, int] = {}

    def _pool(self, server_id: str, blocks: int) -> BlockPool:
        cfg = self.cfg
        if not cfg.host_blocks:
            return BlockPool(server_id, blocks, self.index)
        from duet.bench.sim_tiers import TieredBlockPool

        return TieredBlockPool(server_id, blocks, self.index, cfg.host_blocks, cfg.block_size,
                               cfg.host_load_s_per_token, cfg.pull_overhead_s, cfg.pull_s_per_token)

    # --- event loop -----------------------------------------------------------------------------

    def at(self, t: float, fn: Callable, *args: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, fn, args))

    def run(self) -> dict:
        for conv in self.trace:
            self.at(conv.start_s, self.arrive, conv, 0)
        while self.events:
            self.now, _, fn, args = heapq.heappop(self.events)
            fn(*args)
        return self.metrics()

    # --- router ---------------------------------------------------------------------------------

    def arrive(self, conv: Conversation, turn_idx: int) -> None:
        turn = conv.turns[turn_idx]
        info = RequestInfo(turn.prompt_len, self.cfg.max_tokens, conv.hashes[:turn.prompt_len // self.cfg.block_size],
                           self.cfg.block_size, ttft_budget_s=self.cfg.ttft_budget_s)
        req = SimRequest(conv, turn_idx, self.now, info, reply_len=turn.reply_len)
        if self.router_queue or not self.route(req):
            if len(self.router_queue) >= self.cfg.router_queue_limit:
                self.num_rejected += 1  # 429: the user gives up on this conversation
                return
            self.num_queued += 1
            self.router_queue.append(req)
            self.schedule_retry()

    def route(self, req: SimRequest) -> bool:
        tiers = None
        if self.cfg.host_blocks or self.scorer.policy.tiers.pulls:
            tiers = self.index.match_tiers(req.info.block_hashes)
        decision = self.scorer.choose(req.info, self.states, self.index.match(req.info.block_hashes), tiers)
        if not decision.accepted:
            self.reject_reasons[decision.reason] = self.reject_reasons.get(decision.reason, 0) + 1
            if decision.retryable:
                return False
            self.num_rejected += 1  # e.g. request_too_large: a 400, nothing to retry
            return True
        req.decision = decision
        self.admit_decode(self.servers[decision.decode_id], req)
        return True

    def schedule_retry(self) -> None:
        if not self.retry_scheduled:
            self.retry_scheduled = True
            self.at(self.now + self.cfg.retry_interval_s, self.retry)

    def retry(self) -> None:
        self.retry_scheduled = False
        while self.router_queue and self.route(self.router_queue[0]):
            self.router_queue.popleft()
        if self.router_queue:
            self.schedule_retry()

    # --- servers --------------------------------------------------------------------------------

    def sync(self, server: SimServer) -> None:
        st = server.state
        st.free_blocks = server.pool.num_free
        st.queued_requests = len(server.prefill_queue) + len(server.waiting)
        st.queued_prefill_tokens = server.queued_tokens
        st.running_requests = len(server.running)
        st.running_tokens = server.running_tokens

    def admit_decode(self, d: SimServer, req: SimRequest) -> None:
        d.waiting.append(req)
        d.queued_tokens += req.info.num_prompt_tokens
        self.drain_waiting(d)

    def drain_waiting(self, server: SimServer) -> None:
        """Start waiting requests in FIFO order while the pool has room (decode or prefill side)."""
        bs = self.cfg.block_size
        while server.waiting:
            req = server.waiting[0]
            prompt = req.info.num_prompt_tokens
            on_decode = server.state.role == "decode"
            num_blocks = -(-(prompt + (self.cfg.max_tokens if on_decode else 0)) // bs)
            pull = 0  # a planned pull's end block (the decode server keeps its own hits before it)
            if on_decode and req.decision.pull_from_id:
                d = req.decision
                pull = (d.decode_cached_tokens + d.host_hit_tokens + d.pull_tokens) // bs
            if pull:
                m = server.pool.acquire(req.info.block_hashes, num_blocks, pull)
            else:
                m = server.pool.acquire(req.info.block_hashes, num_blocks)
            if m is None:
                break
            server.waiting.popleft()
            cached = min(m * bs, prompt - 1)
            fetch_s = getattr(server.pool, "fetch_s", 0.0)
            if fetch_s:
                req.tier_tokens = tuple(n * bs for n in server.pool.last_fetch)
            if on_decode:
                req.d_blocks = (m, num_blocks - m)
                if req.decision.prefill_id is None:
                    req.computed_tokens = prompt - cached
                    server.queued_tokens -= cached
                    self._queue_prefill(server, (req, prompt - cached, False, self.now), fetch_s)
                else:
                    server.queued_tokens -= prompt  # its prefill happens elsewhere
                    p = self.servers[req.decision.prefill_id]
                    p.waiting.append(req)
                    p.queued_tokens += prompt
                    self.drain_waiting(p)
            else:
                req.p_blocks = (m, num_blocks - m)
                req.computed_tokens = prompt - cached
                server.queued_tokens -= cached
                self._queue_prefill(server, (req, prompt - cached, True, self.now), fetch_s)
            self.kick(server)
        self.sync(server)

    def _queue_prefill(self, server: SimServer, entry: tuple, fetch_s: float) -> None:
        """Queue a prefill now, or once its KV-tier copies took ``fetch_s`` (the server works on meanwhile)."""
        if not fetch_s:
            server.prefill_queue.append(entry)
            return

        def arrived() -> None:
            server.prefill_queue.append(entry)
            self.kick(server)

        self.at(self.now + fetch_s, arrived)

    def kick(self, server: SimServer) -> None:
        if server.busy:
            return
        cfg = self.cfg
        if server.prefill_queue:
            num = 1
            if cfg.prefill_batch_tokens and server.state.role == "prefill":
                total = server.prefill_queue[0][1]
                while num < len(server.prefill_queue) and total + server.prefill_queue[num][1] <= cfg.prefill_batch_tokens:
                    total += server.prefill_queue[num][1]
                    num += 1
            batch = [server.prefill_queue[i][1] for i in range(num)]
            true_s = (cfg.prefill_a_s + cfg.prefill_b_s_per_token * sum(batch)
                      + cfg.prefill_c_s_per_token2 * sum(t * t for t in batch)) / server.speed
            seconds = true_s * math.exp(self.rng.gauss(0, cfg.prefill_noise))
            server.busy, server.busy_s = True, server.busy_s + seconds
            self.at(self.now + seconds, self.prefill_done, server, seconds, num)
        elif server.running:
            seconds = (cfg.decode_step_s + cfg.decode_step_s_per_seq * len(server.running)
                       + cfg.decode_step_s_per_token * server.running_tokens)
            server.busy, server.busy_s = True, server.busy_s + seconds
            self.at(self.now + seconds, self.step_done, server)

    def prefill_done(self, server: SimServer, seconds: float, num: int = 1) -> None:
        server.busy = False
        for _ in range(num):
            req, num_tokens, remote, admitted_s = server.prefill_queue.popleft()
            server.queued_tokens -= num_tokens
            # A batching server reports admission-to-step-end, like Duet's prefill servers.
            observed_s = self.now - admitted_s if self.cfg.prefill_batch_tokens else seconds
            self.scorer.observe_prefill(server.state.server_id, num_tokens, observed_s)
            prompt_blocks = req.info.num_prompt_tokens // self.cfg.block_size
            hashes = req.conv.hashes
            if remote:
                m, _ = req.p_blocks
                server.pool.promote(hashes[m:prompt_blocks])
                d = self.servers[req.decision.decode_id]
                transfer_s = self.cfg.transfer_latency_s + self.cfg.transfer_s_per_token * (
                    req.info.num_prompt_tokens
                    - min(req.d_blocks[0] * self.cfg.block_size, req.info.num_prompt_tokens - 1))
                self.at(self.now + transfer_s, self.kv_arrived, server, d, req)
            else:
                self.first_token(server, req)
        self.sync(server)
        self.kick(server)

    def kv_arrived(self, p: SimServer, d: SimServer, req: SimRequest) -> None:
        m, anon = req.p_blocks
        prompt_blocks = req.info.num_prompt_tokens // self.cfg.block_size
        p.pool.release(req.conv.hashes[:prompt_blocks], anon - (prompt_blocks - m))
        self.drain_waiting(p)
        self.first_token(d, req)
        self.sync(d)
        self.kick(d)

    def first_token(self, d: SimServer, req: SimRequest) -> None:
        m, _ = req.d_blocks
        d.pool.promote(req.conv.hashes[m:req.info.num_prompt_tokens // self.cfg.block_size])
        req.ttft_s = self.now - req.arrival_s
        req.generated = 1
        if req.generated >= req.reply_len:
            self.finish(d, req)
        else:
            d.running.append(req)
            d.running_tokens += req.info.num_prompt_tokens + 1

    def step_done(self, d: SimServer) -> None:
        d.busy = False
        still, finished = [], []
        for req in d.running:
            req.generated += 1
            (still if req.generated < req.reply_len else finished).append(req)
        d.running = still
        d.running_tokens += len(still)
        for req in finished:
            d.running_tokens -= req.info.num_prompt_tokens + req.generated - 1
            self.finish(d, req)
        self.sync(d)
        self.kick(d)

    def finish(self, d: SimServer, req: SimRequest) -> None:
        bs, turn = self.cfg.block_size, req.turn
        m, anon = req.d_blocks
        prompt_blocks = turn.prompt_len // bs
        full_blocks = (turn.prompt_len + turn.reply_len) // bs
        d.pool.promote(req.conv.hashes[prompt_blocks:full_blocks])  # the reply joins the cache
        d.pool.release(req.conv.hashes[:full_blocks], anon - (full_blocks - m))
        req.finish_s = self.now
        self.done.append(req)
        if req.turn_idx + 1 < len(req.conv.turns):
            next_s = self.now + turn.think_s
            if next_s < self.cfg.duration_s:
                self.at(next_s, self.arrive, req.conv, req.turn_idx + 1)
        elif req.conv.next is not None:  # closed-loop client: its next request, right away
            self.at(self.now, self.arrive, req.conv.next, 0)
        self.drain_waiting(d)

    # --- results --------------------------------------------------------------------------------

    def metrics(self) -> dict:
        done = self.done
        ttfts = sorted(r.ttft_s for r in done)
        q = lambda p: ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] if ttfts else math.nan  # noqa: E731
        prompt = sum(r.info.num_prompt_tokens for r in done)
        computed = sum(r.computed_tokens for r in done)

        def imbalance(role: str) -> tuple[float, float]:
            busy = [s.busy_s for s in self.servers.values() if s.state.role == role]
            mean = statistics.fmean(busy) if busy else 0.0
            if not busy or mean == 0:
                return 0.0, 0.0
            return statistics.pstdev(busy) / mean, max(busy) / mean

        d_cv, d_max = imbalance("decode")
        p_cv, p_max = imbalance("prefill")
        tpots = sorted((r.finish_s - r.arrival_s - r.ttft_s) / (r.turn.reply_len - 1) for r in done
                       if r.turn.reply_len > 1)
        rel_err = sorted(abs(r.decision.predicted_ttft_s - r.ttft_s) / max(r.ttft_s, 1e-6) for r in done)
        return {
            "requests": len(done),
            "rejected_429": self.num_rejected,
            "router_queued": self.num_queued,
            "prefix_hit_rate": (prompt - computed) / prompt if prompt else math.nan,
            "ttft_mean_s": statistics.fmean(r.ttft_s for r in done) if done else math.nan,
            "ttft_p50_s": q(0.5), "ttft_p90_s": q(0.9), "ttft_p99_s": q(0.99),
            "tpot_p50_ms": 1e3 * tpots[len(tpots) // 2] if tpots else math.nan,
            "tpot_p90_ms": 1e3 * tpots[int(0.9 * len(tpots))] if tpots else math.nan,
            "disaggregated": sum(1 for r in done if r.decision.prefill_id is not None),
            "local_prefill": sum(1 for r in done if r.decision.prefill_id is None),
            "decisions": dict(Counter(r.decision.reason for r in done)),
            "decode_busy_cv": d_cv, "decode_busy_max_mean": d_max,
            "prefill_busy_cv": p_cv, "prefill_busy_max_mean": p_max,
            "ttft_pred_rel_err_p50": rel_err[len(rel_err) // 2] if rel_err else math.nan,
            "prefill_util": sum(s.busy_s for s in self.servers.values() if s.state.role == "prefill")
            / max(self.cfg.num_prefill * self.now, 1e-9),
            "mean_prompt_tokens": prompt / max(len(done), 1),
            "host_hit_rate": sum(r.tier_tokens[0] for r in done) / prompt if prompt else math.nan,
            "pulled_rate": sum(r.tier_tokens[1] for r in done) / prompt if prompt else math.nan,
            "reject_reasons": dict(self.reject_reasons),
            "sim_end_s": self.now,
        }


def simulate(cfg: SimConfig, policies: tuple[str, ...] = POLICIES, trace: list[Conversation] | None = None,
             base_policy: RouterPolicy | None = None) -> list[dict]:
    """Run the same trace under each policy; one row of metrics per policy."""
    trace = make_trace(cfg) if trace is None else trace
    rows = []
    for name in policies:
        t0 = time.perf_counter()
        policy = replace(base_policy or RouterPolicy(), policy=name)
        row = {"policy": name, **Simulation(cfg, policy, trace).run()}
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
    return rows


QUICK = SimConfig(num_prefill=8, num_decode=24, duration_s=30.0, conversations_per_s=75.0)
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 prefill + 24 decode servers, 30 s of trace")
    parser.add_argument("--servers", type=int, help="total servers (1/4 prefill, 3/4 decode); load scales with it")
    parser.add_argument("--duration", type=float, help="seconds of arrivals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--c8", action="store_true",
                        help="the CPU P/D c8 run: placement before (headroom) and after (deadline) issue 17")
    parser.add_argument("--host-blocks", type=int, default=0, help="KV tiers: host-tier blocks per server")
    parser.add_argument("--kv-pulls", action="store_true", help="KV tiers: the router may plan pulls")
    from duet.bench.report import add_record_arg

    add_record_arg(parser)
    args = parser.parse_args(argv)
    if args.c8:
        from duet.bench.sim_placement import C8, main_c8

        return main_c8(replace(C8, seed=args.seed), record=args.record)
    cfg = QUICK if args.quick else SimConfig()
    if args.servers:
        if args.servers < 2:
            parser.error("--servers must be >= 2")
        num_prefill = max(1, args.servers // 4)
        cfg = replace(cfg, num_prefill=num_prefill, num_decode=args.servers - num_prefill,
                      conversations_per_s=cfg.conversations_per_s * args.servers / (cfg.num_prefill + cfg.num_decode))
    if args.duration:
        cfg = replace(cfg, duration_s=args.duration)
    cfg = replace(cfg, seed=args.seed, host_blocks=args.host_blocks)

    t0 = time.perf_counter()
    trace = make_trace(cfg)
    trace_s = time.perf_counter() - t0
    rows = simulate(cfg, trace=trace, base_policy=RouterPolicy(tiers=TierPolicy(pulls=args.kv_pulls)))

    from duet.bench.report import write_results  # imports torch; keep it out of the simulator proper

    def plot(ax) -> None:
        names = [r["policy"] for r in rows]
        xs = range(len(rows))
        width = 0.27
        ax.bar([x - width for x in xs], [r["ttft_p50_s"] for r in rows], width, label="TTFT p50 (s)")
        ax.bar(list(xs), [r["ttft_p90_s"] for r in rows], width, label="TTFT p90 (s)")
        ax.set_ylabel("seconds")
        ax.set_xticks(list(xs), names)
        hit = ax.twinx()
        hit.bar([x + width for x in xs], [r["prefix_hit_rate"] for r in rows], width, color="tab:green",
                label="prefix-hit rate")
        hit.set_ylim(0, 1)
        hit.set_ylabel("prefix-hit rate")
        handles = ax.get_legend_handles_labels()[0] + hit.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=8)

    columns = ["policy", "requests", "rejected_429", "prefix_hit_rate", "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s",
               "tpot_p50_ms", "tpot_p90_ms", "disaggregated", "local_prefill", "decode_busy_cv", "decode_busy_max_mean",
               "prefill_busy_cv", "prefill_busy_max_mean", "ttft_pred_rel_err_p50", "wall_s"]
    name = "router_sim_quick" if args.quick else f"router_sim_{cfg.num_prefill}p{cfg.num_decode}d"
    name += f"_host{cfg.host_blocks}" if cfg.host_blocks else ""
    name += "_pulls" if args.kv_pulls else ""
    write_results(name, rows, columns, device="cpu", plot=plot, extra={
        "config": cfg.__dict__, "conversations": len(trace), "turns": sum(len(c.turns) for c in trace),
        "trace_s": trace_s}, record=args.record)


if __name__ == "__main__":
    main()
