"""Scorer policies, conditional disaggregation, admission, zones, the prefill cost model, config checks,
and one tiny run of the routing simulator."""
from __future__ import annotations

import math
import random

import pytest

from duet.engine.block_hash import block_hashes
from duet.engine.router import scoring
from duet.engine.router.prefix_index import PrefixIndex
from duet.engine.router.scoring import (PrefillCostModel, RequestInfo, RouterPolicy, Scorer, ServerState)

BLOCK = 16


def tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32_000) for _ in range(n)]


def decode(server_id: str, free: int = 1000, **kwargs) -> ServerState:
    return ServerState(server_id, role="decode", total_blocks=1000, free_blocks=free, **kwargs)


def prefill(server_id: str, free: int = 1000, **kwargs) -> ServerState:
    return ServerState(server_id, role="prefill", total_blocks=1000, free_blocks=free, **kwargs)


def request(num_tokens: int = 2000, max_tokens: int = 100, seed: int = 0, **kwargs) -> RequestInfo:
    return RequestInfo.from_tokens(tokens(num_tokens, seed), max_tokens, BLOCK, **kwargs)


def scorer(policy: str = "prefix_aware", **kwargs) -> Scorer:
    return Scorer(RouterPolicy(policy=policy, **kwargs))


# --- decode choice -------------------------------------------------------------------------------


def test_request_hashes_are_the_engines_block_hashes():
    prompt = tokens(100, seed=3)
    req = RequestInfo.from_tokens(prompt, 10, BLOCK)
    assert list(req.block_hashes) == block_hashes(prompt, BLOCK) and len(req.block_hashes) == 6


def test_prefix_aware_prefers_the_server_holding_the_prefix():
    req = request(2000)
    index = PrefixIndex()
    index.stored("d1", req.block_hashes[:100])  # 1600 of 2000 tokens
    servers = [decode("d0"), decode("d1"), decode("d2")]
    d = scorer().choose(req, servers, index.match(req.block_hashes))
    assert d.accepted and d.decode_id == "d1" and d.decode_cached_tokens == 1600
    assert d.prefill_id is None and d.reason == scoring.LOCAL_PREFIX_HIT  # only 400 tokens to prefill


def test_prefix_aware_skips_the_prefix_holder_without_room():
    req = request(2000, max_tokens=400)  # 150 blocks in all, 50 beyond the 1600 cached tokens
    servers = [decode("d0"), decode("d1", free=49)]
    d = scorer().choose(req, servers, {"d1": 100})
    assert d.decode_id == "d0"
    servers[1].free_blocks = 50  # exactly enough once the cached prefix is counted
    assert scorer().choose(req, servers, {"d1": 100}).decode_id == "d1"


def test_prefix_aware_trades_prefix_against_load():
    req = request(2000)
    servers = [decode("d0", running_tokens=15_000, running_requests=8), decode("d1")]
    d = scorer().choose(req, servers, {"d0": 40})  # d0: 640 cached tokens but ~94% loaded
    assert d.decode_id == "d1"


def test_ties_break_by_id():
    servers = [decode("d2"), decode("d0"), decode("d1")]
    for policy in ("prefix_aware", "least_loaded", "round_robin"):
        assert scorer(policy).choose(request(300), servers, {}).decode_id == "d0"


def test_least_loaded_ignores_prefix():
    req = request(2000)
    servers = [decode("d0", running_tokens=5000), decode("d1", running_tokens=1000, queued_prefill_tokens=500),
               decode("d2", running_tokens=3000)]
    d = scorer("least_loaded").choose(req, servers, {"d0": 120})
    assert d.decode_id == "d1"


def test_round_robin_cycles_over_servers_that_fit():
    s = scorer("round_robin")
    servers = [decode("d0"), decode("d1"), decode("d2")]
    assert [s.choose(request(300), servers, {}).decode_id for _ in range(4)] == ["d0", "d1", "d2", "d0"]
    servers[2].free_blocks = 0
    assert [s.choose(request(300), servers, {}).decode_id for _ in range(3)] == ["d1", "d0", "d1"]


def test_round_robin_cycles_prefill_servers_too():
    s = scorer("round_robin")
    servers = [decode("d0"), prefill("p0"), prefill("p1")]
    picks = [s.choose(request(2000), servers, {}).prefill_id for _ in range(3)]
    assert picks == ["p0", "p1", "p0"]


