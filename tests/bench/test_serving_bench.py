"""bench.serving: statistics on known data, SSE parsing, and runs against a real local aiohttp server."""
from __future__ import annotations

import asyncio
import json
import math
import threading

import numpy as np
import pytest
from aiohttp import web

from duet.bench import serving
from duet.bench.serving import (
    Histogram, LengthDist, RequestRecord, SSEParser, build_trace, handoff_overhead, parse_chunk,
    parse_length, parse_prometheus, percentile, run_benchmark, summarize,
)


def _event(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


class FakeServer:
    """OpenAI-shaped streaming ``/v1/completions`` on 127.0.0.1 with known timing, in its own thread.

    Each request: ``first_delay_s`` of "prefill", then ``ceil(max_tokens / tokens_per_chunk)`` token chunks
    ``gap_s`` apart (the second one with empty text, as for an incomplete UTF-8 sequence), an empty chunk with
    the finish reason, the usage chunk and ``[DONE]``. ``/metrics`` exposes a prefill histogram with one
    observation of ``prefill_s`` per request.
    """

    BUCKETS = (0.005, 0.01, 0.025, 0.05, math.inf)

    def __init__(self, first_delay_s=0.06, gap_s=0.03, status=200, tokens_per_chunk=1, usage=True, done=True,
                 prefill_s=0.02):
        self.first_delay_s, self.gap_s, self.status = first_delay_s, gap_s, status
        self.tokens_per_chunk, self.usage, self.done, self.prefill_s = tokens_per_chunk, usage, done, prefill_s
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.status != 200:
            error = {"error": {"message": "bad request", "code": self.status}}
            return web.json_response(error, status=self.status)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await asyncio.sleep(self.first_delay_s)
            num_tokens = body["max_tokens"]
            num_chunks = -(-num_tokens // self.tokens_per_chunk)
            for i in range(num_chunks):
                if i:
                    await asyncio.sleep(self.gap_s)
                text = "" if i == 1 else "ab" * self.tokens_per_chunk
                await resp.write(_event({"object": "text_completion", "choices": [
                    {"index": 0, "text": text, "finish_reason": None}]}))
            await resp.write(_event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}))
            if self.usage and body.get("stream_options", {}).get("include_usage"):
                await resp.write(_event({"choices": [], "usage": {
                    "prompt_tokens": len(body["prompt"]), "completion_tokens": num_tokens}}))
            if self.done:
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.in_flight -= 1

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def _metrics(self, request: web.Request) -> web.Response:
        n = len(self.bodies)
        name = serving.PREFILL_HISTOGRAM
        lines = [f"# TYPE {name} histogram"]
        for le in self.BUCKETS:
            count = n if self.prefill_s <= le else 0
            lines.append(f'{name}_bucket{{le="{"+Inf" if math.isinf(le) else le}"}} {count}')
        lines += [f"{name}_sum {n * self.prefill_s}", f"{name}_count {n}"]
        return web.Response(text="\n".join(lines) + "\n")

    def __enter__(self) -> FakeServer:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app)
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._runner.setup())
            self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", 0).start())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        assert started.wait(10), "fake server did not start"
        self.url = "http://127.0.0.1:%d" % self._runner.addresses[0][1]
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# ------------------------------------------------------------------------------------------ statistics

