"""Prometheus scraping and the hand-off overhead of disaggregated serving, for ``bench.serving``.

Hand-off overhead = disaggregated TTFT - prefill compute time (p50), the prefill time read from the server's
``duet_prefill_compute_seconds`` histogram (before/after a run, differenced) or a file.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

PREFILL_HISTOGRAM = "duet_prefill_compute_seconds"
PREFILL_GAUGE = PREFILL_HISTOGRAM + "_p50"  # what the router exposes when it keeps no histogram


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of the Prometheus text format as (name, labels, value); comments and bad lines are skipped."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE_RE.match(line.strip())
        if match is None:
            continue
        name, labels, value = match.groups()
        try:
            samples.append((name, dict(_LABEL_RE.findall(labels or "")), float(value)))
        except ValueError:
            continue
    return samples


@dataclass
class Histogram:
    """A Prometheus histogram summed over its label sets: cumulative bucket counts by upper bound."""

    buckets: dict[float, float]
    sum: float
    count: float

    @classmethod
    def from_samples(cls, samples: Sequence[tuple[str, dict[str, str], float]], name: str) -> Histogram | None:
        buckets: dict[float, float] = {}
        total = {"_sum": 0.0, "_count": 0.0}
        found = False
        for sample_name, labels, value in samples:
            if sample_name == name + "_bucket" and "le" in labels:
                le = float(labels["le"].replace("Inf", "inf"))
                buckets[le] = buckets.get(le, 0.0) + value
                found = True
            elif sample_name in (name + "_sum", name + "_count"):
                total[sample_name[len(name):]] += value
                found = True
        return cls(dict(sorted(buckets.items())), total["_sum"], total["_count"]) if found else None

    def __sub__(self, other: Histogram) -> Histogram:
        buckets = {le: n - other.buckets.get(le, 0.0) for le, n in self.buckets.items()}
        return Histogram(buckets, self.sum - other.sum, self.count - other.count)

    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        """Linear interpolation inside the bucket holding rank ``q * count`` (as ``histogram_quantile``)."""
        finite = [(le, n) for le, n in self.buckets.items() if math.isfinite(le)]
        if self.count <= 0 or not finite:
            return None
        rank = q * self.count
        lower_le, lower_n = 0.0, 0.0
        for le, n in finite:
            if n >= rank:
                return lower_le + (le - lower_le) * ((rank - lower_n) / (n - lower_n) if n > lower_n else 1.0)
            lower_le, lower_n = le, n
        return finite[-1][0]  # rank lies in the +Inf bucket: the highest finite bound is all we know

    def p50_or_mean(self) -> tuple[float | None, str]:
        if self.buckets:
            return self.quantile(0.5), "p50 (histogram buckets)"
        return self.mean(), "mean (sum / count)"


def handoff_overhead(ttft_disagg_p50_s: float | None, prefill_compute_s_p50: float | None) -> float | None:
    """Hand-off overhead (s) = disaggregated TTFT p50 - prefill compute p50; None when either is unknown."""
    if ttft_disagg_p50_s is None or prefill_compute_s_p50 is None:
        return None
    return ttft_disagg_p50_s - prefill_compute_s_p50


async def _read_prefill(session, source: str) -> tuple[Histogram | float | None, str]:
    """What ``source`` says now, and how to read it; (None, why) when it says nothing."""
    try:
        if source.startswith(("http://", "https://")):
            async with session.get(source) as resp:
                resp.raise_for_status()
                text = await resp.text()
        else:
            text = Path(source).read_text()
        if source.endswith(".json"):
            return float(json.loads(text)["prefill_compute_s_p50"]), "given (JSON)"
    except Exception as exc:  # noqa: BLE001 - metrics are optional; the report says N/A
        logger.warning("cannot read the prefill compute time from %s: %s", source, exc)
        return None, f"N/A ({type(exc).__name__})"
    samples = parse_prometheus(text)
    hist = Histogram.from_samples(samples, PREFILL_HISTOGRAM)
    if hist is not None:
        return hist, "histogram"
    gauges = [value for name, _, value in samples if name == PREFILL_GAUGE]
    if gauges:  # a rolling p50 kept by the router: it cannot exclude traffic from before the run
        return float(np.mean(gauges)), f"{PREFILL_GAUGE} gauge (rolling window)"
    return None, f"N/A (no {PREFILL_HISTOGRAM} in the metrics)"


def _handoff(source: str, before, after, ttft_p50_ms: float | None) -> dict:
    """The hand-off entry of a run from what the prefill source said before and after it."""
    (prefill, stat), prefill_s = after, None
    if isinstance(prefill, Histogram):
        hist = prefill - before[0] if isinstance(before[0], Histogram) else prefill
        prefill_s, stat = hist.p50_or_mean() if hist.count > 0 else (None, "N/A (no prefill during the run)")
    elif prefill is not None:
        prefill_s = prefill
    overhead_s = handoff_overhead(None if ttft_p50_ms is None else ttft_p50_ms / 1e3, prefill_s)
    return {"source": source, "prefill_compute_stat": stat, "prefill_compute_p50_ms": _ms(prefill_s),
            "handoff_p50_ms": _ms(overhead_s)}


