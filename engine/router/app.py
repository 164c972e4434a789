"""The OpenAI-compatible HTTP front end (aiohttp) over any ``Dispatcher``.

A request's path through this module: the API key is checked (every route but ``/health``; unknown routes
too, so they answer 401 before 404); the body is read (``max_body_bytes``, else 413; its Content-Type is not
checked, as clients often omit it), decoded and parsed by ``openai_protocol`` (400/404 on bad input, within
``RequestLimits``); prompts are tokenized off the event loop (completions with ``tokenizer.encode``, so the
tokenizer's BOS behaviour applies; chat through the chat template), a text far over ``max_prompt_tokens``
being refused after tokenizing only a prefix; each prompt x ``n`` becomes one ``GenerateRequest``
(``<id>-<choice index>``, no stop strings) and one pump task iterating ``dispatcher.generate``. The pumps
feed one queue; the handler folds the ``TokenDelta``s into ``ChoiceState``s (detokenization and stop
strings happen here) and answers with one JSON body or an SSE stream. A choice that hits a stop string has
its pump cancelled, which closes the dispatcher's iterator and so aborts it downstream. Leaving the handler
for any reason (done, error, client gone, deadline, shutdown) cancels every pump: nothing outlives the HTTP
request.

Errors before the first byte of a stream are JSON errors with their status (``DispatchError`` keeps its
status; 429 adds ``Retry-After``); after it, one ``data: {"error": ...}`` event and ``data: [DONE]``.
One exception: HTTP that aiohttp cannot parse (a request or header line over ``max_header_bytes``, more
than 128 headers, a malformed request line) is answered by aiohttp itself, before any handler or
middleware runs, with a ``text/plain`` 400 and a closed connection; making that JSON would mean
subclassing aiohttp's private ``RequestHandler``/``Server`` plumbing.

TLS: ``serve(ssl_context=make_ssl_context(cert, key))``; the CLIs' ``--ssl-certfile/--ssl-keyfile``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Sequence

from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram

from duet.engine.detokenizer import IncrementalDetokenizer
from duet.engine.router import openai_protocol as proto
from duet.engine.router.dispatcher import DispatchError, Dispatcher, GenerateRequest, TokenDelta
from duet.engine.metrics.exposition import StaticCollector, new_registry, render
from duet.engine.metrics.request_metrics import RequestMetrics
from duet.engine.router.http_server import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_HEADER_BYTES, HTTP_LIMITS_KEY, HttpLimits
from duet.engine.router.openai_protocol import APIError, ChoiceState, ParsedRequest, RequestLimits
from duet.engine.router.tool_parsers import PARSERS, ToolCallStream, detect_parser, named_parser
from duet.engine.tokenizer import apply_chat_template, bad_words_token_ids

logger = logging.getLogger(__name__)

MAX_ZONE_CHARS = 64

_DISCONNECTED = object()
_TIMEOUT = object()
_DISCONNECT_POLL_S = 0.25
# A text prompt longer than max_prompt_tokens x this many characters is first tokenized only up to there:
# ordinary text has 3-5 characters per token, so a prompt far over the limit is refused in bounded time.
_PROBE_CHARS_PER_TOKEN = 8
# Tokens the cut can add at the end of the probed prefix (a word split in two), not held against the prompt.
_PROBE_SLACK_TOKENS = 64


_HTTP_DURATION_BUCKETS_S = (0.1, 0.5, 1.0)  # prometheus-fastapi-instrumentator's, as vLLM's server exposes them


class _Metrics:
    """The front end's registry: process collectors, per-request families under vLLM's names, HTTP counts
    under the names vLLM's server exposes (prometheus-fastapi-instrumentator's), and the dispatcher's
    families (``Dispatcher.metrics()``, refreshed right before each render)."""

    def __init__(self, model_name: str, engine: str, max_model_len: int):
        r = self.registry = new_registry()
        self.requests = RequestMetrics(r, model_name, engine=engine, max_model_len=max_model_len)
        self.http_requests = Counter("http_requests", "Total number of requests by method, status and handler.",
                                     ["handler", "method", "status"], registry=r)
        self.http_duration = Histogram("http_request_duration_seconds", "Latency of HTTP requests by handler.",
                                       ["handler", "method"], buckets=_HTTP_DURATION_BUCKETS_S, registry=r)
        self.running = Gauge("duet_requests_running", "API requests (all their choices) being served now.",
                             registry=r, multiprocess_mode="livesum")
        self.backend = StaticCollector()
        r.register(self.backend)


@dataclass
class _Timing:
    """Per choice (index): when its first and latest tokens arrived; the request's arrival and jobs."""

    start_s: float
    jobs: list[GenerateRequest]
    first_token_s: dict[int, float] = field(default_factory=dict)
    last_token_s: dict[int, float] = field(default_factory=dict)
    recorded: set[int] = field(default_factory=set)
    failed: bool = False
    """An error (not a disconnect or timeout) ended the request: unfinished choices count as ``error``."""


