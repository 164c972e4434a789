"""Serving benchmark: load on any OpenAI-compatible server, TTFT / ITL / E2E percentiles and throughput.

    python -m bench.serving --url http://127.0.0.1:8000 --label disagg [--num-requests 64]
        [--concurrency 4 | --request-rate 2] [--prompt-len uniform:64-512] [--output-len 128]
        [--compare-url http://127.0.0.1:8001 --compare-label colocated] [--handoff-from-metrics]

A request walks through this file as follows. ``build_trace`` draws every request up front from one seeded
RNG: a prompt of random token ids in ``[5, vocab_size)`` (a list of ints is a valid ``prompt`` for
``/v1/completions``, so no tokenizer is needed), its ``max_tokens``, and its arrival offset (0 in closed loop,
Poisson arrivals with ``--request-rate``). ``arun_benchmark`` releases the requests at their offsets, at most
``--concurrency`` in flight, and ``_send`` streams each one (``stream: true``, ``ignore_eos: true``,
``temperature: 0``, ``stream_options.include_usage``) through ``SSEParser`` and ``parse_chunk`` into a
``RequestRecord``. ``summarize`` turns the records into percentiles and throughput. With ``--compare-url`` the
same trace runs against the second server right after the first, so the baseline is measured in the same run.

Definitions (all clocks are the client's ``time.perf_counter``; the request clock starts just before the
HTTP POST is sent):

- Token chunk: an SSE event with a choice whose ``text`` is non-empty, or whose ``text`` is empty while its
  ``finish_reason`` is null. The second case is a token whose text the server holds back (an incomplete UTF-8
  sequence); it still marks a token's arrival. An empty-text chunk that carries the finish reason and the
  usage-only chunk (``choices: []``) are not token chunks.
- TTFT: request start to the arrival of the first token chunk.
- ITL: gaps between arrivals of successive token chunks, pooled over all requests. Events that arrive in the
  same network read share a timestamp, so a server that coalesces tokens shows gaps of 0 (and a server that
  packs several tokens per chunk shows fewer, longer gaps; TPOT below is per token).
- TPOT: (E2E - TTFT) / (output tokens - 1), per request with at least 2 output tokens.
- E2E: request start to the end of the stream (``data: [DONE]``).
- Output tokens: ``usage.completion_tokens`` from the usage chunk; without one, the number of token chunks
  (and ``num_missing_usage`` counts those requests).
- Errors: an HTTP status other than 200 (400, 429, ...), a connection error or timeout, an ``error`` object
  in the stream, a stream without ``[DONE]``, or a stream without any token. Failed requests are excluded
  from the latency percentiles and the throughput, and counted in ``errors``.
- Throughput: successful requests (output tokens) / wall time from the first release to the last finish.

Hand-off overhead (disaggregated serving): ``handoff_overhead(ttft_p50_s, prefill_compute_p50_s)`` = TTFT of
the disaggregated server minus the time the prefill server spent computing, i.e. what routing, queueing, the
KV transfer, the decode admission and the HTTP path add. ``--handoff-from-metrics [SOURCE]`` gets the prefill
compute time for the ``--url`` run from the histogram ``duet_prefill_compute_seconds``: SOURCE ``auto`` (the
default when the flag is bare) is ``<url>/metrics``; any other ``http(s)://`` URL is scraped too. A scraped
source is read before and after the run and the difference is used, so earlier traffic is excluded; its p50
is interpolated from the buckets like Prometheus' ``histogram_quantile``, or is the mean (sum / count) when
the histogram has no buckets. Without the histogram, the gauge ``duet_prefill_compute_seconds_p50`` (a
rolling p50, earlier traffic included) is used. SOURCE may also be a file: JSON
``{"prefill_compute_s_p50": x}`` or Prometheus text (used as is). Without data the overhead reads N/A.

Caveat: when ``--compare-url`` is the same server as ``--url``, the second run repeats the same prompts and
hits the prefix cache.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import aiohttp
import numpy as np

from duet.bench.prefill_metrics import (  # noqa: F401 - re-exported for scripts that import them from here
    PREFILL_GAUGE, PREFILL_HISTOGRAM, Histogram, _handoff, _ms, _read_prefill, handoff_overhead, parse_prometheus)

logger = logging.getLogger(__name__)

MIN_TOKEN_ID = 5  # below this lie the special tokens of the tiny test models


# ----------------------------------------------------------------------------------------------- trace

@dataclass(frozen=True)
class LengthDist:
    """A length distribution: ``fixed`` (``low == high``) or ``uniform`` integers in ``[low, high]``."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if self.low < 1 or self.high < self.low:
            raise ValueError(f"length range must satisfy 1 <= low <= high, got {self.low}-{self.high}")

    def sample(self, rng: np.random.Generator, num: int) -> list[int]:
        return rng.integers(self.low, self.high + 1, size=num).tolist()

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"uniform:{self.low}-{self.high}"


