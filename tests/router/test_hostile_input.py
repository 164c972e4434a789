"""Hostile input against the real OpenAI front end: aiohttp over a socket, LocalDispatcher, AsyncEngine on a
tiny llama. Hypothesis builds JSON-ish bodies (the real field names with wrong types, NaN/inf/huge/negative
numbers, deep nesting, empty/huge/surrogate strings, random bytes, invalid JSON, wrong content types) and
every answer must be an OpenAI error with a 4xx status, or a 200 when the body happened to be valid; never
a 5xx. Afterwards the engine still serves and holds no KV blocks. Hand-written cases cover the named limits
and the API key."""
from __future__ import annotations

import collections
import gzip
import hmac
import json
import logging
import math
import socket
import time

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from duet.engine import AsyncEngine, EngineConfig  # noqa: E402
from duet.engine.router import app as app_module  # noqa: E402
from duet.engine.router.app import create_app  # noqa: E402
from duet.engine.router.local_dispatcher import LocalDispatcher  # noqa: E402
from duet.engine.router.http_server import HttpLimits
from duet.engine.router.openai_protocol import RequestLimits  # noqa: E402
from tests.router.test_http_local import running  # noqa: E402

MODEL = "tiny-llama"
MAX_MODEL_LEN = 512
ENGINE_KW = dict(show_progress=False, num_kv_blocks=256, max_model_len=MAX_MODEL_LEN)
LIMITS = RequestLimits(max_n=4, max_choices=8)  # keeps the valid requests hypothesis finds cheap
PATHS = ("/v1/completions", "/v1/chat/completions")
OUTCOMES: collections.Counter = collections.Counter()