def test_percentiles_on_known_data():
    data = list(range(1, 101))
    assert percentile(data, 50) == pytest.approx(50.5)
    assert percentile(data, 90) == pytest.approx(90.1)
    assert percentile(data, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(data, 101)


def test_summarize_known_records():
    recs = [
        RequestRecord(0, 10, 3, start_s=0.0, ok=True, ttft_s=0.1, e2e_s=0.3, itl_s=[0.1, 0.1], output_tokens=3,
                      usage_reported=True),
        RequestRecord(1, 10, 3, start_s=0.5, ok=True, ttft_s=0.3, e2e_s=0.5, itl_s=[0.05, 0.15], output_tokens=3),
        RequestRecord(2, 10, 3, start_s=0.2, error="HTTP 400: bad", http_status=400, e2e_s=0.01),
    ]
    s = summarize(recs)
    assert (s["num_requests"], s["num_ok"], s["errors"]) == (3, 2, 1)
    assert s["error_examples"] == ["HTTP 400: bad"]
    assert s["duration_s"] == pytest.approx(1.0)  # first release at 0, last finish at 0.5 + 0.5
    assert s["req_per_s"] == pytest.approx(2.0) and s["out_tok_per_s"] == pytest.approx(6.0)
    assert s["ttft_p50_ms"] == pytest.approx(200.0) and s["ttft_p90_ms"] == pytest.approx(280.0)
    assert s["itl_p50_ms"] == pytest.approx(100.0) and s["itl_mean_ms"] == pytest.approx(100.0)
    assert s["e2e_p99_ms"] == pytest.approx(498.0)
    assert s["tpot_p50_ms"] == pytest.approx(100.0)
    assert s["num_missing_usage"] == 1 and s["num_prompt_tokens"] == 20
    assert summarize([recs[2]], duration_s=2.0)["ttft_p50_ms"] is None
    assert summarize([dict(vars(r)) for r in recs])["ttft_p50_ms"] == pytest.approx(200.0)


# ----------------------------------------------------------------------------------------- SSE parsing

def test_sse_parser_any_split():
    stream = ("data: {\"a\": \"\u00e9\"}\r\n\r\n: keep-alive comment\n\nevent: x\ndata: line1\ndata:line2\n\n"
              "data: [DONE]\n\n").encode()
    expected = ['{"a": "\u00e9"}', "line1\nline2", "[DONE]"]
    for cut in range(len(stream) + 1):  # includes cuts inside "\r\n" and inside the two-byte "é"
        parser = SSEParser()
        got = list(parser.feed(stream[:cut])) + list(parser.feed(stream[cut:])) + list(parser.close())
        assert got == expected, cut
    parser = SSEParser()
    assert list(parser.feed(b"data: tail-without-blank-line")) == []
    assert list(parser.close()) == ["tail-without-blank-line"]


def test_parse_chunk_kinds():
    tok = parse_chunk('{"choices": [{"index": 0, "text": "hi", "finish_reason": null}]}')
    assert tok.is_token and tok.text == "hi" and not tok.done
    held = parse_chunk('{"choices": [{"index": 0, "text": "", "finish_reason": null}]}')
    assert held.is_token  # a token whose text is held back (incomplete UTF-8) still arrived
    last = parse_chunk('{"choices": [{"index": 0, "text": "!", "finish_reason": "length"}]}')
    assert last.is_token and last.finish_reason == "length"
    fin = parse_chunk('{"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}')
    assert not fin.is_token and fin.finish_reason == "stop"
    usage = parse_chunk('{"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 9}}')
    assert not usage.is_token and usage.usage["completion_tokens"] == 9
    assert parse_chunk("[DONE]").done
    assert parse_chunk('{"error": {"message": "KV transfer failed"}}').error == "KV transfer failed"
    assert parse_chunk('{"object": "error", "message": "oops"}').error == "oops"
    assert parse_chunk("{not json").error.startswith("malformed")


# ------------------------------------------------------------------------------------------ trace, metrics

def test_lengths_and_trace():
    assert parse_length("128") == LengthDist(128, 128) == parse_length("fixed:128")
    assert parse_length("uniform:64-512") == LengthDist(64, 512)
    for bad in ("uniform:9-3", "0", "normal:5", "uniform:a-b"):
        with pytest.raises(ValueError):
            parse_length(bad)
    trace = build_trace(50, "uniform:4-9", "uniform:2-5", seed=3, vocab_size=20)
    assert trace == build_trace(50, "uniform:4-9", "uniform:2-5", seed=3, vocab_size=20)
    assert trace != build_trace(50, "uniform:4-9", "uniform:2-5", seed=4, vocab_size=20)
    assert all(4 <= len(r.prompt_ids) <= 9 and 2 <= r.max_tokens <= 5 and r.arrival_s == 0 for r in trace)
    assert all(5 <= t < 20 and isinstance(t, int) for r in trace for t in r.prompt_ids)
    poisson = build_trace(4000, 8, 2, seed=1, request_rate=20.0)
    gaps = np.diff([0.0] + [r.arrival_s for r in poisson])
    assert np.all(gaps >= 0) and np.mean(gaps) == pytest.approx(1 / 20.0, rel=0.1)
    with pytest.raises(ValueError):
        build_trace(1, 8, 2, vocab_size=5)


def test_prometheus_histogram_and_handoff():
    text = """# HELP duet_prefill_compute_seconds Prefill compute time.
# TYPE duet_prefill_compute_seconds histogram
duet_prefill_compute_seconds_bucket{server="p0",le="0.01"} 2
duet_prefill_compute_seconds_bucket{server="p0",le="0.1"} 6
duet_prefill_compute_seconds_bucket{server="p0",le="+Inf"} 8
duet_prefill_compute_seconds_sum{server="p0"} 1.0
duet_prefill_compute_seconds_count{server="p0"} 8
duet_prefill_compute_seconds_bucket{server="p1",le="0.01"} 2
duet_prefill_compute_seconds_bucket{server="p1",le="0.1"} 2
duet_prefill_compute_seconds_bucket{server="p1",le="+Inf"} 2
duet_prefill_compute_seconds_sum{server="p1"} 0.01
duet_prefill_compute_seconds_count{server="p1"} 2
other_metric 3
"""
    hist = Histogram.from_samples(parse_prometheus(text), "duet_prefill_compute_seconds")
    assert hist.count == 10 and hist.sum == pytest.approx(1.01)
    assert hist.buckets == {0.01: 4, 0.1: 8, math.inf: 10}
    # rank 5 lies in (0.01, 0.1] holding ranks 4..8: 0.01 + 0.09 * (5 - 4) / 4
    assert hist.quantile(0.5) == pytest.approx(0.0325)
    assert hist.quantile(0.95) == 0.1  # +Inf bucket: highest finite bound
    earlier = Histogram({0.01: 4, 0.1: 4, math.inf: 4}, 0.02, 4)
    delta = hist - earlier
    assert delta.count == 6 and delta.quantile(0.5) == pytest.approx(0.01 + 0.09 * 3 / 4)
    no_buckets = Histogram.from_samples(parse_prometheus("x_sum 3\nx_count 4\n"), "x")
    assert no_buckets.p50_or_mean() == (0.75, "mean (sum / count)")
    assert Histogram.from_samples(parse_prometheus(text), "missing") is None
    assert handoff_overhead(0.25, 0.1) == pytest.approx(0.15)
    assert handoff_overhead(0.25, None) is None and handoff_overhead(None, 0.1) is None


# ------------------------------------------------------------------------------- against a real server

def test_end_to_end_timing_and_usage():
    with FakeServer(first_delay_s=0.06, gap_s=0.03) as server:
        result = run_benchmark(server.url, num_requests=4, prompt_len=12, output_len=5, concurrency=2)
    s = result["summary"]
    assert result["model"] == "fake-model" and s["errors"] == 0 and s["num_ok"] == 4
    body = server.bodies[-1]
    assert body["model"] == "fake-model" and len(body["prompt"]) == 12
    assert all(isinstance(t, int) and 5 <= t < 500 for t in body["prompt"])
    assert body["stream"] is True and body["ignore_eos"] is True and body["temperature"] == 0
    assert body["stream_options"] == {"include_usage": True} and body["max_tokens"] == 5
    assert server.max_in_flight <= 2
    for rec in result["records"]:
        assert rec["ok"] and rec["http_status"] == 200
        assert rec["ttft_s"] >= 0.06
        assert rec["output_tokens"] == 5 and rec["usage_reported"] and rec["prompt_tokens"] == 12
        assert rec["num_token_chunks"] == 5 and len(rec["itl_s"]) == 4  # the empty-text token counts
        assert rec["e2e_s"] >= rec["ttft_s"] + 4 * 0.03 * 0.8
    assert 0.06e3 <= s["ttft_p50_ms"] < 0.06e3 + 150
    assert 0.03e3 * 0.7 <= s["itl_p50_ms"] < 0.03e3 + 50
    assert s["num_output_tokens"] == 20 and s["out_tok_per_s"] > 0 and s["req_per_s"] > 0


def test_usage_beats_chunk_count_and_fallback():
    trace = build_trace(2, 8, 6, seed=1)
    with FakeServer(first_delay_s=0.01, gap_s=0.01, tokens_per_chunk=2) as server:
        packed = run_benchmark(server.url, trace, concurrency=2)
    assert [(r["output_tokens"], r["num_token_chunks"]) for r in packed["records"]] == [(6, 3)] * 2
    with FakeServer(first_delay_s=0.01, gap_s=0.01, usage=False) as server:
        bare = run_benchmark(server.url, trace, concurrency=2)
    assert all(r["ok"] and not r["usage_reported"] and r["output_tokens"] == 6 for r in bare["records"])
    assert bare["summary"]["num_missing_usage"] == 2


def test_errors_are_counted():
    trace = build_trace(3, 8, 4, seed=2)
    with FakeServer(status=400) as server:
        result = run_benchmark(server.url, trace, concurrency=3)
    s = result["summary"]
    assert (s["errors"], s["num_ok"], s["ttft_p50_ms"], s["req_per_s"]) == (3, 0, None, 0.0)
    assert all(r["http_status"] == 400 and r["error"].startswith("HTTP 400") for r in result["records"])
    with FakeServer(first_delay_s=0.01, gap_s=0.01, done=False) as server:
        truncated = run_benchmark(server.url, trace, concurrency=3)
    assert truncated["summary"]["errors"] == 3
    assert truncated["summary"]["error_examples"] == ["stream ended without [DONE]"]
    closed = run_benchmark("http://127.0.0.1:9", trace, concurrency=1, model="m", request_timeout_s=5)
    assert closed["summary"]["errors"] == 3 and closed["records"][0]["http_status"] is None


def test_cli_compare_and_handoff(tmp_path, monkeypatch):
    from duet.bench import report

    monkeypatch.setattr(report, "RESULTS_ROOT", tmp_path)  # --record below
    monkeypatch.setattr(report, "RUNS_ROOT", tmp_path / "runs")
    saved = report.device_slug
    with FakeServer(first_delay_s=0.08, gap_s=0.02, prefill_s=0.02) as disagg, \
            FakeServer(first_delay_s=0.03, gap_s=0.02) as colocated:
        runs = serving.main([
            "--url", disagg.url, "--label", "disagg", "--compare-url", colocated.url, "--compare-label", "coloc",
            "--num-requests", "3", "--concurrency", "2", "--prompt-len", "uniform:4-16", "--output-len", "3",
            "--handoff-from-metrics", "--out-name", "serving_test", "--device-slug", "h100", "--record",
        ])
    assert report.device_slug is saved
    assert [r["label"] for r in runs] == ["disagg", "coloc"]
    # Same trace for both servers, warm-up request first.
    assert [b["prompt"] for b in disagg.bodies[1:]] == [b["prompt"] for b in colocated.bodies[1:]]
    handoff = runs[0]["handoff"]
    # Histogram delta excludes the warm-up: 3 observations of 0.02 s in (0.01, 0.025] -> p50 0.0175 s.
    assert handoff["prefill_compute_p50_ms"] == pytest.approx(17.5)
    assert handoff["handoff_p50_ms"] == pytest.approx(runs[0]["summary"]["ttft_p50_ms"] - 17.5)
    assert runs[1]["handoff"] is None
    saved_json = json.loads((tmp_path / "h100" / "serving_test.json").read_text())
    assert [r["label"] for r in saved_json["rows"]] == ["disagg", "coloc"]
    assert saved_json["rows"][1]["handoff_p50_ms"] == "N/A"
    assert len(saved_json["meta"]["runs"][0]["records"]) == 3
    assert saved_json["meta"]["device"].startswith("server h100")
    assert (tmp_path / "h100" / "serving_test.png").stat().st_size > 0
    assert not (tmp_path / "runs").exists()  # --record wrote the recorded folder only


def test_poisson_release_and_handoff_from_json(tmp_path):
    source = tmp_path / "prefill.json"
    source.write_text(json.dumps({"prefill_compute_s_p50": 0.01}))
    trace = build_trace(4, 8, 2, seed=5, request_rate=40.0)
    with FakeServer(first_delay_s=0.03, gap_s=0.01) as server:
        result = run_benchmark(server.url, trace, prefill_metrics=str(source))
    for spec, rec in zip(trace, result["records"]):
        assert rec["ok"] and rec["start_s"] >= spec.arrival_s - 1e-3
    handoff = result["handoff"]
    assert handoff["prefill_compute_stat"] == "given (JSON)" and handoff["prefill_compute_p50_ms"] == 10.0
    assert handoff["handoff_p50_ms"] == pytest.approx(result["summary"]["ttft_p50_ms"] - 10.0)
    gauge = tmp_path / "router.prom"  # what the router exposes when it keeps no histogram
    gauge.write_text(f"# TYPE x gauge\n{serving.PREFILL_GAUGE} 0.004\nduet_router_requests_ok_total 9\n")
    with FakeServer(first_delay_s=0.01, gap_s=0.01) as server:
        from_gauge = run_benchmark(server.url, trace[:2], prefill_metrics=str(gauge))
    assert from_gauge["handoff"]["prefill_compute_stat"].startswith(serving.PREFILL_GAUGE)
    assert from_gauge["handoff"]["prefill_compute_p50_ms"] == pytest.approx(4.0)
    # The server is gone: the request fails fast, and a missing JSON source reads N/A.
    missing = run_benchmark(server.url, trace[:1], prefill_metrics=str(tmp_path / "absent.json"), model="m")
    assert missing["handoff"]["handoff_p50_ms"] is None and missing["summary"]["errors"] == 1
    assert missing["handoff"]["prefill_compute_stat"] == "N/A (FileNotFoundError)"