def parse_length(spec: str | int) -> LengthDist:
    """``128``, ``fixed:128`` or ``uniform:64-512`` (bounds included)."""
    text = str(spec).strip().lower()
    try:
        if text.isdigit():
            return LengthDist(int(text), int(text))
        kind, _, arg = text.partition(":")
        if kind == "fixed":
            return LengthDist(int(arg), int(arg))
        if kind == "uniform":
            low, _, high = arg.partition("-")
            return LengthDist(int(low), int(high))
    except ValueError as exc:
        raise ValueError(f"bad length {spec!r}: {exc}") from exc
    raise ValueError(f"bad length {spec!r}: expected N, fixed:N or uniform:LOW-HIGH")


@dataclass(frozen=True)
class RequestSpec:
    """One request of the trace: what is sent and when it is released (seconds after the run starts)."""

    prompt_ids: list[int]
    max_tokens: int
    arrival_s: float


def build_trace(
    num_requests: int,
    prompt_len: LengthDist | str | int,
    output_len: LengthDist | str | int,
    seed: int = 0,
    vocab_size: int = 500,
    request_rate: float | None = None,
) -> list[RequestSpec]:
    """A seeded request trace; Poisson arrivals at ``request_rate`` req/s, else all released at 0."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if vocab_size <= MIN_TOKEN_ID:
        raise ValueError(f"vocab_size must be > {MIN_TOKEN_ID}, got {vocab_size}")
    if request_rate is not None and not request_rate > 0:
        raise ValueError(f"request_rate must be > 0, got {request_rate}")
    prompt_len = prompt_len if isinstance(prompt_len, LengthDist) else parse_length(prompt_len)
    output_len = output_len if isinstance(output_len, LengthDist) else parse_length(output_len)
    rng = np.random.default_rng(seed)
    prompt_lens = prompt_len.sample(rng, num_requests)
    output_lens = output_len.sample(rng, num_requests)
    if request_rate is None:
        arrivals_s = [0.0] * num_requests
    else:
        arrivals_s = np.cumsum(rng.exponential(1.0 / request_rate, size=num_requests)).tolist()
    return [
        RequestSpec(rng.integers(MIN_TOKEN_ID, vocab_size, size=n).tolist(), o, a)
        for n, o, a in zip(prompt_lens, output_lens, arrivals_s)
    ]


# ------------------------------------------------------------------------------------------ SSE parsing

class SSEParser:
    """Incremental server-sent-events parser: ``feed(bytes)`` yields the ``data`` of each complete event.

    Lines end with ``\\n`` or ``\\r\\n`` (a bare ``\\r`` is not supported); an event ends at a blank line;
    several ``data:`` lines of one event are joined with ``\\n``; comments (``:``) and other fields are ignored.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data_lines: list[str] = []

    def feed(self, raw: bytes) -> Iterator[str]:
        self._buffer += raw
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            text = line.rstrip(b"\r").decode("utf-8")
            if not text:
                if self._data_lines:
                    yield "\n".join(self._data_lines)
                    self._data_lines = []
            elif text.startswith("data:"):
                value = text[5:]
                self._data_lines.append(value[1:] if value.startswith(" ") else value)

    def close(self) -> Iterator[str]:
        """End of stream: an event left without its blank line is still delivered."""
        yield from self.feed(b"\n\n")


@dataclass
class Chunk:
    """What one SSE event of a streaming completion carries."""

    done: bool = False  # the ``[DONE]`` sentinel
    is_token: bool = False  # marks a token arrival (see the module docstring)
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    error: str | None = None


def parse_chunk(data: str) -> Chunk:
    """Interpret one ``data`` payload of a ``/v1/completions`` stream."""
    if data.strip() == "[DONE]":
        return Chunk(done=True)
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        return Chunk(error=f"malformed event: {data[:200]!r}")
    if not isinstance(obj, dict):
        return Chunk(error=f"unexpected event: {data[:200]!r}")
    if "error" in obj or obj.get("object") == "error":
        err = obj.get("error", obj)
        return Chunk(error=str(err.get("message", err) if isinstance(err, dict) else err)[:500])
    chunk = Chunk(usage=obj.get("usage") or None)
    choices = obj.get("choices") or []
    if choices:
        chunk.text = choices[0].get("text") or ""
        chunk.finish_reason = choices[0].get("finish_reason")
        chunk.is_token = bool(chunk.text) or chunk.finish_reason is None
    return chunk


