"""A registry per HTTP endpoint and its text exposition.

Every endpoint (router, colocated server, per-server exporter) owns one ``CollectorRegistry`` rather than
prometheus_client's global one: tests run several front ends in one process, and a vLLM engine inside a
server registers vLLM's own metrics in the global registry, which would duplicate the names Duet exposes.
The process collectors (``process_*``, ``python_gc_*``, ``python_info``) are added to each registry, as
vLLM's server exposes them too.

Multiprocess: each endpoint's families are collected in the process that serves them (server stats are
read from the server itself, the router's from the router), so nothing needs prometheus_client's
multiprocess mode. Gauges made here still carry a ``multiprocess_mode`` so that a process started with
``PROMETHEUS_MULTIPROC_DIR`` set (a vLLM environment may set it) keeps working.
"""
from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector


def new_registry(*, process_metrics: bool = True) -> CollectorRegistry:
    """An empty registry, with the process / GC / platform collectors unless ``process_metrics`` is False."""
    registry = CollectorRegistry(auto_describe=True)
    if process_metrics:
        ProcessCollector(registry=registry)
        GCCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """(body, Content-Type) of ``registry``: Prometheus text by default, OpenMetrics when ``accept`` asks."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


class StaticCollector(Collector):
    """Serves families computed elsewhere: ``set(families)`` right before the registry is rendered.

    For families that need an ``await`` to compute (the router asks its servers for stats), which a
    collector's synchronous ``collect()`` cannot do. Used from one thread (an event loop)."""

    def __init__(self):
        self._families: list = []

    def set(self, families: Iterable) -> None:
        self._families = list(families)

    def collect(self):
        return iter(self._families)

    def describe(self):
        return []  # families change from one scrape to the next; no name reservation at registration
