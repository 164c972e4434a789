"""A server's stats as Prometheus families: the one table that names server stats as metrics.

A server reports its stats as a flat mapping of numbers (``Stats.values`` on the wire; the server's own
``stats()``): ``running``, ``waiting``, ``free_blocks``, ``prefix_hit_tokens``, ``kv_bytes_sent``, ...
``stats_families`` turns the stats of one or more engines into families, one family per name whatever the
number of engines (a name may appear once in an exposition), used by:

- the per-server exporter (``server_exporter``): one engine, the server itself;
- the colocated server (``LocalDispatcher`` / ``VllmDispatcher``): one engine, label ``engine="0"`` as vLLM;
- the router (``ClusterDispatcher``): every server that answered its ``StatsRequest``, ``engine`` = its id.

What vLLM measures the same way gets vLLM's name, type and labels (``model_name``, ``engine``; plus
``source`` where vLLM has it); the rest is ``duet_*`` with ``model_name``, ``engine`` and ``role``. A key
missing from a server's stats gives no sample (no made-up zero); a key missing from this table is still
exported, as gauge ``duet_server_<key>``, so a new stat is never lost (a test keeps today's keys listed).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

VLLM_LABELS = ("model_name", "engine")
DUET_LABELS = ("model_name", "engine", "role")
UNLISTED_PREFIX = "duet_server_"
_NAME_SAFE = re.compile(r"[^a-zA-Z0-9_]")


@dataclass(frozen=True)
class StatMetric:
    """One family fed by one stats key (``key``) or computed from several (``derive``)."""

    name: str
    """Family name; counters without ``_total`` (the exposition adds it)."""
    kind: str
    """``counter`` or ``gauge``."""
    documentation: str
    key: str | None = None
    derive: Callable[[Mapping[str, float]], float | None] | None = None
    """Value from the whole stats mapping, None when its inputs are missing."""
    extra_labels: tuple[tuple[str, str], ...] = ()
    """Constant labels beyond the standard ones (vLLM's ``source``)."""

    def value(self, stats: Mapping[str, float]) -> float | None:
        if self.derive is not None:
            return self.derive(stats)
        return stats.get(self.key)  # type: ignore[arg-type]

    @property
    def labelnames(self) -> tuple[str, ...]:
        base = VLLM_LABELS if self.name.startswith("vllm:") else DUET_LABELS
        return base + tuple(k for k, _ in self.extra_labels)


def _sum(*keys: str) -> Callable[[Mapping[str, float]], float | None]:
    def derive(stats: Mapping[str, float]) -> float | None:
        present = [stats[k] for k in keys if k in stats]
        return float(sum(present)) if present else None
    return derive


def _kv_usage(stats: Mapping[str, float]) -> float | None:
    total, free = stats.get("total_blocks"), stats.get("free_blocks")
    if total is None or free is None:
        return None
    return (total - free) / total if total > 0 else 0.0


_PROMPT_SOURCES = (("local_compute", "prompt_tokens_computed"), ("local_cache_hit", "prefix_hit_tokens"),
                   ("external_kv_transfer", "prompt_tokens_external"),
                   # KV tiers (issue 19): loaded from the server's host tier, pulled from another server's tiers.
                   ("local_host_tier", "host_hit_tokens"), ("external_kv_pull", "pulled_tokens"))

STAT_METRICS: tuple[StatMetric, ...] = (
    # ---- vLLM's names (vllm/v1/metrics/loggers.py), same meaning --------------------------------------------
    StatMetric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", "running"),
    StatMetric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", "waiting"),
    StatMetric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
               derive=_kv_usage),
    StatMetric("vllm:prefix_cache_queries", "counter",
               "Prefix cache queries, in terms of number of queried tokens.", "prefix_query_tokens"),
    StatMetric("vllm:prefix_cache_hits", "counter", "Prefix cache hits, in terms of number of cached tokens.",
               "prefix_hit_tokens"),
    StatMetric("vllm:num_preemptions", "counter", "Cumulative number of preemption from the engine.", "preemptions"),
    StatMetric("vllm:prompt_tokens", "counter", "Number of prefill tokens processed.",
               derive=_sum(*(k for _, k in _PROMPT_SOURCES))),
    *(StatMetric("vllm:prompt_tokens_by_source", "counter", "Number of prompt tokens by source.", key,
                 extra_labels=(("source", source),)) for source, key in _PROMPT_SOURCES),
    StatMetric("vllm:prompt_tokens_cached", "counter", "Number of cached prompt tokens (local + external).",
               derive=_sum("prefix_hit_tokens", "prompt_tokens_external", "host_hit_tokens", "pulled_tokens")),
    StatMetric("vllm:generation_tokens", "counter", "Number of generation tokens processed.", "generated_tokens"),
    # ---- Duet's own ----------------------------------------------------------------------------------------
    StatMetric("duet_num_requests_waiting_for_kv", "gauge",
               "Decode-side requests admitted and waiting for their KV from a prefill server.", "waiting_for_kv"),
    StatMetric("duet_kv_free_blocks", "gauge", "KV blocks not referenced by a request (idle cached blocks count).",
               "free_blocks"),
    StatMetric("duet_kv_total_blocks", "gauge", "KV blocks in the server's pool.", "total_blocks"),
    StatMetric("duet_kv_cached_blocks", "gauge", "Free KV blocks that still hold a cached prefix (evictable).",
               "cached_blocks"),
    StatMetric("duet_engine_healthy", "gauge", "1 while the server's engine runs, 0 once it failed.", "engine_healthy"),
    StatMetric("duet_open_requests", "gauge",
               "Requests the server tracks (generating, awaiting KV, or prefilling for a peer).", "open_requests"),
    StatMetric("duet_kv_open_transfers", "gauge", "KV hand-offs in flight on the server (either direction).",
               "open_transfers"),
    StatMetric("duet_kv_sent_bytes", "counter", "KV bytes written to decode servers (prefill side).", "kv_bytes_sent"),
    StatMetric("duet_kv_sent_descriptors", "counter", "Transfer descriptors (writes) posted for KV.",
               "kv_descriptors_sent"),
    StatMetric("duet_kv_layer_sends", "counter", "Per-layer KV writes posted.", "kv_layer_sends"),
    StatMetric("duet_kv_transfers_sent", "counter", "KV hand-offs whose every layer was written.", "kv_transfers_sent"),
    StatMetric("duet_kv_send_failures", "counter", "KV hand-offs that failed on the sending side.",
               "kv_transfers_failed_send"),
    StatMetric("duet_kv_received_bytes", "counter", "KV bytes received from prefill servers (decode side).",
               "kv_bytes_received"),
    StatMetric("duet_kv_received_layers", "counter", "Per-layer KV arrivals.", "kv_layers_received"),
    StatMetric("duet_kv_transfers_received", "counter", "KV hand-offs received complete.", "kv_transfers_received"),
    StatMetric("duet_kv_receive_failures", "counter", "KV hand-offs that failed or timed out on the receiving side.",
               "kv_transfers_failed"),
    StatMetric("duet_kv_transfers_cancelled", "counter", "KV hand-offs cancelled (request aborted or finished).",
               "kv_transfers_cancelled"),
    StatMetric("duet_kv_transfer_seconds", "counter",
               "Seconds from admission to the last KV layer, summed over received hand-offs "
               "(divided by duet_kv_transfers_received_total: the mean).", "kv_transfer_seconds_sum"),
    StatMetric("duet_kv_transfer_seconds_max", "gauge", "Longest received hand-off so far, in seconds.",
               "kv_transfer_seconds_max"),
    StatMetric("duet_kv_fallbacks", "counter",
               "Requests whose KV did not arrive and were prefilled locally (kv failure policy recompute).",
               "kv_fallbacks"),
    StatMetric("duet_kv_failed_requests", "counter",
               "Requests failed because their KV did not arrive (kv failure policy fail).", "kv_failed_requests"),
    StatMetric("duet_kv_duplicate_notifications", "counter", "KV layer notifications that arrived more than once.",
               "kv_duplicate_notifications"),
    StatMetric("duet_peers_refused", "counter", "Transfers refused because the peer's KV layout or transport did not "
               "fit, or it could not be reached.", "peers_refused"),
    StatMetric("duet_kv_events_published", "counter", "KV cache events published for the router's prefix index.",
               "kv_events_published"),
    # ---- KV tiers (issue 19): the host tier and prefix pulls; their tokens are prompt_tokens_by_source ----------
    StatMetric("duet_kv_tier_lookups", "counter", "Admissions that looked past their device prefix hits (host tier "
               "or a pull).", "tier_lookups"),
    StatMetric("duet_kv_host_hits", "counter", "Admissions that loaded blocks from the host tier.", "host_hits"),
    StatMetric("duet_kv_host_blocks", "gauge", "Blocks in the host tier.", "host_tier_blocks"),
    StatMetric("duet_kv_host_cached_blocks", "gauge", "Host-tier blocks holding a cached block.",
               "host_tier_cached_blocks"),
    StatMetric("duet_kv_host_busy_blocks", "gauge", "Host-tier blocks a copy is reading or writing now.",
               "host_tier_busy_blocks"),
    StatMetric("duet_kv_host_offload_blocks", "counter", "Blocks written through to the host tier.",
               "host_offload_blocks"),
    StatMetric("duet_kv_host_offload_bytes", "counter", "Bytes written through to the host tier.", "host_offload_bytes"),
    StatMetric("duet_kv_host_load_blocks", "counter", "Blocks loaded from the host tier into the device pool.",
               "host_load_blocks"),
    StatMetric("duet_kv_host_load_bytes", "counter", "Bytes loaded from the host tier.", "host_load_bytes"),
    StatMetric("duet_kv_host_load_failures", "counter", "Host-tier loads that failed (those tokens were recomputed).",
               "host_load_failures"),
    StatMetric("duet_kv_host_load_seconds", "counter", "Seconds from submission to the end of each host-tier load, "
               "summed (divided by duet_kv_host_hits_total: about the mean).", "host_load_seconds_sum"),
    StatMetric("duet_kv_host_load_seconds_max", "gauge", "Longest host-tier load so far, in seconds.",
               "host_load_seconds_max"),
    StatMetric("duet_kv_host_evictions", "counter", "Host-tier blocks evicted (least recently used, never one being "
               "read).", "host_evictions"),
    StatMetric("duet_kv_host_writes_refused", "counter", "Write-throughs dropped: every host block was being "
               "written or read.", "host_writes_refused"),
    StatMetric("duet_kv_pulls_started", "counter", "Prefix pulls this server started receiving.", "pulls_started"),
    StatMetric("duet_kv_pull_hits", "counter", "Prefix pulls whose blocks were used (the rest recomputed).",
               "pull_hits"),
    StatMetric("duet_kv_pull_received_bytes", "counter", "Bytes received by prefix pulls.", "pull_bytes_received"),
    StatMetric("duet_kv_pull_seconds", "counter", "Seconds of prefix pulls on the receiving side, summed.",
               "pull_seconds_sum"),
    StatMetric("duet_kv_pulls_served", "counter", "Prefix pulls this server sent completely.", "pulls_served"),
    StatMetric("duet_kv_pull_serve_failures", "counter", "Prefix pulls this server could not send (blocks gone, the "
               "puller cancelled, a write failed).", "pulls_served_failed"),
    StatMetric("duet_kv_pull_served_bytes", "counter", "Bytes sent by prefix pulls.", "pull_bytes_served"),
)