# ------------------------------------------------------------------------------------------ statistics

def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100, linear interpolation between order statistics); None when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


@dataclass
class RequestRecord:
    """Client-side measurements of one request; times in seconds."""

    idx: int
    prompt_len: int
    max_tokens: int
    start_s: float = 0.0  # release time after the run started
    ok: bool = False
    error: str | None = None
    http_status: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    num_token_chunks: int = 0
    output_tokens: int = 0
    prompt_tokens: int | None = None
    usage_reported: bool = False
    finish_reason: str | None = None


def summarize(records: Sequence[RequestRecord | dict], duration_s: float | None = None) -> dict:
    """Percentiles (ms) and throughput of a run; failed requests only count in ``errors``.

    ``duration_s`` defaults to the span from the first release to the last finish in ``records``.
    """
    recs = [r if isinstance(r, RequestRecord) else RequestRecord(**r) for r in records]
    ok = [r for r in recs if r.ok]
    if duration_s is None:
        ends = [r.start_s + (r.e2e_s or 0.0) for r in recs]
        duration_s = max(ends) - min(r.start_s for r in recs) if recs else 0.0
    ttfts = [r.ttft_s for r in ok]
    e2es = [r.e2e_s for r in ok]
    itls = [gap for r in ok for gap in r.itl_s]
    tpots = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    num_output_tokens = sum(r.output_tokens for r in ok)
    out = {
        "num_requests": len(recs),
        "num_ok": len(ok),
        "errors": len(recs) - len(ok),
        "error_examples": sorted({r.error for r in recs if r.error})[:5],
        "duration_s": duration_s,
        "num_prompt_tokens": sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok),
        "num_output_tokens": num_output_tokens,
        "num_missing_usage": sum(not r.usage_reported for r in ok),
        "req_per_s": len(ok) / duration_s if duration_s > 0 else None,
        "out_tok_per_s": num_output_tokens / duration_s if duration_s > 0 else None,
    }
    for name, values in (("ttft", ttfts), ("itl", itls), ("tpot", tpots), ("e2e", e2es)):
        out[f"{name}_mean_ms"] = _ms(float(np.mean(values))) if values else None
        for q in (50, 90, 99):
            out[f"{name}_p{q}_ms"] = _ms(percentile(values, q))
    return out


# ---------------------------------------------------------------------------------------------- client

