"""The router's view of KV tiers: the per-tier prefix index, the tier prices, and the scorer's choices with them.

Everything here is pure data (no process): ``PrefixIndex.match_tiers``, ``tier_cost.plan_tiers`` and
``Scorer.choose(..., tier_hits)``, checked against hand-computed costs.
"""
from __future__ import annotations

import pytest

from duet.engine.router.prefix_index import PrefixIndex
from duet.engine.router.scoring import RouterPolicy, Scorer
from duet.engine.router.tier_cost import PullCostModel, TierHit, TierPolicy, plan_tiers, pull_sources
from tests.router.test_scoring import BLOCK, decode, request


def linear(s_per_token: float):
    """A prefill cost model's prediction with no overhead: seconds = tokens x ``s_per_token``."""
    return lambda tokens: tokens * s_per_token


def test_match_tiers_walks_device_then_host_per_server():
    ix = PrefixIndex()
    h = list(range(100, 110))
    ix.stored("a", h[:3])
    ix.stored("a", h[:7], tier="host")  # device 0-2 (written through, so on the host too), host 0-6
    ix.stored("b", h[:5], tier="host")  # host only
    ix.stored("c", h[1:4])  # no first block: nothing usable
    assert ix.match(h) == {"a": 3}  # the device answer is what it was
    assert ix.match_tiers(h) == {"a": TierHit(3, 4), "b": TierHit(0, 5)}
    ix.removed("a", [h[4]], tier="host")
    assert ix.match_tiers(h)["a"] == TierHit(3, 1)
    ix.cleared("a", tier="device")  # a device reset keeps the host tier
    assert ix.match_tiers(h)["a"] == TierHit(0, 4)
    assert ix.num_blocks("a", tier="host") == 6 and ix.num_blocks("a") == 0
    ix.cleared("b")  # a restart or a death: every tier
    ix.drop_server("a")
    assert ix.match_tiers(h) == {} and ix.num_blocks("a", tier="host") == 0


def test_host_hits_cost_their_load_and_count_by_what_they_save():
    pol = TierPolicy(host_load_s_per_token=1e-5)
    plan = plan_tiers("s", 1000, BLOCK, {"s": TierHit(10, 20)}, [], linear(1e-4), pol)
    assert (plan.device_tokens, plan.host_tokens, plan.pull_tokens) == (160, 320, 0)
    assert plan.fetch_s == pytest.approx(320 * 1e-5)
    assert plan.effective_cached_tokens == pytest.approx(160 + 320 * (1 - 0.1))  # a host token saves 90% of one
    capped = plan_tiers("s", 100, BLOCK, {"s": TierHit(2, 10)}, [], linear(1e-4), pol)
    assert capped.covered_tokens == 96  # the last prompt token is always computed: (100 - 1) // 16 blocks


def test_a_pull_is_planned_only_when_it_beats_recomputing():
    hits = {"s": TierHit(4, 0), "owner": TierHit(20, 30)}
    sources = pull_sources(hits, {"s", "owner"})
    assert sources == [("owner", 50), ("s", 4)]
    # 46 blocks = 736 tokens of 64 KiB: 48.2 MB over 1 GB/s + 10 ms = 58 ms, against 736 x 1 ms of prefill.
    pol = TierPolicy(pulls=True, kv_bytes_per_token=64 << 10, pull_bytes_per_s=1e9, pull_overhead_s=0.01)
    plan = plan_tiers("s", 2000, BLOCK, hits, sources, linear(1e-3), pol)
    assert plan.pull_from == "owner" and plan.pull_tokens == 46 * BLOCK
    assert plan.fetch_s == pytest.approx(0.01 + 736 * (64 << 10) / 1e9)
    assert plan.device_tokens < plan.effective_cached_tokens < plan.covered_tokens
    slow_link = plan_tiers("s", 2000, BLOCK, hits, sources, linear(1e-3), TierPolicy(
        pulls=True, kv_bytes_per_token=64 << 10, pull_bytes_per_s=1e7))  # 4.8 s against 0.74 s: recompute
    assert slow_link.pull_from is None and slow_link.covered_tokens == 64
    assert plan_tiers("s", 2000, BLOCK, hits, sources, linear(1e-3), TierPolicy()).pull_from is None  # pulls off
    own = plan_tiers("owner", 2000, BLOCK, hits, sources, linear(1e-3), pol)
    assert own.pull_from is None and own.host_tokens == 30 * BLOCK  # the best source is itself: nothing to pull