def test_block_size_mismatch_counts_as_uncached():
    req = request(2000)
    servers = [ServerState("d0", role="decode", block_size=32, total_blocks=500, free_blocks=500)]
    assert scorer().choose(req, servers, {"d0": 100}).decode_cached_tokens == 0


def test_fully_cached_prompt_still_computes_its_last_token():
    req = request(160)  # exactly 10 blocks
    d = scorer().choose(req, [decode("d0")], {"d0": 10})
    assert d.decode_cached_tokens == 159


# --- conditional disaggregation and the prefill choice ---------------------------------------------


def test_conditional_disaggregation_threshold():
    s = scorer(disagg_threshold_tokens=512)
    servers = [decode("d0"), prefill("p0")]
    short = s.choose(request(500), servers, {})
    assert short.prefill_id is None and short.reason == scoring.LOCAL_BELOW_THRESHOLD
    long = s.choose(request(2000), servers, {})
    assert long.disaggregated and long.prefill_id == "p0" and long.reason == scoring.DISAGGREGATED
    cached = s.choose(request(2000), servers, {"d0": 100})  # 400 uncached on d0
    assert cached.prefill_id is None and cached.decode_cached_tokens == 1600


def test_saturated_prefill_servers_mean_local_prefill():
    servers = [decode("d0"), prefill("p0", queued_requests=10, queued_prefill_tokens=100_000),
               prefill("p1", free=10)]  # p0: ~10 s of queue; p1: no blocks for the prompt
    d = scorer().choose(request(2000, ttft_budget_s=5.0), servers, {})
    assert d.accepted and d.prefill_id is None and d.reason == scoring.LOCAL_PREFILL_SATURATED
    assert d.predicted_ttft_s < 5.0


def test_pd_placement_sends_every_disaggregated_request_to_a_prefill_server_within_its_deadline():
    """Threshold 0 (always disaggregate), one busy prefill server: the request still goes to it while its
    predicted TTFT fits the budget. The old rule (``headroom``) kept it on the decode server as soon as the
    prefill queue was predicted over ``max_prefill_queue_s``, which is what the c8 P/D run measured."""
    busy = [decode("d0"), prefill("p0", queued_requests=4, queued_prefill_tokens=20_000)]  # ~2.1 s queued
    d = scorer(disagg_threshold_tokens=0).choose(request(512), busy, {})
    assert (d.reason, d.decode_id, d.prefill_id) == (scoring.DISAGGREGATED, "d0", "p0")
    old = scorer(disagg_threshold_tokens=0, pd_placement="headroom").choose(request(512), busy, {})
    assert old.prefill_id is None and old.reason == scoring.LOCAL_PREFILL_SATURATED
    # Over the request's budget through p0, and no other prefill server: the decode server prefills it.
    d = scorer(disagg_threshold_tokens=0).choose(request(512, ttft_budget_s=1.0), busy, {})
    assert d.prefill_id is None and d.reason == scoring.LOCAL_PREFILL_SATURATED
    # A second, idle prefill server takes it instead.
    d = scorer(disagg_threshold_tokens=0).choose(request(512, ttft_budget_s=1.0), busy + [prefill("p1")], {})
    assert d.prefill_id == "p1" and d.reason == scoring.DISAGGREGATED


def test_local_prefill_reasons():
    s = scorer(disagg_threshold_tokens=512)
    fleet = [decode("d0"), prefill("p0")]
    assert s.choose(request(500), fleet, {}).reason == scoring.LOCAL_BELOW_THRESHOLD
    hit = s.choose(request(2000), fleet, {"d0": 100})  # 1600 cached on d0: 400 left to compute
    assert hit.prefill_id is None and hit.reason == scoring.LOCAL_PREFIX_HIT and hit.decode_cached_tokens == 1600
    assert s.choose(request(2000), fleet, {"d0": 50}).reason == scoring.DISAGGREGATED  # 1200 left
    assert s.choose(request(2000), [decode("d0")], {}).reason == scoring.LOCAL_NO_PREFILL_SERVER
    fleet[1].healthy = False
    assert s.choose(request(2000), fleet, {}).reason == scoring.LOCAL_NO_PREFILL_SERVER
    fleet[1].healthy, fleet[1].free_blocks = True, 0
    assert s.choose(request(2000), fleet, {}).reason == scoring.LOCAL_PREFILL_SATURATED