class _Run:
    """The choices of one HTTP request: one pump task per choice, all feeding one queue of (index, event)."""

    def __init__(self, dispatcher: Dispatcher, http_request: web.Request,
                 jobs: list[GenerateRequest], timeout_s: float):
        self.dispatcher = dispatcher
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks = {i: asyncio.create_task(self._pump(i, job)) for i, job in enumerate(jobs)}
        self._watch = asyncio.create_task(self._watch_client(http_request))
        self._timer = asyncio.get_running_loop().call_later(timeout_s, self.queue.put_nowait, (None, _TIMEOUT))

    async def _pump(self, index: int, job: GenerateRequest) -> None:
        deltas = None
        try:
            deltas = self.dispatcher.generate(job)
            async for delta in deltas:
                self.queue.put_nowait((index, delta))
                if delta.finished:
                    return
            self.queue.put_nowait((index, DispatchError("backend ended the stream without finishing", 502)))
        except DispatchError as e:
            self.queue.put_nowait((index, e))
        except Exception as e:  # noqa: BLE001 - reported to the client as a 500, logged here
            logger.exception("request %s failed in the dispatcher", job.request_id)
            self.queue.put_nowait((index, e))
        finally:
            aclose = getattr(deltas, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _watch_client(self, http_request: web.Request) -> None:
        while True:
            await asyncio.sleep(_DISCONNECT_POLL_S)
            transport = http_request.transport
            if transport is None or transport.is_closing():
                self.queue.put_nowait((None, _DISCONNECTED))
                return

    async def next(self) -> tuple[int | None, object]:
        return await self.queue.get()

    def stop(self, index: int) -> None:
        """Close one choice's iterator (it finished on a stop string); aborts it downstream."""
        task = self.tasks.get(index)
        if task is not None and not task.done():
            task.cancel()

    async def close(self) -> None:
        self._timer.cancel()
        self._watch.cancel()
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(self._watch, *self.tasks.values(), return_exceptions=True)


class _FrontEnd:
    def __init__(self, dispatcher: Dispatcher, tokenizer, model_names: Sequence[str], *, max_model_len: int,
                 api_key: str | None, request_timeout_s: float, max_default_tokens: int,
                 default_sampling: dict | None, limits: RequestLimits, metrics_engine: str,
                 http_limits: HttpLimits):
        self.dispatcher = dispatcher
        self.http_limits = http_limits
        self.tokenizer = tokenizer
        self.strings = proto.TokenStrings(tokenizer)
        self.model_names = list(model_names)
        self.model_name = self.model_names[0]
        self.tool_parser = detect_parser(getattr(tokenizer, "chat_template", None))
        """``engine.router.tool_parsers.PARSERS`` name for ``tool_choice: auto`` (from the chat template)."""
        self.max_model_len = max_model_len
        self.vocab_size = getattr(dispatcher, "vocab_size", None) or len(tokenizer)
        # Compared as digests: compare_digest is constant-time only between equal lengths.
        self._auth_digest = hashlib.sha256(f"Bearer {api_key}".encode()).digest() if api_key else None
        self.limits = limits
        self.request_timeout_s = request_timeout_s
        self.max_default_tokens = max_default_tokens
        self.default_sampling = default_sampling or {}
        self.created = int(time.time())
        self.metrics = _Metrics(self.model_name, metrics_engine, max_model_len)

    # ---- middleware: auth, OpenAI-shaped errors, request counting ------------------------------------
    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "none"
        started = time.monotonic()
        try:
            if not self._authorized(request):
                raise APIError("invalid or missing API key (Authorization: Bearer <key>)", status=401,
                               code="invalid_api_key")
            response = await handler(request)
        except APIError as e:
            response = _error_response(e)
        except web.HTTPException as e:  # unknown route, wrong method
            response = _error_response(APIError(e.reason or "error", status=e.status, code=e.reason))
        except Exception:  # noqa: BLE001 - never let one request take the server down
            logger.exception("unhandled error serving %s %s", request.method, request.path)
            response = _error_response(APIError("internal server error", status=500))
        self.metrics.http_requests.labels(endpoint, request.method, f"{response.status // 100}xx").inc()
        self.metrics.http_duration.labels(endpoint, request.method).observe(time.monotonic() - started)
        return response

    def _authorized(self, request: web.Request) -> bool:
        if self._auth_digest is None or request.path == "/health":
            return True
        sent = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        return hmac.compare_digest(hashlib.sha256(sent).digest(), self._auth_digest)

    async def _read_json(self, request: web.Request):
        try:
            raw = await asyncio.wait_for(request.read(), self.http_limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(f"request body not received within {self.http_limits.body_timeout_s:g} s",
                           status=408) from None
        except web.HTTPRequestEntityTooLarge:
            raise APIError(f"request body exceeds {request.client_max_size} bytes", status=413) from None
        except web.RequestPayloadError as e:  # bad chunked encoding, undecodable Content-Encoding
            raise APIError(f"could not read the request body: {' '.join(str(e).split())}") from None
        except ConnectionError:
            raise APIError("client closed the connection", status=499) from None
        return proto.decode_body(raw, self.limits)

    # ---- tokenization (worker threads) ---------------------------------------------------------------
    async def _tokenize(self, param: str, fn: Callable[[], list[list[int]]]) -> list[list[int]]:
        try:
            return await asyncio.to_thread(fn)
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - the tokenizer or chat template refused the request's text
            raise APIError(f"{param}: could not be tokenized: {e}", param=param) from None

    def _probe(self, text: str, param: str) -> None:
        """Refuse a text far over ``max_prompt_tokens`` after tokenizing only a prefix of it (tokenizing a
        whole 8 MiB body holds a thread for seconds); the exact count is checked after tokenization."""
        limit = self.limits.max_prompt_tokens
        probe_chars = limit * _PROBE_CHARS_PER_TOKEN
        if len(text) <= probe_chars:
            return
        num_tokens = len(self.tokenizer.encode(text[:probe_chars], add_special_tokens=False))
        if num_tokens > limit + _PROBE_SLACK_TOKENS:
            raise APIError(f"{param}: over the limit of {limit} prompt tokens (its first {probe_chars} characters "
                           f"alone are {num_tokens} tokens)", param=param)

    def _encode_prompts(self, parsed: ParsedRequest) -> list[list[int]]:
        for p in parsed.prompts:
            if isinstance(p, str):
                self._probe(p, "prompt")
        self._encode_bad_words(parsed)
        return [self.tokenizer.encode(p) if isinstance(p, str) else p for p in parsed.prompts]

    def _encode_chat(self, parsed: ParsedRequest) -> list[list[int]]:
        self._probe("\n".join(m["content"] for m in parsed.messages), "messages")
        self._encode_bad_words(parsed)
        return [apply_chat_template(self.tokenizer, parsed.messages, tools=parsed.tools)]

    def _encode_bad_words(self, parsed: ParsedRequest) -> None:
        if parsed.bad_words:
            parsed.sampling["bad_words_token_ids"] = bad_words_token_ids(self.tokenizer, parsed.bad_words)

    # ---- routes --------------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        if self.dispatcher.healthy():
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "unavailable"}, status=503)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [proto.model_card(name, self.created, self.max_model_len)
                                                             for name in self.model_names]})

    async def model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] not in self.model_names:
            raise APIError(f"The model `{request.match_info['model']}` does not exist.", status=404,
                           param="model", code="model_not_found")
        return web.json_response(proto.model_card(request.match_info["model"], self.created, self.max_model_len))

    def _served_name(self, body) -> str:
        """The served name a request asks for (echoed in its response, as vLLM does); the first served name
        when it names none or an unknown one (``parse_*`` then answers 404 naming the first)."""
        model = body.get("model") if isinstance(body, dict) else None
        return model if model in self.model_names else self.model_name

    async def trace(self, request: web.Request) -> web.Response:
        """``GET /debug/requests/{id}``: stage timestamps of one request on the router and every server."""
        request_id = request.match_info["request_id"]
        trace = await self.dispatcher.trace(request_id) or await self.dispatcher.trace(request_id + "-0")
        if not trace:
            raise APIError(f"no trace for request {request_id!r} (unknown, or evicted)", status=404,
                           param="request_id", code="not_found")
        return web.json_response({"request_id": request_id, "stages": trace})

    async def prometheus(self, request: web.Request) -> web.Response:
        try:
            self.metrics.backend.set(await self.dispatcher.metrics())
        except Exception:  # noqa: BLE001 - a broken backend must not break /metrics
            logger.exception("dispatcher metrics failed")
            self.metrics.backend.set(())
        body, content_type = render(self.metrics.registry, request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_json(request)
        name = self._served_name(body)
        parsed = proto.parse_completion(body, model_name=name, defaults=self.default_sampling, limits=self.limits)
        prompts = await self._tokenize("prompt", lambda: self._encode_prompts(parsed))
        return await self._generate(request, parsed, prompts, name)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_json(request)
        name = self._served_name(body)
        parsed = proto.parse_chat(body, model_name=name, defaults=self.default_sampling, limits=self.limits)
        prompts = await self._tokenize("messages", lambda: self._encode_chat(parsed))
        return await self._generate(request, parsed, prompts, name)

    # ---- generation ----------------------------------------------------------------------------------
    async def _generate(self, request: web.Request, parsed: ParsedRequest, prompts: list[list[int]], model_name: str):
        request_id = f"{'cmpl' if parsed.kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        jobs, states = [], []
        zone = request.headers.get("X-Duet-Zone") or None
        if zone is not None and (len(zone) > MAX_ZONE_CHARS or not zone.isprintable()):
            raise APIError(f"X-Duet-Zone: a zone name is at most {MAX_ZONE_CHARS} printable characters, got "
                           f"{zone[:16]!r}...", param="X-Duet-Zone")
        num = parsed.num_candidates
        for p_idx, ids in enumerate(prompts):
            parsed.check_prompt(ids, self.vocab_size)
            echo = None
            if parsed.echo:
                prompt = parsed.prompts[p_idx]
                echo = (prompt if isinstance(prompt, str) else self.tokenizer.decode(ids), list(ids))
            for j in range(num):
                params = parsed.sampling_params(len(ids), j, max_model_len=self.max_model_len,
                                                max_default_tokens=self.max_default_tokens)
                self._check_token_ids(params)
                user_logprobs = params.logprobs
                if num > parsed.n and params.logprobs is None:
                    params = dataclasses.replace(params, logprobs=0)  # best_of ranks by the tokens' logprobs
                index = p_idx * num + j
                jobs.append(GenerateRequest(f"{request_id}-{index}", list(ids), params, zone=zone))
                detok = IncrementalDetokenizer(self.tokenizer, ids, parsed.stop, parsed.include_stop_str_in_output)
                states.append(ChoiceState(index, parsed.kind, detok, min_tokens=params.min_tokens,
                                          top_logprobs=user_logprobs, strings=self.strings, echo=echo,
                                          echo_only=parsed.echo_only, tools=self._tool_stream(parsed),
                                          named_tool=parsed.tool_mode.choice == "named"))
        timing = _Timing(time.monotonic(), jobs)
        for p_idx in range(len(prompts)):  # one vLLM request per prompt, with its n
            self.metrics.requests.request_started(parsed.n, jobs[p_idx * num].params.max_tokens)
        run = _Run(self.dispatcher, request, jobs, self.request_timeout_s)
        self.metrics.running.inc()
        meta = (request_id, int(time.time()), model_name)
        try:
            if parsed.stream:
                return await self._stream(request, parsed, run, states, timing, meta, prompts)
            return await self._complete(parsed, run, states, timing, meta, prompts)
        finally:
            await run.close()
            self.metrics.running.dec()
            for state in states:  # choices that never finished: the client left, the deadline passed, or an error
                self._record_choice(state, timing, "error" if timing.failed else "abort")
            for p_idx in range(len(prompts)):
                group = states[p_idx * parsed.n:(p_idx + 1) * parsed.n]
                self.metrics.requests.request_finished(max((s.num_tokens for s in group), default=0))

    def _record_choice(self, state: ChoiceState, timing: _Timing, finish_reason: str) -> None:
        if state.index in timing.recorded:
            return
        timing.recorded.add(state.index)
        start = timing.start_s
        first = timing.first_token_s.get(state.index)
        job = timing.jobs[state.index]
        self.metrics.requests.choice_finished(
            finish_reason, num_prompt_tokens=len(job.prompt_token_ids), num_generation_tokens=state.num_tokens,
            e2e_s=time.monotonic() - start, ttft_s=None if first is None else first - start, queued_s=job.queued_s)

    def _check_token_ids(self, params) -> None:
        try:
            params.token_ids_in_vocab(self.vocab_size)
        except ValueError as e:
            raise APIError(str(e), param=proto.param_of(str(e))) from None

    def _tool_stream(self, parsed: ParsedRequest) -> ToolCallStream | None:
        mode = parsed.tool_mode
        if parsed.kind != "chat" or not parsed.tools or mode.choice == "none":
            return None
        if mode.choice == "named":
            return ToolCallStream(named_parser(mode.name))
        return ToolCallStream(PARSERS["required" if mode.choice == "required" else self.tool_parser])

    def _event(self, run: _Run, states: list[ChoiceState], timing: _Timing, index, item) -> ChoiceState | None:
        """Apply one queue event; raises APIError for failures; None when the client went away."""
        if item is _DISCONNECTED:
            return None
        if item is _TIMEOUT:
            raise APIError(f"request timed out after {self.request_timeout_s:g} s", status=504, code="timeout")
        if isinstance(item, BaseException):
            timing.failed = True
        if isinstance(item, DispatchError):
            headers = {}
            if item.status == 429 or item.retry_after_s is not None:
                headers["Retry-After"] = str(max(1, math.ceil(item.retry_after_s or 1)))
            param = item.param or (proto.param_of(str(item)) if item.status == 400 else None)
            raise APIError(str(item), status=item.status, param=param, headers=headers)
        if isinstance(item, BaseException):
            raise APIError("internal server error", status=500)
        assert isinstance(item, TokenDelta)
        state = states[index]
        now = time.monotonic()
        if item.token_ids:
            last = timing.last_token_s.get(index)
            if last is None:
                timing.first_token_s[index] = now
                self.metrics.requests.first_token(now - timing.start_s)
            else:
                self.metrics.requests.inter_token((now - last) / len(item.token_ids))
            timing.last_token_s[index] = now
        state.add(item)
        if state.error is not None:
            timing.failed = True
            raise state.error
        if state.finished:
            self._record_choice(state, timing, state.finish_reason)
            run.stop(index)
        return state

    def _usage(self, parsed: ParsedRequest, states: list[ChoiceState], prompts: list[list[int]]) -> dict:
        k = parsed.num_candidates
        cached = sum(max(s.num_cached_tokens for s in states[p * k:(p + 1) * k]) for p in range(len(prompts)))
        return proto.usage(sum(len(p) for p in prompts), sum(s.num_tokens for s in states), cached)

    async def _complete(self, parsed, run, states, timing, meta, prompts) -> web.Response:
        remaining = set(range(len(states)))
        while remaining:
            index, item = await run.next()
            if index is not None and index not in remaining:
                continue  # a delta that raced with this choice's stop string
            state = self._event(run, states, timing, index, item)
            if state is None:
                logger.info("client went away; aborted %s", meta[0])
                return web.Response(status=499)
            if state.finished:
                remaining.discard(index)
        usage = self._usage(parsed, states, prompts)
        if parsed.num_candidates > parsed.n:
            states = _best(states, parsed)
        choices = [s.choice(*s.take(), stream=False) for s in states]
        if parsed.kind == "completion":
            return web.json_response(proto.completion_response(*meta, choices, usage), dumps=_dumps)
        body = proto.chat_response(*meta, choices, usage, prompt_logprobs=states[0].prompt_logprobs_json())
        return web.json_response(body, dumps=_dumps)

    async def _stream(self, request, parsed, run, states, timing, meta, prompts) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        remaining = set(range(len(states)))
        try:
            while remaining:
                index, item = await run.next()
                if index is not None and index not in remaining:
                    continue
                try:
                    state = self._event(run, states, timing, index, item)
                except APIError as e:
                    if response is None:
                        raise
                    logger.warning("request %s failed mid-stream: %s", meta[0], e.message)
                    await response.write(proto.sse(e.body()))
                    await response.write(proto.SSE_DONE)
                    return response
                if state is None:
                    logger.info("client went away; aborted %s", meta[0])
                    return response or web.Response(status=499)
                if response is None:
                    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                           "Cache-Control": "no-cache"})
                    await response.prepare(request)
                    if parsed.kind == "chat":
                        first = [s.choice("", None, stream=True, first=True) for s in states]
                        await response.write(b"".join(proto.sse(proto.chunk("chat", *meta, [c])) for c in first))
                text, logprobs = state.take()
                if state.finished:
                    remaining.discard(index)
                # One chunk per token-carrying delta, even when its text is held back (an incomplete UTF-8
                # character, a special token): clients see tokens arrive when they do.
                has_tokens = isinstance(item, TokenDelta) and bool(item.token_ids)
                if text or state.finished or has_tokens or (logprobs and (logprobs.get("tokens") or
                                                                         logprobs.get("content"))):
                    entry = state.choice(text, logprobs, stream=True)
                    await response.write(proto.sse(proto.chunk(parsed.kind, *meta, [entry])))
            usage = self._usage(parsed, states, prompts)
            if parsed.include_usage:
                await response.write(proto.sse(proto.chunk(parsed.kind, *meta, [], usage)))
            await response.write(proto.SSE_DONE)
            await response.write_eof()
        except ConnectionError:
            logger.info("client went away mid-stream; aborted %s", meta[0])
        return response


