"""The router's own metrics (``duet_router_*``, the hand-off histograms) and its view of every server.

``ClusterDispatcher`` owns one ``RouterMetrics``: it counts placement decisions, retries, migrations,
rejections and server deaths as they happen, and observes prefill compute and hand-off times. At scrape
time ``families`` adds what only the router knows about each server (health, the load it last reported)
and the cluster's KV usage ratio, and turns the servers' stats (``StatsRequest`` answers) into the same
vLLM-named families a server's own ``--metrics-port`` serves (``engine.metrics.server_stats``), with the
server's engine id as ``engine``.

The prometheus_client objects here are registered in no registry: ``families`` collects them, and the
HTTP front end serves the result through its registry. Used from the router's event loop only.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from duet.engine.metrics.server_stats import EngineStats, as_stats, stats_families

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ADMISSION_REASONS = ("max_num_queued_reqs", "queue_timeout")
"""``vllm:admission_rejections`` reasons: the admission queue was full (``--max-queue``, vLLM's
``max_num_queued_reqs``) or a request waited past ``--queue-timeout-s`` (Duet's own)."""
EVENTS = ("retries", "migrations", "server_deaths", "prefill_failures", "queued", "prefix_hit_tokens_predicted",
          "stale_attempt_messages_dropped", "local_prefill_layout_mismatch", "pulls_planned", "pulls_served",
          "pulls_failed")


class RouterMetrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        m = (model_name,)
        self.decisions = Counter("duet_router_decisions", "Placement decisions by outcome (disaggregated, "
                                 "local_prefill:<why>, or the rejection reason).", ["model_name", "reason"],
                                 registry=None)
        self.rejections = Counter("duet_router_rejections", "Requests the router refused, by reason.",
                                  ["model_name", "reason"], registry=None)
        self.admission_rejections = Counter("vllm:admission_rejections",
                                            "Number of admission attempts rejected by a queue limit, by reason.",
                                            ["model_name", "reason"], registry=None)
        for reason in ADMISSION_REASONS:
            self.admission_rejections.labels(model_name, reason)
        docs = {"retries": "Requests re-placed on another server before their first token.",
                "migrations": "Requests moved to another decode server mid-stream (prompt + tokens so far).",
                "server_deaths": "Servers declared dead (missed heartbeats).",
                "prefill_failures": "Prefills a prefill server reported as failed.",
                "queued": "Requests that waited in the admission queue.",
                "prefix_hit_tokens_predicted": "Prompt tokens the prefix index expected the decode server to hold.",
                "stale_attempt_messages_dropped": "Output of a superseded attempt of a request (a server that "
                                                  "stalled and woke after the request moved on), dropped.",
                "local_prefill_layout_mismatch": "Prefills kept on the decode server because the chosen prefill "
                                                 "server has another KV layout (mid rolling model update).",
                "pulls_planned": "Requests placed with a pull of a prefix cached on another server (KV tiers).",
                "pulls_served": "Planned pulls whose owner sent every block.",
                "pulls_failed": "Planned pulls that failed or were declined (the puller computed the prefix)."}
        event_counters = [Counter(f"duet_router_{name}", docs[name], ["model_name"], registry=None) for name in EVENTS]
        self.events = {name: c.labels(*m) for name, c in zip(EVENTS, event_counters)}
        self._event_counters = dict(zip(EVENTS, event_counters))
        self.queue_length = Gauge("duet_router_queue_length", "Requests waiting in the admission queue now.",
                                  ["model_name"], registry=None, multiprocess_mode="mostrecent")
        self.prefill_compute = Histogram("duet_prefill_compute_seconds", "Prefill server compute per request.",
                                         ["model_name"], buckets=LATENCY_BUCKETS_S, registry=None)
        self.handoff = Histogram("duet_handoff_seconds",
                                 "Disaggregated time to first token minus prefill compute: the hand-off overhead.",
                                 ["model_name"], buckets=LATENCY_BUCKETS_S, registry=None)
        for metric in (self.queue_length, self.prefill_compute, self.handoff):
            metric.labels(model_name)  # present (at zero) from the first scrape on
        self._owned = (self.decisions, self.rejections, self.admission_rejections, *event_counters,
                       self.queue_length, self.prefill_compute, self.handoff)

    # ---- recording (event loop) ----------------------------------------------------------------------
    def decision(self, reason: str) -> None:
        self.decisions.labels(self.model_name, reason).inc()

    def rejection(self, reason: str) -> None:
        self.rejections.labels(self.model_name, reason).inc()
        if reason in ("queue_full", "queue_timeout"):
            self.admission_rejections.labels(
                self.model_name, "max_num_queued_reqs" if reason == "queue_full" else reason).inc()

    def event(self, name: str, amount: float = 1.0) -> None:
        self.events[name].inc(amount)

    def event_counts(self) -> dict[str, float]:
        """Every event's count so far (benchmarks and tests read it here; a scrape reads ``families``)."""
        return {name: sum(sample.value for metric in counter.collect() for sample in metric.samples
                          if sample.name.endswith("_total"))
                for name, counter in self._event_counters.items()}

    def set_queue_length(self, n: int) -> None:
        self.queue_length.labels(self.model_name).set(n)

    def observe_prefill_compute(self, seconds: float) -> None:
        self.prefill_compute.labels(self.model_name).observe(seconds)

    def observe_handoff(self, seconds: float) -> None:
        self.handoff.labels(self.model_name).observe(max(0.0, seconds))

    # ---- scrape --------------------------------------------------------------------------------------
    def families(self, links: Iterable, stats_by_address: Mapping[str, object]) -> list[Metric]:
        """Everything the router exposes beyond the front end's own request metrics.

        ``links``: the registry's ``ServerLink``s (``address``, ``engine_id``, ``info.role``, ``state``).
        ``stats_by_address``: the ``Stats`` messages (or their ``values``) of the servers that answered.
        """
        links = list(links)
        out: list[Metric] = []
        for metric in self._owned:
            out.extend(metric.collect())
        engines = []
        for lk in links:
            stats = stats_by_address.get(lk.address)
            if stats is not None:
                values = stats if isinstance(stats, Mapping) else stats.values
                engines.append(EngineStats(lk.engine_id, lk.info.role, as_stats(values)))
        out.extend(stats_families(self.model_name, engines))
        out.extend(_link_families(self.model_name, links))
        return out


def _link_families(model_name: str, links: list) -> list[Metric]:
    labels = ["model_name", "engine", "role", "server"]
    per_link = {
        "healthy": ("duet_router_server_healthy", "1 while the router routes to the server (heartbeats arrive).",
                    lambda s: float(s.healthy)),
        "running": ("duet_router_server_running_requests", "Requests in the server's batch (its last load report, "
                    "plus placements since).", lambda s: float(s.running_requests)),
        "queued": ("duet_router_server_queued_prefill_tokens", "Prompt tokens queued for prefill on the server.",
                   lambda s: float(s.queued_prefill_tokens)),
        "free": ("duet_router_server_free_blocks", "Free KV blocks on the server, as the router estimates them.",
                 lambda s: float(s.free_blocks)),
        "total": ("duet_router_server_total_blocks", "KV blocks in the server's pool.",
                  lambda s: float(s.total_blocks)),
    }
    families = {k: GaugeMetricFamily(name, doc, labels=labels) for k, (name, doc, _) in per_link.items()}
    used: dict[str, list[float]] = {}
    for lk in links:
        s, role = lk.state, lk.info.role
        for key, (_, _, value) in per_link.items():
            families[key].add_metric([model_name, lk.engine_id, role, lk.address], value(s))
        if s.healthy and s.total_blocks > 0:
            acc = used.setdefault(role, [0.0, 0.0])
            acc[0] += s.total_blocks - s.free_blocks
            acc[1] += s.total_blocks
    usage = GaugeMetricFamily("duet_router_kv_cache_usage_perc",
                              "KV-cache usage over the healthy servers of a role (used blocks / all blocks, from "
                              "their load reports). 1 means 100 percent usage.", labels=["model_name", "role"])
    for role, (num_used, num_total) in sorted(used.items()):
        usage.add_metric([model_name, role], min(1.0, max(0.0, num_used / num_total)))
    return [*families.values(), usage]