def test_prefill_choice_by_predicted_ttft():
    s = scorer()
    req = request(2000)
    servers = [decode("d0"), prefill("p0", queued_requests=2, queued_prefill_tokens=8000), prefill("p1")]
    assert s.choose(req, servers, {}).prefill_id == "p1"  # p0's queue costs ~0.84 s
    # A short queue is worth it when p0 already holds most of the prompt (100 tokens left vs 2000).
    servers[1].queued_requests, servers[1].queued_prefill_tokens = 1, 1000
    d = s.choose(req, servers, {"p0": 118})
    assert d.prefill_id == "p0" and d.prefill_cached_tokens == 1888 and d.decode_cached_tokens == 0
    prior = RouterPolicy().new_cost_model()
    expected = prior.predict_queue(1, 1000) + prior.predict(2000 - 1888) + RouterPolicy().kv_transfer_s_per_token * 2000
    assert d.predicted_ttft_s == pytest.approx(expected)


def test_prefill_choice_learns_server_speed():
    s = scorer()
    for n in (500, 1000, 2000, 4000) * 5:
        s.observe_prefill("p0", n, 0.01 + n / 1_000)  # slow: 1k tokens/s
        s.observe_prefill("p1", n, 0.01 + n / 40_000)  # fast: 40k tokens/s
    servers = [decode("d0"), prefill("p0"), prefill("p1")]
    d = s.choose(request(2000), servers, {})
    assert d.prefill_id == "p1"
    assert d.predicted_ttft_s == pytest.approx(0.01 + 2000 / 40_000 + 2000e-6, rel=0.1)
    # A server never seen starts from the fleet's estimate, not the static prior.
    assert s.cost_model("p9").predict(2000) != RouterPolicy().new_cost_model().predict(2000)


# --- cost model ----------------------------------------------------------------------------------


def test_cost_model_prior_before_any_observation():
    model = PrefillCostModel(overhead_s=0.02, tokens_per_s=10_000)
    assert model.num_observations == 0
    assert model.predict(0) == 0.0
    assert model.predict(10_000) == pytest.approx(1.02)
    assert model.predict_queue(0, 0) == 0.0
    assert model.predict_queue(4, 8000) == pytest.approx(4 * 0.02 + 0.8)


@pytest.mark.parametrize("a,b,c", [(0.01, 1 / 20_000, 0.0), (0.005, 1 / 30_000, 3e-9)])
def test_cost_model_converges_to_a_noisy_law(a, b, c):
    rng = random.Random(0)
    model = PrefillCostModel()  # prior: 10k tokens/s, no quadratic term
    law = lambda t: a + b * t + c * t * t  # noqa: E731
    for _ in range(400):
        t = rng.randint(32, 8192)
        model.observe(t, law(t) * math.exp(rng.gauss(0, 0.03)))
    for t in (256, 1000, 4000, 8000):
        assert model.predict(t) == pytest.approx(law(t), rel=0.05, abs=1e-3)
    fitted_a, fitted_b, fitted_c = model.coefficients
    assert fitted_b == pytest.approx(b, rel=0.2)
    assert fitted_c == pytest.approx(c, abs=0.5e-9)


def test_cost_model_survives_constant_inputs_without_windup():
    model = PrefillCostModel(forgetting_factor=0.9)
    for _ in range(2000):
        model.observe(1000, 0.1)
    assert model.predict(1000) == pytest.approx(0.1, rel=1e-3)
    assert all(math.isfinite(v) for row in model.cov for v in row)
    assert sum(model.cov[i][i] for i in range(3)) <= 3.0 / model.prior_weight + 1e-9


def test_cost_model_rejects_bad_observations_and_priors():
    model = PrefillCostModel()
    with pytest.raises(ValueError):
        model.observe(100, float("nan"))
    with pytest.raises(ValueError):
        model.observe(-1, 0.1)
    with pytest.raises(ValueError, match="tokens_per_s"):
        PrefillCostModel(tokens_per_s=0)
    with pytest.raises(ValueError, match="forgetting_factor"):
        PrefillCostModel(forgetting_factor=0)


# --- zones, admission, rejections ----------------------------------------------------------------


def test_zones_filter_servers():
    servers = [decode("d-us", zone="us"), decode("d-eu", zone="eu"), prefill("p-us", zone="us"),
               prefill("p-eu", zone="eu")]
    s = scorer()
    d = s.choose(request(2000, zone="eu"), servers, {"d-us": 120, "p-us": 120})
    assert (d.decode_id, d.prefill_id) == ("d-eu", "p-eu")
    d = s.choose(request(2000, zone="ap"), servers, {})
    assert not d.accepted and d.reason == scoring.NO_SERVER_IN_ZONE and "'ap'" in d.detail
    assert not d.retryable
    servers[1].healthy = False
    d = s.choose(request(2000, zone="eu"), servers, {})
    assert d.reason == scoring.NO_HEALTHY_SERVER and d.retryable
    assert s.choose(request(2000), servers, {}).decode_id == "d-us"  # no zone: any healthy server