def test_measured_bandwidth_replaces_the_prior():
    model = PullCostModel(TierPolicy(pull_bytes_per_s=1e9, pull_overhead_s=0.01), weight=0.5)
    for _ in range(20):
        model.observe(100_000_000, 1.01)  # 100 MB in 1 s after the overhead: 100 MB/s
    assert model.bytes_per_s == pytest.approx(1e8, rel=1e-3)
    assert model.seconds(50_000_000) == pytest.approx(0.51, rel=1e-3)
    model.observe(0, 1.0), model.observe(10, 0.0)  # nothing learnt from empty or instant pulls
    assert model.num_observations == 20


def test_scorer_prices_device_over_host_over_pull_and_places_pulls():
    req = request(2000)
    policy = RouterPolicy(tiers=TierPolicy(pulls=True, kv_bytes_per_token=1024))
    s = Scorer(policy)
    servers = [decode("a"), decode("b")]
    ix = PrefixIndex()
    ix.stored("a", req.block_hashes[:100])
    ix.stored("b", req.block_hashes[:100], tier="host")
    # Same prefix, same load: the device hit wins over the host hit (it saves the load).
    d = s.choose(req, servers, ix.match(req.block_hashes), ix.match_tiers(req.block_hashes))
    assert d.decode_id == "a" and d.decode_cached_tokens == 1600 and d.host_hit_tokens == 0 and d.pull_from_id is None
    # "a" is busy: "b" serves it from its host tier, its predicted TTFT counting the load.
    servers[0].running_tokens, servers[0].running_requests = 15_000, 8
    d = s.choose(req, servers, ix.match(req.block_hashes), ix.match_tiers(req.block_hashes))
    assert d.decode_id == "b" and d.host_hit_tokens == 1600 and d.decode_cached_tokens == 0
    host_s = 1600 * policy.tiers.host_load_s_per_token
    assert d.predicted_ttft_s == pytest.approx(host_s + s.cost_model("b").predict(400))
    # Now only "a" holds it, and a third, idle server "c" is the best place: it pulls from "a".
    ix.cleared("b")
    servers.append(decode("c"))
    d = s.choose(req, servers, ix.match(req.block_hashes), ix.match_tiers(req.block_hashes))
    assert d.decode_id in ("b", "c") and d.pull_from_id == "a" and d.pull_tokens == 1600
    pull_s = s.pull_model.seconds(1600 * 1024)
    assert d.predicted_ttft_s == pytest.approx(pull_s + s.cost_model(d.decode_id).predict(400))
    # Without the tier view the scorer decides as before tiers: no host hit, no pull.
    d = s.choose(req, servers, ix.match(req.block_hashes))
    assert d.host_hit_tokens == 0 and d.pull_from_id is None


def test_simulator_host_tier_and_pulls_recompute_less():
    from dataclasses import replace

    from duet.bench.router_sim import SimConfig, simulate

    # Four decode servers whose pools hold a few conversations; turns come back after others evicted them.
    cfg = SimConfig(num_prefill=0, num_decode=4, duration_s=20.0, conversations_per_s=2.0, mean_think_s=6.0,
                    decode_blocks=400, prefill_b_s_per_token=1 / 5000, pull_s_per_token=1e-6, seed=1)
    policy = RouterPolicy(tiers=TierPolicy(pulls=True, kv_bytes_per_token=1024, pull_bytes_per_s=1e9))
    off, host, pulls = (simulate(replace(cfg, host_blocks=h), ("prefix_aware",), base_policy=replace(
        policy, tiers=replace(policy.tiers, pulls=p)))[0] for h, p in ((0, False), (50_000, False), (50_000, True)))
    assert min(off["requests"], host["requests"], pulls["requests"]) > 80
    assert off["host_hit_rate"] == 0 and host["host_hit_rate"] > 0.1 and host["pulled_rate"] == 0
    assert host["prefix_hit_rate"] > off["prefix_hit_rate"] + 0.1  # tokens not recomputed
    assert pulls["pulled_rate"] > 0.1 and pulls["prefix_hit_rate"] > host["prefix_hit_rate"]
