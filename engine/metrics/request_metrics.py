"""Per-request families of an OpenAI front end (the router, or the colocated server), under vLLM's names.

The front end sees every request from arrival to its last token, so it measures what vLLM's front end
measures: time to first token, inter-token latency, end-to-end latency, time per output token, the
request's phases, token counts, request parameters and how each request finished. Labels are vLLM's
(``model_name``, ``engine``; ``finished_reason`` on ``vllm:request_success``); buckets are vLLM 0.32's.

One difference in meaning, listed in the README: a request's *queue* time is the time it waited in the
front end's admission queue (the router's ``--max-queue``) before being sent to a server; time spent in
an engine's own waiting queue counts as *prefill* time (vLLM: queue = engine WAITING, prefill = first
scheduled -> first token). ``inference`` = prefill + decode, as in vLLM.

Counts are per choice (``n`` choices of one API request are n requests, as vLLM's engine counts them);
``vllm:request_params_n`` / ``_max_tokens`` and ``vllm:request_max_num_generation_tokens`` once per API
request. Called from the front end's event loop only.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from duet.engine.metrics.server_stats import VLLM_LABELS

# vLLM 0.32's default bucket families (vllm/v1/metrics/buckets.py).
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                               7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                               10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
REQUEST_PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")
"""vLLM's finish reasons, each pre-created at zero as vLLM does; Duet produces the first four."""


def token_count_buckets(max_model_len: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_model_len`` (vLLM's ``request_tokens`` family)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return out or [1.0]
            out.append(float(m * scale))
        scale *= 10


class RequestMetrics:
    """vLLM's per-request histograms and counters, registered in one front end's registry."""

    def __init__(self, registry: CollectorRegistry, model_name: str, *, engine: str = "0",
                 max_model_len: int = 2048):
        labels = list(VLLM_LABELS)
        values = (model_name, engine)
        tokens = token_count_buckets(max(1, max_model_len))

        def histogram(name: str, documentation: str, buckets) -> Histogram:
            return Histogram(name, documentation, labels, buckets=buckets, registry=registry).labels(*values)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TIME_TO_FIRST_TOKEN_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             INTER_TOKEN_LATENCY_BUCKETS)
        self.tpot = histogram("vllm:request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.", INTER_TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds",
                               "Histogram of time a request waited in the front end's admission queue.",
                               REQUEST_LATENCY_BUCKETS)
        self.inference = histogram("vllm:request_inference_time_seconds",
                                   "Histogram of time from leaving the admission queue to the last token.",
                                   REQUEST_LATENCY_BUCKETS)
        self.prefill = histogram("vllm:request_prefill_time_seconds",
                                 "Histogram of time from leaving the admission queue to the first token.",
                                 REQUEST_LATENCY_BUCKETS)
        self.decode = histogram("vllm:request_decode_time_seconds",
                                "Histogram of time from the first token to the last.", REQUEST_LATENCY_BUCKETS)
        self.prompt_tokens = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", tokens)
        self.generation_tokens = histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                           tokens)
        self.max_generation_tokens = histogram("vllm:request_max_num_generation_tokens",
                                               "Histogram of maximum number of requested generation tokens.", tokens)
        self.params_n = histogram("vllm:request_params_n", "Histogram of the n request parameter.",
                                  REQUEST_PARAMS_N_BUCKETS)
        self.params_max_tokens = histogram("vllm:request_params_max_tokens",
                                           "Histogram of the max_tokens request parameter.", tokens)
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          labels + ["finished_reason"], registry=registry)
        self._success = success
        self._values = values
        for reason in FINISHED_REASONS:
            success.labels(*values, reason)

    def request_started(self, n: int, max_tokens: int | None) -> None:
        """One API request accepted (validated, tokenized) with ``n`` choices."""
        self.params_n.observe(n)
        if max_tokens is not None:
            self.params_max_tokens.observe(max_tokens)

    def first_token(self, ttft_s: float) -> None:
        self.ttft.observe(max(0.0, ttft_s))

    def inter_token(self, seconds_per_token: float) -> None:
        self.itl.observe(max(0.0, seconds_per_token))

    def choice_finished(self, finish_reason: str, *, num_prompt_tokens: int, num_generation_tokens: int,
                        e2e_s: float, ttft_s: float | None, queued_s: float = 0.0) -> None:
        """One choice ended (``finish_reason``: stop, length, abort or error); times in seconds since arrival."""
        self._success.labels(*self._values, str(finish_reason)).inc()
        self.prompt_tokens.observe(num_prompt_tokens)
        self.generation_tokens.observe(num_generation_tokens)
        if finish_reason not in ("stop", "length"):
            return  # latency histograms describe completed requests only, as vLLM's
        queued_s = max(0.0, min(queued_s, e2e_s))
        self.e2e.observe(e2e_s)
        self.queue.observe(queued_s)
        self.inference.observe(e2e_s - queued_s)
        if ttft_s is not None:
            self.prefill.observe(max(0.0, ttft_s - queued_s))
            self.decode.observe(max(0.0, e2e_s - ttft_s))
            if num_generation_tokens > 1:
                self.tpot.observe((e2e_s - ttft_s) / (num_generation_tokens - 1))

    def request_finished(self, max_num_generation_tokens: int) -> None:
        """The API request's choices all ended; the largest generation among them."""
        self.max_generation_tokens.observe(max_num_generation_tokens)
