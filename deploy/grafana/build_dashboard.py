"""Writes ``deploy/grafana/duet.json``, the Grafana dashboard for Duet's ``/metrics`` (router or servers).

    python deploy/grafana/build_dashboard.py        # rewrites duet.json next to this file

Panels are listed here as (title, unit, [(PromQL, legend)]) so the queries stay readable; the JSON is
Grafana's dashboard model (schema 39, a ``datasource`` variable, a ``model_name`` variable). Queries use the
names Duet exposes: vLLM's (``vllm:*``) for what vLLM also measures, so vLLM dashboards work on Duet too,
and ``duet_*`` for the disaggregation. ``tests/metrics/test_dashboard.py`` checks every name against
the families Duet serves and that this file and duet.json agree.
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "duet.json"
M = '{model_name="$model_name"}'
R = "[$__rate_interval]"


def _q(quantile: float, family: str, by: str = "le") -> str:
    return f"histogram_quantile({quantile}, sum by ({by}) (rate({family}_bucket{M}{R})))"


def _mean(family: str, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group} (rate({family}_sum{M}{R})) / sum{group} (rate({family}_count{M}{R}))"


ROWS = [
    ("Requests (router / colocated front end)", [
        ("Finished requests / s by reason", "reqps",
         [(f"sum by (finished_reason) (rate(vllm:request_success_total{M}{R}))", "{{finished_reason}}")]),
        ("Time to first token", "s",
         [(_q(p, "vllm:time_to_first_token_seconds"), f"p{int(p * 100)}") for p in (0.5, 0.9, 0.99)]),
        ("Inter-token latency", "s",
         [(_q(p, "vllm:inter_token_latency_seconds"), f"p{int(p * 100)}") for p in (0.5, 0.9, 0.99)]),
        ("End-to-end latency", "s",
         [(_q(p, "vllm:e2e_request_latency_seconds"), f"p{int(p * 100)}") for p in (0.5, 0.9, 0.99)]),
        ("Request phases (mean): router queue, prefill incl. hand-off, decode", "s",
         [(_mean("vllm:request_queue_time_seconds"), "queue"), (_mean("vllm:request_prefill_time_seconds"), "prefill"),
          (_mean("vllm:request_decode_time_seconds"), "decode")]),
        ("Tokens / s", "short",
         [(f"sum(rate(vllm:prompt_tokens_total{M}{R}))", "prompt (all engines)"),
          (f"sum(rate(vllm:generation_tokens_total{M}{R}))", "generated")]),
    ]),
    ("Servers", [
        ("Running requests by engine", "short",
         [(f"sum by (engine) (vllm:num_requests_running{M})", "{{engine}}")]),
        ("Waiting requests by engine (and decode-side waiting for KV)", "short",
         [(f"sum by (engine) (vllm:num_requests_waiting{M})", "{{engine}} waiting"),
          (f"sum by (engine) (duet_num_requests_waiting_for_kv{M})", "{{engine}} waiting for KV")]),
        ("KV cache usage", "percentunit",
         [(f"vllm:kv_cache_usage_perc{M}", "{{engine}}"),
          (f"duet_router_kv_cache_usage_perc{M}", "all {{role}} servers")]),
        ("Prefix cache hit rate", "percentunit",
         [(f"sum by (engine) (rate(vllm:prefix_cache_hits_total{M}{R})) / "
           f"sum by (engine) (rate(vllm:prefix_cache_queries_total{M}{R}))", "{{engine}}")]),
        ("Prompt tokens by source", "short",
         [(f"sum by (source) (rate(vllm:prompt_tokens_by_source_total{M}{R}))", "{{source}}")]),
        ("Preemptions / s", "short",
         [(f"sum by (engine) (rate(vllm:num_preemptions_total{M}{R}))", "{{engine}}")]),
    ]),
    ("Disaggregation", [
        ("Placement decisions / s", "reqps",
         [(f"sum by (reason) (rate(duet_router_decisions_total{M}{R}))", "{{reason}}")]),
        ("Hand-off overhead (TTFT - prefill compute) and prefill compute", "s",
         [(_q(0.5, "duet_handoff_seconds"), "hand-off p50"), (_q(0.9, "duet_handoff_seconds"), "hand-off p90"),
          (_q(0.5, "duet_prefill_compute_seconds"), "prefill compute p50")]),
        ("KV bytes / s", "Bps",
         [(f"sum by (engine) (rate(duet_kv_sent_bytes_total{M}{R}))", "{{engine}} sent"),
          (f"sum by (engine) (rate(duet_kv_received_bytes_total{M}{R}))", "{{engine}} received")]),
        ("KV hand-offs / s: received, fallbacks, failures", "short",
         [(f"sum(rate(duet_kv_transfers_received_total{M}{R}))", "received"),
          (f"sum(rate(duet_kv_fallbacks_total{M}{R}))", "fallback to local prefill"),
          (f"sum(rate(duet_kv_receive_failures_total{M}{R}))", "receive failures"),
          (f"sum(rate(duet_kv_send_failures_total{M}{R}))", "send failures")]),
        ("Mean KV receive time", "s",
         [(f"sum(rate(duet_kv_transfer_seconds_total{M}{R})) / sum(rate(duet_kv_transfers_received_total{M}{R}))",
           "mean")]),
        ("Router: admission queue, rejections, retries, migrations", "short",
         [(f"duet_router_queue_length{M}", "queued now"),
          (f"sum by (reason) (rate(duet_router_rejections_total{M}{R}))", "rejected: {{reason}}"),
          (f"sum(rate(duet_router_retries_total{M}{R}))", "retries"),
          (f"sum(rate(duet_router_migrations_total{M}{R}))", "migrations")]),
        ("Server health (router's view)", "short",
         [(f"duet_router_server_healthy{M}", "{{role}} {{server}}")]),
    ]),
]


def _panel(panel_id: int, title: str, unit: str, queries, x: int, y: int) -> dict:
    return {
        "id": panel_id, "type": "timeseries", "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 0}},
                        "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "none"}},
        "targets": [{"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr,
                     "legendFormat": legend, "refId": chr(ord("A") + i)} for i, (expr, legend) in enumerate(queries)],
    }


def dashboard() -> dict:
    panels, panel_id, y = [], 1, 0
    for row_title, row_panels in ROWS:
        panels.append({"id": panel_id, "type": "row", "title": row_title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        panel_id, y = panel_id + 1, y + 1
        for i, (title, unit, queries) in enumerate(row_panels):
            panels.append(_panel(panel_id, title, unit, queries, 12 * (i % 2), y + 8 * (i // 2)))
            panel_id += 1
        y += 8 * ((len(row_panels) + 1) // 2)
    model_query = "label_values(vllm:num_requests_running, model_name)"
    return {
        "title": "Duet", "uid": "duet-overview", "description": "Duet router and servers (vLLM-named metrics plus "
        "duet_* for disaggregation). Scrape the router, or the servers' --metrics-port, not both.",
        "tags": ["duet", "vllm"], "editable": True, "schemaVersion": 39, "version": 1, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "timezone": "", "graphTooltip": 1,
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            {"name": "model_name", "label": "Model", "type": "query",
             "datasource": {"type": "prometheus", "uid": "${datasource}"}, "definition": model_query,
             "query": {"query": model_query, "refId": "model_name"}, "current": {}, "hide": 0, "refresh": 2,
             "includeAll": False, "multi": False, "sort": 1},
        ]},
        "annotations": {"list": []}, "links": [], "panels": panels,
    }


def main() -> None:
    OUT.write_text(json.dumps(dashboard(), indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