async def _send(session, url: str, payload: dict, headers: dict, record: RequestRecord, t0: float) -> None:
    """Stream one completion into ``record``; every failure ends up in ``record.error``."""
    parser, usage, done = SSEParser(), None, False
    start = time.perf_counter()
    record.start_s = start - t0
    last_token_t = None
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            record.http_status = resp.status
            if resp.status != 200:
                record.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            async for raw in resp.content.iter_any():
                now = time.perf_counter()
                for data in parser.feed(raw):
                    chunk = parse_chunk(data)
                    if chunk.error is not None:
                        record.error = chunk.error
                        return
                    done = done or chunk.done
                    usage = chunk.usage or usage
                    record.finish_reason = chunk.finish_reason or record.finish_reason
                    if chunk.is_token:
                        if last_token_t is None:
                            record.ttft_s = now - start
                        else:
                            record.itl_s.append(now - last_token_t)
                        last_token_t = now
                        record.num_token_chunks += 1
            for data in parser.close():
                done = done or parse_chunk(data).done
    except (asyncio.TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        return
    finally:
        record.e2e_s = time.perf_counter() - start
    if usage is not None and usage.get("completion_tokens") is not None:
        record.output_tokens, record.usage_reported = int(usage["completion_tokens"]), True
        record.prompt_tokens = usage.get("prompt_tokens")
    else:
        record.output_tokens = record.num_token_chunks
    if not done:
        record.error = "stream ended without [DONE]"
    elif record.ttft_s is None:
        record.error = "stream carried no token"
    else:
        record.ok = True


async def _default_model(session, base_url: str, headers: dict) -> str | None:
    """The first id of ``GET /v1/models``; None (the field is then omitted) when the server has none."""
    try:
        async with session.get(base_url + "/v1/models", headers=headers) as resp:
            if resp.status == 200:
                models = (await resp.json()).get("data") or []
                return models[0]["id"] if models else None
    except (asyncio.TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError, IndexError) as exc:
        logger.info("no model list at %s: %s", base_url, exc)
    return None


async def arun_benchmark(
    url: str,
    trace: Sequence[RequestSpec],
    *,
    model: str | None = None,
    concurrency: int | None = None,
    api_key: str | None = None,
    label: str | None = None,
    num_warmup: int = 0,
    request_timeout_s: float = 600.0,
    prefill_metrics: str | None = None,
) -> dict:
    """Run ``trace`` against ``url``; returns ``{"label", "url", "model", "summary", "records", "handoff"}``.

    ``concurrency`` caps requests in flight (None: no cap). ``num_warmup`` extra requests (prompts of the
    trace's first request with the ids reversed, so they do not warm the prefix cache) run before and are not
    recorded. ``prefill_metrics``: see ``--handoff-from-metrics`` in the module docstring.
    """
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    base_url = url.rstrip("/")
    endpoint = base_url + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        model = model or await _default_model(session, base_url, headers)

        def payload(spec: RequestSpec) -> dict:
            body = {
                "prompt": spec.prompt_ids, "max_tokens": spec.max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True},
            }
            return {"model": model, **body} if model else body

        for i in range(num_warmup):
            spec = trace[0]
            warm = RequestRecord(-1 - i, len(spec.prompt_ids), spec.max_tokens)
            await _send(session, endpoint, payload(RequestSpec(spec.prompt_ids[::-1], spec.max_tokens, 0.0)),
                        headers, warm, time.perf_counter())
            if not warm.ok:
                logger.warning("warm-up request to %s failed: %s", endpoint, warm.error)

        if prefill_metrics == "auto":
            prefill_metrics = base_url + "/metrics"
        scraped = bool(prefill_metrics) and prefill_metrics.startswith(("http://", "https://"))
        before = await _read_prefill(session, prefill_metrics) if scraped else (None, "")

        records = [RequestRecord(i, len(s.prompt_ids), s.max_tokens) for i, s in enumerate(trace)]
        semaphore = asyncio.Semaphore(concurrency) if concurrency else None
        t0 = time.perf_counter()

        async def release(spec: RequestSpec, record: RequestRecord) -> None:
            delay_s = t0 + spec.arrival_s - time.perf_counter()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            async with semaphore or contextlib.nullcontext():
                await _send(session, endpoint, payload(spec), headers, record, t0)

        await asyncio.gather(*(release(s, r) for s, r in zip(trace, records)))
        duration_s = time.perf_counter() - t0

        after = await _read_prefill(session, prefill_metrics) if prefill_metrics else (None, "")
    summary = summarize(records, duration_s)
    handoff = _handoff(prefill_metrics, before, after, summary["ttft_p50_ms"]) if prefill_metrics else None
    return {"label": label or base_url, "url": base_url, "model": model, "summary": summary,
            "records": [asdict(r) for r in records], "handoff": handoff}


def run_benchmark(url: str, trace: Sequence[RequestSpec] | None = None, *, num_requests: int = 16,
                  prompt_len: LengthDist | str | int = 128, output_len: LengthDist | str | int = 32,
                  seed: int = 0, vocab_size: int = 500, request_rate: float | None = None, **kwargs) -> dict:
    """Synchronous ``arun_benchmark``; builds the trace from the arguments unless one is given.

    Call it from code without a running event loop; inside one, await ``arun_benchmark``.
    """
    if trace is None:
        trace = build_trace(num_requests, prompt_len, output_len, seed, vocab_size, request_rate)
    return asyncio.run(arun_benchmark(url, trace, **kwargs))


# ------------------------------------------------------------------------------------------------- CLI

COLUMNS = ["label", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p90_ms", "itl_p99_ms",
           "e2e_p50_ms", "e2e_p90_ms", "req_per_s", "out_tok_per_s", "errors"]


def table_rows(runs: Sequence[dict]) -> list[dict]:
    """One row per run; missing values read N/A."""
    rows = []
    for run in runs:
        row = {"label": run["label"]}
        for col in COLUMNS[1:]:
            value = run["summary"].get(col)
            row[col] = "N/A" if value is None else value
        if any(r.get("handoff") for r in runs):
            handoff = (run.get("handoff") or {}).get("handoff_p50_ms")
            row["handoff_p50_ms"] = "N/A" if handoff is None else handoff
        rows.append(row)
    return rows


def plot_runs(runs: Sequence[dict]):
    """Grouped bars: TTFT and ITL p50/p90 (ms) per label."""
    metrics = ["ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms", "itl_p90_ms"]

    def plot(ax) -> None:
        width = 0.8 / len(runs)
        for i, run in enumerate(runs):
            values = [run["summary"].get(m) or 0.0 for m in metrics]
            xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(metrics))]
            bars = ax.bar(xs, values, width, label=run["label"])
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(metrics)), [m.replace("_ms", "").replace("_", " ") for m in metrics])
        ax.set_ylabel("ms (lower is better)")
        ax.legend()

    return plot