class ErrorLog(logging.Handler):
    """ERROR records of Duet's loggers: an unhandled exception in a handler, or the engine thread failing."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture(scope="module")
def server(llama_dir):
    engine = AsyncEngine(EngineConfig(model=llama_dir, **ENGINE_KW))
    dispatcher = LocalDispatcher(engine, MODEL)
    initial_free = engine.snapshot().num_free_blocks
    app = create_app(dispatcher, engine.tokenizer, MODEL, max_model_len=dispatcher.max_model_len,
                     max_default_tokens=3, limits=LIMITS)
    errors = ErrorLog()
    logging.getLogger("duet").addHandler(errors)
    try:
        with running(app) as port:
            yield dict(port=port, engine=engine, initial_free=initial_free, errors=errors)
    finally:
        logging.getLogger("duet").removeHandler(errors)


def send(port: int, path: str, body: bytes | None = None, headers: dict | None = None, method: str = "POST",
         timeout_s: float = 60.0) -> tuple[int, dict, bytes]:
    """One raw HTTP/1.1 request on a fresh connection: (status, lower-cased headers, body bytes)."""
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body is not None:
        head.append(f"Content-Length: {len(body)}")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            sock.sendall("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + (body or b""))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (413) and stopped reading: its answer is still there
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if hdrs.get("transfer-encoding") == "chunked":
        payload = _dechunk(payload)
    return status, hdrs, payload


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


def post_json(port: int, path: str, body, **kw) -> tuple[int, dict]:
    status, _, payload = send(port, path, json.dumps(body, allow_nan=True).encode(),
                              {"Content-Type": "application/json"}, **kw)
    return status, json.loads(payload)


def assert_sane(status: int, headers: dict, payload: bytes) -> None:
    """A 4xx OpenAI error body, or a 200 answer (JSON or a complete SSE stream without an error event)."""
    assert status < 500, (status, payload[:300])
    if status == 200:
        if headers.get("content-type", "").startswith("text/event-stream"):
            assert payload.endswith(b"data: [DONE]\n\n") and b'data: {"error"' not in payload, payload[-300:]
        else:
            assert json.loads(payload)["choices"], payload[:300]
        return
    assert 400 <= status < 500, status
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, payload[:300])
    error = json.loads(payload)["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"], error


# ---- strategies ------------------------------------------------------------------------------------------------
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "n", "stream", "stream_options",
          "stop", "temperature", "top_p", "top_k", "min_p", "seed", "logprobs", "top_logprobs", "echo",
          "logit_bias", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens",
          "stop_token_ids", "ignore_eos", "include_stop_str_in_output", "user", "suffix"]
NASTY_NUMBERS = st.sampled_from([
    -1, 0, 1, 2, 3, 16, 17, 20, 21, 512, 513, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**64), 10**30, 10**400,
    0.0, -0.0, 0.5, 1.5, 2.5, 1e-5, 1e-300, 1e-40, 1e39, 1e300, -1e300, math.nan, math.inf, -math.inf])
NASTY_STRINGS = st.sampled_from([
    "", " ", MODEL, "gpt-4", "\ud800", "a\udfffb", "\x00", "é漢🙂", "user", "assistant", "tool", "text",
    "x" * 5000, "hello " * 20_000, "<s>", "{{ raise_exception('x') }}"])
NASTY = st.one_of(st.none(), st.booleans(), NASTY_NUMBERS, NASTY_STRINGS)
LEAVES = st.one_of(NASTY, st.integers(-3, 600), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
KEYS = st.one_of(st.sampled_from(FIELDS + ["role", "content", "type", "text", "include_usage"]), st.text(max_size=6))
ANYTHING = st.recursive(LEAVES, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(KEYS, kids, max_size=4),
                        max_leaves=8)


def hostile(plausible):
    """Mostly values of the right shape (so validation goes deep), else the wrong type or a nasty value."""
    return st.one_of(plausible, plausible, NASTY, ANYTHING)


TEXT_PART = st.fixed_dictionaries({"type": hostile(st.just("text")), "text": hostile(st.text(max_size=8))})
MESSAGE = st.fixed_dictionaries(
    {"role": hostile(st.sampled_from(["system", "developer", "user", "assistant"])),
     "content": hostile(st.one_of(st.text(min_size=1, max_size=16), st.lists(TEXT_PART, min_size=1, max_size=2)))},
    optional={"name": ANYTHING})
VALID = {  # values that pass validation alone (small, so valid requests stay cheap)
    "model": st.just(MODEL),
    "prompt": st.one_of(st.text(min_size=1, max_size=24), st.lists(st.integers(0, 511), min_size=1, max_size=8),
                        st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=2),
                        st.lists(st.lists(st.integers(0, 511), min_size=1, max_size=4), min_size=1, max_size=2)),
    "messages": st.lists(MESSAGE, min_size=1, max_size=3),
    "max_tokens": st.integers(1, 3), "max_completion_tokens": st.integers(1, 3), "min_tokens": st.integers(0, 1),
    "n": st.integers(1, 2), "best_of": st.integers(1, 2), "seed": st.integers(0, 2**62),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": hostile(st.booleans())}),
    "logprobs": st.one_of(st.booleans(), st.integers(0, 20)), "top_logprobs": st.integers(0, 20),
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "min_p": st.floats(0, 1),
    "top_k": st.integers(-1, 600), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "stop": st.one_of(st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=4), max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, 511), max_size=3),
    "echo": st.just(False), "logit_bias": st.just({}), "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(), "user": st.text(max_size=8), "suffix": st.none(),
}


def mutations(min_size: int, max_size: int):
    """A few fields (real names, sometimes unknown ones) with hostile values."""
    names = st.lists(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), min_size=min_size, max_size=max_size,
                     unique=True)
    return names.flatmap(lambda ns: st.fixed_dictionaries({n: hostile(VALID.get(n, ANYTHING)) for n in ns}))


@st.composite
def request_bodies(draw) -> tuple[str, object]:
    """(path, body): a valid core for the path, a few hostile fields on top; or a body of random fields."""
    path = draw(st.sampled_from(PATHS))
    if draw(st.integers(0, 3)) == 0:
        return path, draw(mutations(0, 5))
    core = {"prompt" if path == PATHS[0] else "messages": draw(VALID["prompt" if path == PATHS[0] else "messages"])}
    valid = draw(st.lists(st.sampled_from(sorted(VALID)), max_size=3, unique=True))
    core.update({name: draw(VALID[name]) for name in valid})
    core.setdefault("max_tokens", 2)
    core.update(draw(mutations(0, 2)))
    return path, core


@st.composite
def encoded(draw) -> tuple[str, bytes]:
    path, body = draw(request_bodies())
    kind = draw(st.sampled_from(["json"] * 6 + ["mutated", "bytes", "fixed", "deep"]))
    if kind == "bytes":
        return path, draw(st.binary(max_size=64))
    if kind == "fixed":
        return path, draw(st.sampled_from([
            b"", b"null", b"[]", b"{}", b'"str"', b"NaN", b"1e309", b"-Infinity", b"[1, 2]", b"{" * 100,
            b'{"prompt": "x"', b'{"prompt": "x"}}', b"\xef\xbb\xbf{}", b'{"prompt": "\xff"}', b'{"prompt": "\\ud800"}',
            b"\x00" * 16, b'{"prompt": "x", "prompt": 5}', b'{"messages": [{"role": "user", "content": "x"}]} junk']))
    if kind == "deep":
        depth = draw(st.integers(20, 5000))
        return path, b'{"prompt": ' + b"[" * depth + b"1" + b"]" * depth + b"}"
    data = json.dumps(body, allow_nan=True).encode()
    if kind == "mutated":
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.binary(max_size=4)) + data[cut + draw(st.integers(0, 3)):]
    return path, data


# Same examples on every run, no example database written, bounded time (~5 s here for both tests).
REPRODUCIBLE = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CONTENT_TYPES = st.sampled_from(["application/json"] * 4 + [
    "application/json; charset=utf-8", "text/plain", None, "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz", "application/octet-stream"])


@settings(max_examples=600, **REPRODUCIBLE)
@given(request=encoded(), content_type=CONTENT_TYPES)
def test_generated_hostile_requests(server, request, content_type):
    path, data = request
    headers = {"Content-Type": content_type} if content_type else {}
    status, hdrs, payload = send(server["port"], path, data, headers)
    OUTCOMES[status] += 1
    hypothesis.event(f"status {status}")
    assert_sane(status, hdrs, payload)


NUMERIC_FIELDS = ["temperature", "top_p", "min_p", "top_k", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "min_tokens", "max_tokens", "seed", "n", "logprobs", "best_of"]
EDGE_NUMBERS = st.one_of(
    st.sampled_from([0, 0.0, -0.0, 1, 1.0, 2, -1, 5e-324, 1e-300, 1e-40, 1e-8, 1e-5, 0.999, 1e5, 1e39, 1e300,
                     2**63 - 1, 2**63, 2**64]),
    st.floats(0, 1), st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**70), 2**70),
    st.integers(0, 3))


@settings(max_examples=200, **REPRODUCIBLE)
@given(values=st.dictionaries(st.sampled_from(NUMERIC_FIELDS), EDGE_NUMBERS, min_size=1, max_size=3),
       stream=st.booleans())
def test_generated_sampling_values(server, values, stream):
    """Numbers the engine's sampler sees: each is served or refused with a 400, and none may fail an engine
    step (which would fail every request in the batch and stop the engine: later requests would get 503)."""
    body = {"prompt": "sampling edge", "max_tokens": 2, "ignore_eos": True, "stream": stream, **values}
    status, hdrs, payload = send(server["port"], PATHS[0], json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    OUTCOMES[status] += 1
    hypothesis.event(f"status {status}")
    assert_sane(status, hdrs, payload)


# ---- hand-written nasty cases -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "n": True}, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": False}, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2**64}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, "seed"),
    ("/v1/completions", {"prompt": "x", "top_k": 2**64}, "top_k"),
    ("/v1/completions", {"prompt": "x", "min_tokens": -(2**64)}, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": 10**400}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": math.nan}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": math.inf}, "top_p"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": -math.inf}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "user": {"deep": [math.nan]}}, "user"),
    ("/v1/completions", {"prompt": [1, 2**64]}, "prompt"),
    ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": ["a\udc00"]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["s"] * 17}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["s" * 1025]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [1] * 257}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "n": LIMITS.max_n + 1}, "n"),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 3}, "prompt"),
    # Values the engine's float32 sampler would turn into inf/NaN, failing the whole batch's step.
    ("/v1/completions", {"prompt": "x", "temperature": 1e-40}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 1e39, "min_tokens": 1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 1e-40}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "top_p": 1e-300}, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ("/v1/chat/completions", {"messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": {"a": 1}, "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": {"text": "x"}}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}] * 4097}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21,
                              "logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 1.0}, "n"),
])
def test_named_rejections(server, path, body, param):
    status, err = post_json(server["port"], path, body)
    assert (status, err["error"]["param"]) == (400, param), err
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]


@pytest.mark.parametrize("raw, needle", [
    (b'{"prompt": "\xff\xfe"}', "UTF-8"),
    (b'{"prompt": "x", "max_tokens": 1e309}', "max_tokens"),
    (b'{"prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"prompt": "x", "temperature": Infinity}', "temperature"),
    (b'{"prompt": "x", "top_p": -Infinity}', "top_p"),
    (b"[1, 2, 3]", "JSON object"),
    (b'"just a string"', "JSON object"),
    (b"null", "JSON object"),
    (b"", "invalid JSON"),
    (b'{"prompt": "x",}', "invalid JSON"),
    (b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper than 32"),
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
    (b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}", "invalid JSON"),
])
def test_bad_bodies(server, raw, needle):
    status, headers, payload = send(server["port"], "/v1/completions", raw, {"Content-Type": "application/json"})
    assert status == 400 and needle in json.loads(payload)["error"]["message"], payload[:300]


def test_huge_body_is_413(server):
    body = b'{"prompt": "' + b"a" * (10 << 20) + b'"}'
    status, _, payload = send(server["port"], "/v1/completions", body, {"Content-Type": "application/json"})
    assert status == 413 and "exceeds" in json.loads(payload)["error"]["message"]


def test_huge_header_is_4xx(server):
    # aiohttp refuses these while parsing, before any handler; engine.router.http_server makes the answer JSON.
    status, headers, payload = send(server["port"], "/v1/models", None, {"X-Junk": "a" * 100_000}, method="GET")
    assert_sane(status, headers, payload)
    assert "got more than" in json.loads(payload)["error"]["message"].lower()
    status, headers, payload = send(server["port"], "/v1/models?" + "q" * 100_000, None, method="GET")
    assert_sane(status, headers, payload)
    assert send(server["port"], "/v1/models", None, {"X-Fine": "a" * 4000}, method="GET")[0] == 200


def test_huge_prompts_are_refused_fast(server):
    port = server["port"]
    for path, body in [
        ("/v1/completions", {"prompt": [1] * 1_000_000}),  # 10**6 token ids: refused before the element scan
        ("/v1/completions", {"prompt": [[1] * 600]}),
        ("/v1/completions", {"prompt": "hello world " * 300_000}),  # 3.6 MB of text: only a prefix is tokenized
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi there " * 400_000}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}] * 4000}),
    ]:
        start = time.monotonic()
        status, err = post_json(port, path, body)
        elapsed_s = time.monotonic() - start
        assert status == 400 and err["error"]["param"] in ("prompt", "messages"), err
        assert "limit" in err["error"]["message"], err
        assert elapsed_s < 5, (path, elapsed_s)


def test_body_transport_abuse(server):
    port = server["port"]
    bomb = gzip.compress(b'{"prompt": "' + b"a" * (20 << 20) + b'"}')  # 20 MB when inflated, 20 KB on the wire
    status, _, payload = send(port, "/v1/completions", bomb,
                              {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert status == 413, payload[:200]
    status, _, payload = send(port, "/v1/completions", b"not gzip at all",
                              {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert 400 <= status < 500 and "error" in json.loads(payload), payload[:200]
    # Malformed chunked encoding, and both framings at once: aiohttp's parser or our handler, never a 5xx.
    for head, body in [(b"Transfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n"),
                       (b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n", b"2\r\n{}\r\n0\r\n\r\n")]:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n" + body)
            reply = sock.recv(1 << 16)
        assert reply.split(b" ")[1].startswith(b"4"), reply[:200]
    # A body shorter than its Content-Length, then the client goes away.
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
    status, _ = post_json(port, "/v1/completions", {"prompt": "still here", "max_tokens": 2})
    assert status == 200


def test_server_survives_and_frees_every_block(server):
    if OUTCOMES:  # the generated run happened in this session: it must have reached both outcomes
        assert OUTCOMES[200] > 0 and OUTCOMES[400] > 0, OUTCOMES
    status, body = post_json(server["port"], "/v1/completions", {"prompt": "all good", "max_tokens": 3,
                                                                  "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    status, body = post_json(server["port"], "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
    engine = server["engine"].engine
    deadline = time.monotonic() + 10
    while engine.num_free_blocks != server["initial_free"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_free_blocks == server["initial_free"]
    assert not engine.has_unfinished_requests()
    assert send(server["port"], "/health", method="GET")[0] == 200
    assert not server["errors"].messages, server["errors"].messages[:5]


def test_request_limits_validate():
    for bad in (dict(max_n=0), dict(max_logprobs=21), dict(max_json_depth=True), dict(max_prompt_tokens=0),
                dict(max_stop_chars=1.5), dict(max_choices=2, max_n=4)):
        with pytest.raises(ValueError):
            RequestLimits(**bad)


def test_cli_limit_flags():
    from duet.engine.router.__main__ import parse_args

    args = parse_args(["--model", "m", "--max-n", "4", "--max-prompt-tokens", "100", "--max-body-bytes", "1000",
                       "--max-header-bytes", "2000", "--max-stop-chars", "7", "--header-timeout-s", "3",
                       "--max-connections", "9"])
    assert args.http_kwargs == {"max_body_bytes": 1000, "max_header_bytes": 2000,
                                "limits": RequestLimits(max_n=4, max_prompt_tokens=100, max_stop_chars=7),
                                "http_limits": HttpLimits(header_timeout_s=3, max_connections=9)}
    assert parse_args(["--model", "m"]).http_kwargs["limits"] == RequestLimits()
    for bad in (["--max-n", "0"], ["--max-logprobs", "21"], ["--max-body-bytes", "0"], ["--max-json-depth", "-1"],
                ["--max-choices", "2", "--max-n", "4"], ["--header-timeout-s", "0"], ["--max-connections", "0"]):
        with pytest.raises(SystemExit):
            parse_args(["--model", "m", *bad])


# ---- API key ------------------------------------------------------------------------------------------------------
def test_api_key_guards_every_route_but_health(server, monkeypatch):
    dispatcher = LocalDispatcher(server["engine"], MODEL, owns_engine=False)
    app = create_app(dispatcher, server["engine"].tokenizer, MODEL, max_model_len=MAX_MODEL_LEN, api_key="s3cret",
                     max_default_tokens=2)
    compared = []
    real_compare = hmac.compare_digest

    def spy(a, b):
        compared.append((type(a), type(b), len(a), len(b)))
        return real_compare(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    routes = [("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"), ("GET", "/metrics"),
              ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/nope"), ("POST", "/nope"),
              ("GET", "/health/"), ("GET", "/v1/completions")]
    with running(app) as port:
        assert send(port, "/health", method="GET")[0] == 200
        for key in (None, "Bearer wrong", "Bearer s3cret2", "Bearer s3cre", "bearer s3cret", "Bearer s3crét",
                    "s3cret"):
            for method, path in routes:
                status, headers, payload = send(port, path, b"{}" if method == "POST" else None,
                                                {"Authorization": key} if key else {}, method=method)
                assert status == 401, (key, method, path, status)
                assert json.loads(payload)["error"]["code"] == "invalid_api_key"
        auth = {"Authorization": "Bearer s3cret"}
        assert send(port, "/v1/models", None, auth, method="GET")[0] == 200
        assert send(port, "/metrics", None, auth, method="GET")[0] == 200
        status, _, payload = send(port, "/nope", None, auth, method="GET")
        assert status == 404 and "error" in json.loads(payload)  # unknown routes: 401 first, 404 after the key
        status, _, payload = send(port, "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2}).encode(),
                                  auth)
        assert status == 200, payload
    # Every comparison was between equal-length bytes (digests): no early exit on the key's length.
    assert compared and all(a is bytes and b is bytes and la == lb == 32 for a, b, la, lb in compared), compared


# ---- connection limits: deadlines, a connection cap, announced-oversize chunks -------------------------------------
TIGHT = HttpLimits(header_timeout_s=1.5, body_timeout_s=1.0, max_connections=40)


@pytest.fixture(scope="module")
def tight_server(server):
    dispatcher = LocalDispatcher(server["engine"], MODEL, owns_engine=False)
    app = create_app(dispatcher, server["engine"].tokenizer, MODEL, max_model_len=MAX_MODEL_LEN, max_default_tokens=2,
                     max_body_bytes=1 << 20, http_limits=TIGHT)
    with running(app) as port:
        yield port


def _closed_within(sock: socket.socket, timeout_s: float) -> tuple[bool, bytes]:
    """(the server closed the connection within ``timeout_s``, what it sent before)."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except (TimeoutError, socket.timeout):
        return False, data
    except ConnectionResetError:
        pass
    return True, data


