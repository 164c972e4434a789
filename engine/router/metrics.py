"""Prometheus metrics without a dependency: counters, gauges, histograms and the text format 0.0.4.

The HTTP front end owns one ``Registry``; ``GET /metrics`` renders it followed by the dispatcher's own samples
(``Dispatcher.metrics()``), which are plain (name, labels, value) triples rendered by ``render_samples``.
Everything runs on the front end's event loop, so no locking.

    registry = Registry()
    requests = registry.counter("duet_http_requests_total", "HTTP requests.", ["endpoint", "status"])
    requests.labels(endpoint="/v1/completions", status="200").inc()
    text = registry.render()
"""
from __future__ import annotations

import abc

import math
import re
from typing import Iterable, Sequence

_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _sample_line(name: str, labels: dict[str, str], value: float) -> str:
    return f"{name}{_format_labels(labels)} {_format_value(value)}"


class _Metric(abc.ABC):
    kind = "untyped"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()):
        if not _NAME_RE.fullmatch(name or ""):
            raise ValueError(f"name: {name!r} is not a valid Prometheus metric name")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _Metric] = {}
        self._labelvalues: tuple[str, ...] = ()

    def labels(self, **labelvalues: str):
        """The child for these label values (created on first use)."""
        if set(labelvalues) != set(self.labelnames):
            raise ValueError(f"labels: expected {self.labelnames}, got {tuple(labelvalues)}")
        key = tuple(str(labelvalues[n]) for n in self.labelnames)
        child = self._children.get(key)
        if child is None:
            child = self._new_child()
            child._labelvalues = key
            self._children[key] = child
        return child

    def _new_child(self) -> "_Metric":
        return type(self)(self.name, self.documentation)

    def _check_unlabelled(self) -> None:
        if self.labelnames:
            raise ValueError(f"{self.name}: labelled metric; call .labels(...) first")

    def _series(self) -> Iterable[tuple[dict[str, str], "_Metric"]]:
        if not self.labelnames:
            yield {}, self
        for key, child in self._children.items():
            yield dict(zip(self.labelnames, key)), child

    @abc.abstractmethod
    def _lines(self, labels: dict[str, str]) -> list[str]:
        """Sample lines of one series (one label combination)."""

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.documentation.replace(chr(10), ' ')}", f"# TYPE {self.name} {self.kind}"]
        for labels, series in self._series():
            lines.extend(series._lines(labels))
        return lines


class Counter(_Metric):
    """Monotonic count. The name should end in ``_total``."""

    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()):
        super().__init__(name, documentation, labelnames)
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self._check_unlabelled()
        if amount < 0:
            raise ValueError(f"amount: counters only go up, got {amount}")
        self.value += amount

    def _lines(self, labels: dict[str, str]) -> list[str]:
        return [_sample_line(self.name, labels, self.value)]


class Gauge(_Metric):
    """A value that goes up and down."""

    kind = "gauge"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()):
        super().__init__(name, documentation, labelnames)
        self.value = 0.0

    def set(self, value: float) -> None:
        self._check_unlabelled()
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        self._check_unlabelled()
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)

    def _lines(self, labels: dict[str, str]) -> list[str]:
        return [_sample_line(self.name, labels, self.value)]


class Histogram(_Metric):
    """Observations counted into cumulative buckets (``le`` upper bounds, ``+Inf`` added)."""

    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = LATENCY_BUCKETS_S):
        super().__init__(name, documentation, labelnames)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"buckets: need distinct finite bounds, got {buckets!r}")
        self.buckets = tuple(bounds)
        self.bucket_counts = [0] * (len(self.buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def _new_child(self) -> "Histogram":
        return Histogram(self.name, self.documentation, buckets=self.buckets)

    def observe(self, value: float) -> None:
        self._check_unlabelled()
        idx = len(self.buckets)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                idx = i
                break
        self.bucket_counts[idx] += 1
        self.sum += value
        self.count += 1

    def _lines(self, labels: dict[str, str]) -> list[str]:
        lines, cumulative = [], 0
        for bound, n in zip(self.buckets + (math.inf,), self.bucket_counts):
            cumulative += n
            le = "+Inf" if math.isinf(bound) else repr(bound)
            lines.append(_sample_line(f"{self.name}_bucket", {**labels, "le": le}, cumulative))
        lines.append(_sample_line(f"{self.name}_sum", labels, self.sum))
        lines.append(_sample_line(f"{self.name}_count", labels, self.count))
        return lines


class Registry:
    """Named metrics rendered together; one per front end."""

    def __init__(self):
        self._metrics: dict[str, _Metric] = {}

    def register(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"name: metric {metric.name!r} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        return self.register(Counter(name, documentation, labelnames))

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self.register(Gauge(name, documentation, labelnames))

    def histogram(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS_S) -> Histogram:
        return self.register(Histogram(name, documentation, labelnames, buckets))

    def names(self) -> list[str]:
        return list(self._metrics)

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics.values():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


def render_samples(samples: Iterable[tuple[str, dict[str, str], float]], skip_names: Iterable[str] = ()) -> str:
    """Text lines for extra (name, labels, value) samples, grouped by name under an untyped ``# TYPE``.

    Names already rendered by the registry (``skip_names``) or not valid metric names are dropped, so a
    misbehaving backend cannot corrupt the exposition.
    """
    skip = set(skip_names)
    by_name: dict[str, list[str]] = {}
    for name, labels, value in samples:
        if not isinstance(name, str) or name in skip or not name.startswith("duet_"):
            continue
        if not _NAME_RE.fullmatch(name) or not all(_LABEL_RE.fullmatch(str(k)) for k in (labels or {})):
            continue
        try:
            line = _sample_line(name, dict(labels or {}), float(value))
        except (TypeError, ValueError):
            continue
        by_name.setdefault(name, []).append(line)
    lines: list[str] = []
    for name, samples_ in by_name.items():
        lines.append(f"# TYPE {name} {'counter' if name.endswith('_total') else 'gauge'}")
        lines.extend(samples_)
    return "\n".join(lines) + "\n" if lines else ""