KNOWN_KEYS = frozenset(m.key for m in STAT_METRICS if m.key is not None)


@dataclass(frozen=True)
class EngineStats:
    """One engine's stats with the labels that identify it."""

    engine: str
    """Its engine id (``engine`` label; vLLM's is the engine index, ``0`` for one engine)."""
    role: str
    """``prefill``, ``decode`` or ``both``."""
    values: Mapping[str, float]


def as_stats(raw: Any) -> dict[str, float]:
    """A stats mapping (or a dataclass of them) as ``{key: float}``; non-numeric and non-finite entries dropped."""
    if dataclasses.is_dataclass(raw) and not isinstance(raw, type):
        raw = dataclasses.asdict(raw)
    out: dict[str, float] = {}
    for key, value in dict(raw or {}).items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(key, str) and isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


def unlisted_name(key: str) -> str:
    return UNLISTED_PREFIX + _NAME_SAFE.sub("_", key)


def stats_families(model_name: str, engines: Iterable[EngineStats]) -> list[Metric]:
    """Families for the given engines' stats: one family per name, one sample per engine that has the value."""
    engines = list(engines)
    families: dict[tuple[str, str], Metric] = {}

    def family(name: str, kind: str, documentation: str, labelnames: tuple[str, ...]) -> Metric:
        fam = families.get((name, kind))
        if fam is None:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            fam = families[(name, kind)] = cls(name, documentation, labels=list(labelnames))
        return fam

    for spec in STAT_METRICS:
        for e in engines:
            value = spec.value(e.values)
            if value is None:
                continue
            base = [model_name, e.engine] + ([e.role] if not spec.name.startswith("vllm:") else [])
            family(spec.name, spec.kind, spec.documentation, spec.labelnames).add_metric(
                base + [v for _, v in spec.extra_labels], float(value))
    for e in engines:
        for key in sorted(set(e.values) - KNOWN_KEYS):
            family(unlisted_name(key), "gauge", f"Server stat {key!r} (not named in engine/metrics/server_stats.py).",
                   DUET_LABELS).add_metric([model_name, e.engine, e.role], e.values[key])
    return list(families.values())