def test_slowloris_connections_are_closed_at_the_header_deadline(tight_server):
    socks = []
    try:
        for _ in range(30):  # each trickles a header line and never finishes its headers
            s = socket.create_connection(("127.0.0.1", tight_server), timeout=10)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: a")
            socks.append(s)
        time.sleep(0.5)
        for s in socks:
            s.sendall(b"a")  # still trickling: the deadline counts from the connection's start, not the last byte
        start = time.monotonic()
        assert all(_closed_within(s, 5)[0] for s in socks)
        assert time.monotonic() - start < 4
    finally:
        for s in socks:
            s.close()
    status, body = post_json(tight_server, "/v1/completions", {"prompt": "still serving", "max_tokens": 2})
    assert status == 200, body


def test_stalled_body_gets_408_and_announced_oversize_chunk_413(tight_server):
    with socket.create_connection(("127.0.0.1", tight_server), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\"")
        closed, data = _closed_within(s, 5)
    assert closed and data.split(b" ")[1] == b"408" and b"not received within" in data, data[:300]
    with socket.create_connection(("127.0.0.1", tight_server), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffff\r\n")
        start = time.monotonic()
        closed, data = _closed_within(s, 5)
    assert closed and time.monotonic() - start < 1, data[:300]
    assert data.split(b" ")[1] == b"413" and json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == 413


def test_connections_over_the_cap_get_503(tight_server):
    socks = [socket.create_connection(("127.0.0.1", tight_server), timeout=10) for _ in range(TIGHT.max_connections)]
    try:
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", tight_server), timeout=10) as extra:
            closed, data = _closed_within(extra, 5)
        assert closed and data.split(b" ")[1] == b"503", data[:200]
    finally:
        for s in socks:
            s.close()
    time.sleep(0.3)
    assert post_json(tight_server, "/v1/completions", {"prompt": "room again", "max_tokens": 2})[0] == 200


def test_malformed_http_is_one_warning_line_not_a_traceback(tight_server, caplog):
    with caplog.at_level(logging.INFO, logger="duet.engine.router.http_server"):
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", tight_server), timeout=10) as s:
                s.sendall(b"GARBAGE / HTTP/1.1\r\nHost: x\r\n\r\n")
                _closed_within(s, 5)
    lines = [r for r in caplog.records if r.name == "duet.engine.router.http_server"]
    assert lines and all(r.levelno == logging.WARNING and r.exc_info is None for r in lines)
    assert all("malformed HTTP from" in r.getMessage() for r in lines)