def _write(name: str, rows: list[dict], columns: list[str], slug: str, extra: dict, plot, record: bool) -> Path:
    """``report.write_results`` under ``<runs or results>/<slug>``, also when ``slug`` is the server's GPU.

    report.py derives the folder from a torch device of this machine; the client rarely runs where the
    server's GPU is, so a slug like ``h100`` is substituted for the duration of the call.
    """
    from duet.bench import report

    if slug == report.device_slug("cpu"):
        return report.write_results(name, rows, columns, device="cpu", extra=extra, plot=plot, record=record)
    saved = report.device_slug, report.device_description
    report.device_slug = lambda device=None: slug
    report.device_description = lambda device=None: f"server {slug} (--device-slug); client {saved[1]('cpu')}"
    try:
        return report.write_results(name, rows, columns, device="cpu", extra=extra, plot=plot, record=record)
    finally:
        report.device_slug, report.device_description = saved


def _positive_int(text: str) -> int:
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return int(text)


def _positive_float(text: str) -> float:
    if not float(text) > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return float(text)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--label", help="row label of --url (default: the URL)")
    p.add_argument("--compare-url", help="baseline server, run right after --url with the same trace")
    p.add_argument("--compare-label", help="row label of --compare-url")
    p.add_argument("--model", help="model field (default: first id of GET /v1/models, else omitted)")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--num-requests", type=_positive_int, default=16)
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_positive_int, help="closed loop: requests in flight (default 1)")
    load.add_argument("--request-rate", type=_positive_float, help="open loop: Poisson arrivals, requests/s")
    p.add_argument("--max-concurrency", type=_positive_int, help="cap in flight with --request-rate")
    p.add_argument("--prompt-len", type=parse_length, default=parse_length(128), help="N or uniform:LOW-HIGH")
    p.add_argument("--output-len", type=parse_length, default=parse_length(32), help="N or uniform:LOW-HIGH")
    p.add_argument("--vocab-size", type=int, default=500, help="prompt ids are drawn from [5, vocab)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-warmup", type=int, default=1, help="unrecorded requests per server before the run")
    p.add_argument("--request-timeout-s", type=_positive_float, default=600.0)
    p.add_argument("--handoff-from-metrics", nargs="?", const="auto", metavar="SOURCE",
                   help="prefill compute time for the --url run: auto (<url>/metrics), a URL, or a file")
    p.add_argument("--out-name", default="serving", help="result file name under bench/runs/<device>/")
    p.add_argument("--device-slug", default="cpu", help="results folder: the server's device, e.g. h100")
    from duet.bench import report  # torch, for the result files

    report.add_record_arg(p)
    args = p.parse_args(argv)
    if args.max_concurrency and not args.request_rate:
        p.error("--max-concurrency goes with --request-rate (use --concurrency for a closed loop)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    trace = build_trace(args.num_requests, args.prompt_len, args.output_len, args.seed, args.vocab_size,
                        args.request_rate)
    concurrency = args.max_concurrency if args.request_rate else (args.concurrency or 1)
    common = dict(model=args.model, concurrency=concurrency, api_key=args.api_key, num_warmup=args.num_warmup,
                  request_timeout_s=args.request_timeout_s)
    targets = [(args.url, args.label, args.handoff_from_metrics)]
    if args.compare_url:
        targets.append((args.compare_url, args.compare_label, None))
    runs = [run_benchmark(url, trace, label=label, prefill_metrics=metrics, **common)
            for url, label, metrics in targets]

    rows = table_rows(runs)
    columns = COLUMNS + (["handoff_p50_ms"] if "handoff_p50_ms" in rows[0] else [])
    extra = {
        "trace": {"num_requests": args.num_requests, "prompt_len": str(args.prompt_len),
                  "output_len": str(args.output_len), "vocab_size": args.vocab_size, "seed": args.seed,
                  "concurrency": concurrency, "request_rate": args.request_rate},
        "runs": runs,
    }
    path = _write(args.out_name, rows, columns, args.device_slug, extra, plot_runs(runs), args.record)
    for run in runs:
        if run["summary"]["errors"]:
            logger.warning("%s: %d errors, e.g. %s", run["label"], run["summary"]["errors"],
                           run["summary"]["error_examples"])
    logger.info("wrote %s", path)
    return runs


if __name__ == "__main__":
    main()
