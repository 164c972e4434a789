"""Server stats as families and the front end's request families, without a server."""
from __future__ import annotations

import dataclasses
import math

from prometheus_client import CollectorRegistry, generate_latest

from duet.engine.metrics.exposition import StaticCollector
from duet.engine.metrics.request_metrics import RequestMetrics, token_count_buckets
from duet.engine.metrics.server_stats import EngineStats, as_stats, stats_families
from tests.metrics.exposition import check_vllm_families, parse, samples


def render(families) -> str:
    registry = CollectorRegistry()
    collector = StaticCollector()
    registry.register(collector)
    collector.set(families)
    return generate_latest(registry).decode()


def test_engines_share_one_family_per_name():
    engines = [EngineStats("prefill-a", "prefill", {"running": 1, "free_blocks": 3, "total_blocks": 4,
                                                    "kv_bytes_sent": 10}),
               EngineStats("decode-b", "decode", {"running": 2, "free_blocks": 0, "total_blocks": 0,
                                                  "kv_bytes_received": 10, "odd key!": 5})]
    text = render(stats_families("m", engines))
    fams = check_vllm_families(text, ("vllm:num_requests_running", "vllm:kv_cache_usage_perc"))
    assert sorted(samples(text, "vllm:num_requests_running"), key=lambda s: s[1]) == [
        ({"model_name": "m", "engine": "prefill-a"}, 1.0), ({"model_name": "m", "engine": "decode-b"}, 2.0)]
    usage = {lb["engine"]: v for lb, v in samples(text, "vllm:kv_cache_usage_perc")}
    assert usage == {"prefill-a": 0.25, "decode-b": 0.0}  # an empty pool is 0, not a division by zero
    assert samples(text, "duet_kv_sent_bytes_total") == [({"model_name": "m", "engine": "prefill-a",
                                                           "role": "prefill"}, 10.0)]
    assert fams["duet_server_odd_key_"][0] == "gauge"
    assert "vllm:prefix_cache_queries" not in fams  # no such stat: no sample, no made-up zero


def test_as_stats_takes_dataclasses_and_drops_what_is_not_a_number():
    @dataclasses.dataclass
    class ServerStats:
        running: int = 2
        healthy: bool = True
        name: str = "x"
        broken: float = math.nan

    assert as_stats(ServerStats()) == {"running": 2.0, "healthy": 1.0}
    assert as_stats(None) == {}


def test_request_metrics_phases_and_finish_reasons():
    registry = CollectorRegistry()
    m = RequestMetrics(registry, "m", engine="router", max_model_len=100)
    m.request_started(2, 16)
    m.first_token(0.5)
    m.inter_token(0.1)
    m.choice_finished("length", num_prompt_tokens=7, num_generation_tokens=11, e2e_s=2.5, ttft_s=0.5, queued_s=0.2)
    m.choice_finished("abort", num_prompt_tokens=7, num_generation_tokens=3, e2e_s=9.0, ttft_s=0.6)
    m.request_finished(11)
    text = generate_latest(registry).decode()
    check_vllm_families(text, ())
    one = {"model_name": "m", "engine": "router"}

    def total(name):
        return samples(text, name)[0][1]

    assert total("vllm:request_queue_time_seconds_sum") == 0.2
    assert math.isclose(total("vllm:request_prefill_time_seconds_sum"), 0.3)
    assert total("vllm:request_decode_time_seconds_sum") == 2.0
    assert math.isclose(total("vllm:request_inference_time_seconds_sum"), 2.3)
    assert total("vllm:request_time_per_output_token_seconds_sum") == 0.2  # 2 s over 10 tokens after the first
    assert total("vllm:e2e_request_latency_seconds_count") == 1  # the aborted choice has no latencies
    assert total("vllm:request_generation_tokens_count") == 2  # but its tokens count
    success = {lb["finished_reason"]: v for lb, v in samples(text, "vllm:request_success_total")}
    assert success == {"stop": 0, "length": 1, "abort": 1, "error": 0, "repetition": 0}
    assert samples(text, "vllm:request_params_n_sum") == [(one, 2.0)]
    assert parse(text)["vllm:request_prompt_tokens"][0] == "histogram"
    assert token_count_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert token_count_buckets(1) == [1]