def test_no_capacity_and_too_large():
    servers = [decode("d0", free=10), decode("d1", free=50)]
    d = scorer().choose(request(2000), servers, {})
    assert not d.accepted and d.reason == scoring.NO_CAPACITY and d.retryable and d.decode_id is None
    d = scorer().choose(request(20_000), servers, {})  # 1257 blocks > 1000 total
    assert d.reason == scoring.REQUEST_TOO_LARGE and not d.retryable
    assert scorer().choose(request(2000), [prefill("p0")], {}).reason == scoring.NO_HEALTHY_SERVER


def test_ttft_budget_admission():
    servers = [decode("d0", queued_requests=5, queued_prefill_tokens=50_000)]  # ~5.1 s of local prefill queue
    d = scorer().choose(request(300, ttft_budget_s=1.0), servers, {})
    assert not d.accepted and d.reason == scoring.OVER_TTFT_BUDGET and d.retryable
    assert d.predicted_ttft_s == pytest.approx(5 * 0.02 + 5.0 + 0.02 + 0.03)
    assert d.retry_after_s == pytest.approx(d.predicted_ttft_s - 1.0)
    assert scorer().choose(request(300, ttft_budget_s=10.0), servers, {}).accepted
    # A second, idle decode server within the budget is used instead.
    servers.append(decode("d9"))
    assert scorer().choose(request(300, ttft_budget_s=1.0), servers, {}).decode_id == "d9"


# --- config validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("policy", "fastest"), ("disagg_threshold_tokens", -1), ("max_prefill_queue_s", 0.0), ("pd_placement", "never"),
    ("default_ttft_budget_s", -1.0), ("prefix_weight", -0.5), ("load_weight", float("inf")),
    ("kv_weight", float("nan")), ("kv_transfer_s_per_token", -1e-6), ("prior_tokens_per_s", 0.0),
    ("prior_weight", 0.0), ("cost_forgetting_factor", 1.5),
])
def test_invalid_policy_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"RouterPolicy.{field} "):
        RouterPolicy(**{field: value})


def test_invalid_server_and_request_name_the_field():
    with pytest.raises(ValueError, match="ServerState.role"):
        ServerState("x", role="router")
    with pytest.raises(ValueError, match="ServerState.free_blocks"):
        ServerState("x", total_blocks=10, free_blocks=11)
    with pytest.raises(ValueError, match="ServerState.queued_prefill_tokens"):
        ServerState("x", queued_prefill_tokens=-1)
    with pytest.raises(ValueError, match="RequestInfo.block_hashes"):
        RequestInfo(num_prompt_tokens=20, max_tokens=1, block_hashes=[1, 2])
    with pytest.raises(ValueError, match="RequestInfo.num_prompt_tokens"):
        RequestInfo(num_prompt_tokens=0, max_tokens=1)
    with pytest.raises(ValueError, match="RequestInfo.ttft_budget_s"):
        request(100, ttft_budget_s=0.0)
    assert math.isinf(RouterPolicy(default_ttft_budget_s=math.inf).default_ttft_budget_s)


# --- simulator -----------------------------------------------------------------------------------


def test_simulator_prefix_aware_beats_round_robin_on_prefix_hits():
    from duet.bench.router_sim import SimConfig, simulate

    cfg = SimConfig(num_prefill=2, num_decode=6, duration_s=15.0, conversations_per_s=4.0, mean_think_s=2.0,
                    prefill_blocks=1024, decode_blocks=1024)
    rows = {row["policy"]: row for row in simulate(cfg, ("round_robin", "least_loaded", "prefix_aware"))}
    assert rows["round_robin"]["requests"] > 20
    assert rows["prefix_aware"]["prefix_hit_rate"] > rows["round_robin"]["prefix_hit_rate"] + 0.05
    assert rows["prefix_aware"]["ttft_mean_s"] < rows["round_robin"]["ttft_mean_s"]
    assert rows["prefix_aware"]["ttft_mean_s"] < rows["least_loaded"]["ttft_mean_s"]
    for row in rows.values():
        assert row["rejected_429"] == 0 and row["requests"] == row["disaggregated"] + row["local_prefill"]
