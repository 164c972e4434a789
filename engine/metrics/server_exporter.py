"""``--metrics-port`` of prefill and decode servers: their own ``GET /metrics`` and ``GET /health`` over HTTP.

A server that speaks only ZeroMQ still gets scraped like any vLLM server, and probed like one: ``/health``
answers 200 while the server's ``ready`` callable says it takes requests, 503 otherwise (draining, its engine
dead), so a Kubernetes readiness probe stops routing to a draining pod. The exporter runs a threading WSGI
server (prometheus_client's metrics app behind a two-route dispatcher) on a daemon thread; each scrape calls
the server's ``stats`` callable on
that thread and turns the result into families through ``server_stats.stats_families`` (the same table the
router uses for the stats it gathers), next to the process collectors and whatever the server registered
itself on ``exporter.registry`` (its own histograms, say).

    exporter = ServerMetricsExporter(server.stats, model_name="my-model", role="decode",
                                     engine_id=server.engine_id, host="0.0.0.0", port=9100).start()
    ...
    exporter.close()

``stats`` is called from the exporter's thread, at scrape time: it must be safe to call there (read
counters; copy before iterating containers that the server's thread mutates) or return a snapshot the
server refreshes (``lambda: server.last_stats``). It may return a mapping of numbers or a dataclass of
them (``ServerStats``). When it raises, the scrape still answers: the stats families are left out and
``duet_server_stats_errors_total`` counts the failure.
"""
from __future__ import annotations

import logging
import socketserver
import threading
from typing import Any, Callable, Sequence
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, Histogram, make_wsgi_app

from duet.engine.metrics.exposition import new_registry
from duet.engine.metrics.server_stats import DUET_LABELS, VLLM_LABELS, EngineStats, as_stats, stats_families

logger = logging.getLogger(__name__)


class _StatsCollector:
    def __init__(self, stats: Callable[[], Any], model_name: str, role: str, engine_id: str, errors):
        self.stats, self.model_name, self.role, self.engine_id = stats, model_name, role, engine_id
        self.errors = errors

    def collect(self):
        try:
            values = as_stats(self.stats())
        except Exception:  # noqa: BLE001 - a failing stats call must not fail the scrape
            self.errors.inc()
            logger.warning("stats for /metrics failed", exc_info=True)
            return iter(())
        return iter(stats_families(self.model_name, [EngineStats(self.engine_id, self.role, values)]))

    def describe(self):
        return []


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up close()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass  # scrapes and probes every few seconds: not worth a log line each


class ServerMetricsExporter:
    """Serves one server's metrics at ``http://HOST:PORT/metrics`` from a background thread.

    ``model_name``: the server's first served model name (vLLM's ``model_name`` label). ``role``:
    ``prefill``, ``decode`` or ``both``. ``engine_id``: the server's engine id (``engine`` label).
    ``port`` 0 picks a free port (``exporter.port`` after ``start()``).
    """

    def __init__(self, stats: Callable[[], Any], *, model_name: str, role: str, engine_id: str,
                 host: str = "127.0.0.1", port: int = 0, process_metrics: bool = True,
                 ready: Callable[[], bool] = lambda: True):
        """``ready``: whether the server takes requests (``GET /health``: 200 or 503), called on the exporter's
        thread like ``stats``."""
        if not model_name:
            raise ValueError("model_name must be a non-empty string")
        if not engine_id:
            raise ValueError("engine_id must be a non-empty string")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        self.host, self.port = host, port
        self.model_name, self.role, self.engine_id = model_name, role, engine_id
        self.registry = new_registry(process_metrics=process_metrics)
        errors = Counter("duet_server_stats_errors", "Scrapes whose stats call raised.", list(DUET_LABELS),
                         registry=None)
        # Stats first: a scrape whose stats call fails already shows the failure in its error count.
        self.registry.register(_StatsCollector(stats, model_name, role, engine_id, errors.labels(model_name,
                                                                                                  engine_id, role)))
        self.registry.register(errors)
        self.ready = ready
        self._metrics_app = make_wsgi_app(self.registry)
        self._httpd = None
        self._thread: threading.Thread | None = None

    def histogram(self, name: str, documentation: str, buckets: Sequence[float]):
        """A histogram in this exporter's registry, already labelled with the server's labels (vLLM's two for
        a ``vllm:`` name, plus ``role`` for a ``duet_`` name); call ``.observe(value)`` on it from any thread."""
        labelnames = VLLM_LABELS if name.startswith("vllm:") else DUET_LABELS
        values = (self.model_name, self.engine_id, self.role)[:len(labelnames)]
        return Histogram(name, documentation, list(labelnames), buckets=buckets, registry=self.registry).labels(*values)

    def start(self) -> "ServerMetricsExporter":
        """Bind and serve; raises ``OSError`` naming the address when the port is taken."""
        if self._httpd is not None:
            return self
        try:
            self._httpd = make_server(self.host, self.port, self._app, _ThreadingWSGIServer,
                                      handler_class=_QuietHandler)
        except OSError as e:
            raise OSError(e.errno, f"--metrics-port: cannot listen on {self.host}:{self.port}: {e.strerror}") from e
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="duet-metrics", daemon=True)
        self._thread.start()
        self.port = self._httpd.server_port
        logger.info("metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    def _app(self, environ, start_response):
        if environ.get("PATH_INFO") != "/health":
            return self._metrics_app(environ, start_response)
        try:
            ok = bool(self.ready())
        except Exception:  # noqa: BLE001 - a probe that cannot tell says "not ready"
            logger.warning("readiness check failed", exc_info=True)
            ok = False
        body = b'{"status": "ok"}\n' if ok else b'{"status": "unavailable"}\n'
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and join the thread. Idempotent."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "ServerMetricsExporter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
