"""``ServerMetricsExporter`` on its own: a real HTTP server on 127.0.0.1, scraped with urllib, read with
prometheus_client's parser and compared with vLLM's recorded exposition."""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from duet.engine.launcher import ROOT
from duet.engine.metrics.server_exporter import ServerMetricsExporter
from tests.metrics.exposition import SERVER_STATS, VLLM_ENGINE_FAMILIES, check_vllm_families, parse, samples


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def test_exporter_serves_typed_vllm_and_duet_families():
    calls = []

    def stats():
        calls.append(1)
        return dict(SERVER_STATS, new_thing=3)

    with ServerMetricsExporter(stats, model_name="m", role="decode", engine_id="decode-1") as exporter:
        assert exporter.port > 0
        ttft = exporter.histogram("vllm:request_queue_time_seconds", "Queue time.", [0.1, 1.0])
        ttft.observe(0.05)
        handoff = exporter.histogram("duet_kv_hand_off_seconds", "Hand-off time.", [0.1, 1.0])
        handoff.observe(2.0)
        text = scrape(exporter.url)
    assert len(calls) == 1
    fams = check_vllm_families(text, VLLM_ENGINE_FAMILIES + ("vllm:prefix_cache_queries",
                                                              "vllm:request_queue_time_seconds"))
    labels = {"model_name": "m", "engine": "decode-1"}
    duet = dict(labels, role="decode")
    assert samples(text, "vllm:kv_cache_usage_perc") == [(labels, 0.25)]
    assert samples(text, "vllm:num_requests_waiting") == [(labels, 2.0)]
    assert samples(text, "vllm:prompt_tokens_total") == [(labels, 146.0)]  # computed + cache hit + external
    assert samples(text, "vllm:prompt_tokens_cached_total") == [(labels, 46.0)]
    by_source = {lb["source"]: v for lb, v in samples(text, "vllm:prompt_tokens_by_source_total")}
    assert by_source == {"local_compute": 100.0, "local_cache_hit": 16.0, "external_kv_transfer": 30.0,
                         "local_host_tier": 0.0, "external_kv_pull": 0.0}
    assert fams["duet_kv_sent_bytes"] == ("counter", frozenset(duet))
    assert samples(text, "duet_kv_sent_bytes_total") == [(duet, 4096.0)]
    assert samples(text, "duet_kv_fallbacks_total") == [(duet, 1.0)]
    assert fams["duet_kv_transfer_seconds_max"] == ("gauge", frozenset(duet))
    assert fams["duet_kv_hand_off_seconds"][0] == "histogram"
    assert samples(text, "duet_kv_hand_off_seconds_bucket")[-1] == (dict(duet, le="+Inf"), 1.0)
    assert fams["process_resident_memory_bytes"][0] == "gauge"
    # Every key servers report today has a name; a new key is still exported, as a gauge.
    unlisted = [n for n in fams if n.startswith("duet_server_") and not n.startswith("duet_server_stats_errors")]
    assert unlisted == ["duet_server_new_thing"] and fams["duet_server_new_thing"][0] == "gauge"


def test_exporter_accepts_a_dataclass_and_survives_a_failing_stats_call():
    @dataclasses.dataclass
    class Stats:
        running: int = 1
        waiting: int = 0
        free_blocks: int = 10
        total_blocks: int = 10

    state = {"fail": False}

    def stats():
        if state["fail"]:
            raise RuntimeError("dictionary changed size during iteration")
        return Stats()

    exporter = ServerMetricsExporter(stats, model_name="m", role="prefill", engine_id="p-1",
                                     process_metrics=False).start()
    try:
        assert samples(scrape(exporter.url), "vllm:num_requests_running") == \
            [({"model_name": "m", "engine": "p-1"}, 1.0)]
        state["fail"] = True
        text = scrape(exporter.url)
        assert "vllm:num_requests_running" not in parse(text)
        assert samples(text, "duet_server_stats_errors_total") == \
            [({"model_name": "m", "engine": "p-1", "role": "prefill"}, 1.0)]
    finally:
        exporter.close()
    exporter.close()  # idempotent
    with pytest.raises(OSError):
        scrape(exporter.url)


def test_exporter_port_in_use_names_the_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        exporter = ServerMetricsExporter(dict, model_name="m", role="decode", engine_id="d", port=port)
        with pytest.raises(OSError, match=f"--metrics-port: cannot listen on 127.0.0.1:{port}"):
            exporter.start()
    with pytest.raises(ValueError, match="engine_id"):
        ServerMetricsExporter(dict, model_name="m", role="decode", engine_id="")


def test_exporter_and_front_end_families_under_prometheus_multiproc_dir(tmp_path):
    """A process started with PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, which a vLLM
    environment may set) still serves correct values: they live in that directory's files per process."""
    code = """
import urllib.request
from prometheus_client import CollectorRegistry, generate_latest
from duet.engine.metrics.request_metrics import RequestMetrics
from duet.engine.launcher import ROOT
from duet.engine.metrics.server_exporter import ServerMetricsExporter
registry = CollectorRegistry()
RequestMetrics(registry, "m").first_token(0.25)
with ServerMetricsExporter(lambda: {"running": 2}, model_name="m", role="decode", engine_id="d") as e:
    e.histogram("duet_x_seconds", "x", [1.0]).observe(0.5)
    print(urllib.request.urlopen(e.url, timeout=10).read().decode() + generate_latest(registry).decode())
"""
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert samples(out.stdout, "vllm:num_requests_running") == [({"model_name": "m", "engine": "d"}, 2.0)]
    assert samples(out.stdout, "duet_x_seconds_count")[0][1] == 1.0
    assert samples(out.stdout, "vllm:time_to_first_token_seconds_sum")[0][1] == 0.25
    assert any(tmp_path.iterdir()), "values went through the multiprocess files"


def test_health_follows_the_servers_readiness():
    """``GET /health`` is the readiness probe of a prefill or decode pod: 503 while draining, 200 otherwise."""
    state = {"ready": True}

    def ready():
        if state["ready"] is None:
            raise RuntimeError("broken")
        return state["ready"]

    with ServerMetricsExporter(lambda: {}, model_name="m", role="prefill", engine_id="p-1", ready=ready) as exporter:
        health = exporter.url.replace("/metrics", "/health")
        with urllib.request.urlopen(health, timeout=10) as resp:
            assert resp.status == 200 and resp.read() == b'{"status": "ok"}\n'
        for state["ready"] in (False, None):  # draining; the check itself failing
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(health, timeout=10)
            assert e.value.code == 503
        assert "duet_server_stats_errors_total" in scrape(exporter.url)  # /metrics still served beside it