def _best(states: list[ChoiceState], parsed: ParsedRequest) -> list[ChoiceState]:
    """``best_of``: per prompt, the ``n`` candidates with the highest mean token logprob, re-indexed."""
    kept, num = [], parsed.num_candidates
    for p in range(len(states) // num):
        group = states[p * num:(p + 1) * num]
        group.sort(key=lambda s: -s.cumulative_logprob / max(1, s.num_tokens))
        for j, state in enumerate(group[:parsed.n]):
            state.index = p * parsed.n + j
            kept.append(state)
    return kept


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _error_response(error: APIError) -> web.Response:
    response = web.json_response(error.body(), status=error.status, headers=error.headers)
    if error.status in (408, 413):  # the rest of the body is not wanted: close now rather than drain it
        response.force_close()
    return response


FRONTEND_KEY = web.AppKey("duet_frontend", _FrontEnd)


def create_app(dispatcher: Dispatcher, tokenizer, model_name: str | Sequence[str], *, max_model_len: int,
               api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, limits: RequestLimits | None = None,
               request_timeout_s: float = 600.0, max_default_tokens: int = 4096,
               default_sampling: dict | None = None, debug_traces: bool = False,
               metrics_engine: str = "0", http_limits: HttpLimits | None = None) -> web.Application:
    """The OpenAI-compatible app. ``dispatcher.start()`` runs at startup and ``dispatcher.close()`` at cleanup.

    ``model_name``: the served model id, or several (``--served-model-name a b``): requests may name any of
    them (and get it back in their response); ``/v1/models`` lists them all; the first is the ``model_name``
    label of every metric. ``metrics_engine``: the ``engine`` label of the per-request metrics (vLLM's engine
    index, ``0``, on the colocated server; ``router`` on the router).

    ``api_key``: every route but ``/health`` requires ``Authorization: Bearer <api_key>`` (else 401).
    ``max_body_bytes``: larger bodies get 413. ``max_header_bytes``: longest request line or header line;
    aiohttp refuses a longer one while parsing; ``run_app`` serves that 400 as OpenAI JSON too
    (``http_server``). ``http_limits``: header / body deadlines and the connection cap (``http_server``). ``limits``: per-request caps (400 naming the field); ``max_prompt_tokens=None``
    becomes ``max_model_len``.
    ``max_default_tokens``: cap of ``max_tokens`` when a request omits it (else: the rest of the context).
    ``default_sampling``: SamplingParams fields used when a request omits them (e.g. the checkpoint's
    generation_config.json via ``LLMEngine.default_sampling``).
    """
    if min(max_body_bytes, max_header_bytes, max_default_tokens) < 1 or request_timeout_s <= 0:
        raise ValueError("max_body_bytes, max_header_bytes, request_timeout_s and max_default_tokens must be positive")
    limits = limits or RequestLimits()
    if limits.max_prompt_tokens is None:
        limits = dataclasses.replace(limits, max_prompt_tokens=max_model_len)
    names = [model_name] if isinstance(model_name, str) else list(dict.fromkeys(model_name))
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"model_name: need one or more non-empty names, got {model_name!r}")
    http_limits = dataclasses.replace(http_limits or HttpLimits(), max_body_bytes=max_body_bytes)
    front = _FrontEnd(dispatcher, tokenizer, names, max_model_len=max_model_len, api_key=api_key,
                      request_timeout_s=request_timeout_s, max_default_tokens=max_default_tokens,
                      default_sampling=default_sampling, limits=limits, metrics_engine=metrics_engine,
                      http_limits=http_limits)
    # aiohttp's keep-alive timer closes a connection whose next request's headers are not complete in time:
    # that is the header deadline (and the idle one) of ``http_server``.
    app = web.Application(client_max_size=max_body_bytes, middlewares=[front.middleware],
                          handler_args={"max_line_size": max_header_bytes, "max_field_size": max_header_bytes,
                                        "keepalive_timeout": http_limits.header_timeout_s,
                                        # after an early answer (413, 408, 401) aiohttp drains the unread body
                                        # for this long (default 10 s) before it closes the connection
                                        "lingering_time": 1.0})
    app[FRONTEND_KEY] = front
    app[HTTP_LIMITS_KEY] = http_limits
    app.router.add_post("/v1/completions", front.completions)
    app.router.add_post("/v1/chat/completions", front.chat)
    app.router.add_get("/v1/models", front.models)
    app.router.add_get("/v1/models/{model}", front.model)
    app.router.add_get("/health", front.health)
    app.router.add_get("/metrics", front.prometheus)
    if debug_traces:  # per-request stage timestamps (ids of choice i of an API request are "<id>-<i>")
        app.router.add_get("/debug/requests/{request_id}", front.trace)

    async def on_startup(_app: web.Application) -> None:
        await dispatcher.start()

    async def on_cleanup(_app: web.Application) -> None:
        await dispatcher.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
