"""The OpenAI HTTP front end end to end: real aiohttp server, LocalDispatcher over a real AsyncEngine on a tiny
llama, driven by the real ``openai`` client (and raw HTTP for what the client refuses to send)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import json
import socket
import threading
import time

import openai
import pytest

from duet.engine import LLM, AsyncEngine, EngineConfig, SamplingParams
from duet.engine.router.app import create_app
from duet.engine.router.http_server import serve
from duet.engine.router.dispatcher import DispatchError, Dispatcher, TokenDelta
from duet.engine.router.local_dispatcher import LocalDispatcher
from duet.engine.tokenizer import apply_chat_template
from tests.metrics.exposition import VLLM_ENGINE_FAMILIES, VLLM_REQUEST_FAMILIES, check_vllm_families, samples

MODEL = "tiny-llama"
ENGINE_KW = dict(show_progress=False, num_kv_blocks=128, max_model_len=512)
MAX_BODY = 64 * 1024


@contextlib.contextmanager
def running(app, ssl_context=None):
    """Serve ``app`` on 127.0.0.1:<free port> (HTTPS with ``ssl_context``) from a background event loop; yields
    the port."""
    loop = asyncio.new_event_loop()
    ready, box = threading.Event(), {}

    def main():
        asyncio.set_event_loop(loop)
        box["stop"] = asyncio.Event()
        try:
            loop.run_until_complete(serve(app, "127.0.0.1", 0, stop=box["stop"], shutdown_timeout_s=5,
                                          ssl_context=ssl_context,
                                          on_ready=lambda addrs: (box.update(port=addrs[0][1]), ready.set())))
        finally:
            ready.set()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert ready.wait(60) and "port" in box, "server did not start"
    try:
        yield box["port"]
    finally:
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join(30)
        loop.close()


class SpyDispatcher(LocalDispatcher):
    """Records requests whose delta iterator the front end closed before the final delta."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.closed_early: list[str] = []

    async def generate(self, request):
        finished = False
        try:
            async for delta in super().generate(request):
                finished = delta.finished
                yield delta
        finally:
            if not finished:
                self.closed_early.append(request.request_id)


@pytest.fixture(scope="module")
def server(llama_dir):
    engine = AsyncEngine(EngineConfig(model=llama_dir, **ENGINE_KW))
    aborted: list[str] = []
    llm_engine = engine.engine
    original_abort = llm_engine.abort_request

    def recording_abort(request_id):  # runs on the engine thread
        done = original_abort(request_id)
        if done:
            aborted.append(request_id)
        return done

    llm_engine.abort_request = recording_abort
    dispatcher = SpyDispatcher(engine, MODEL)
    initial_free = llm_engine.num_free_blocks
    app = create_app(dispatcher, engine.tokenizer, MODEL, max_model_len=dispatcher.max_model_len,
                     max_body_bytes=MAX_BODY, max_default_tokens=16)
    with running(app) as port:
        yield dict(port=port, engine=engine, dispatcher=dispatcher, aborted=aborted, initial_free=initial_free,
                   client=openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0))
    assert not engine._thread.is_alive(), "app cleanup must shut the engine down"


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, **ENGINE_KW)


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def raw(port, method, path, body=None, headers=None):
    """(status, headers, parsed JSON or text) of one raw HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, resp.headers, json.loads(text)
    except json.JSONDecodeError:
        return resp.status, resp.headers, text


def test_completions_match_llm(server, llm):
    client, tok = server["client"], llm.tokenizer
    ids = tok.encode("the quick brown fox")
    for prompt in ("the quick brown fox", ["the quick brown fox", "jumps over"], ids, [ids, ids[:3]]):
        resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            prompt = [prompt]
        refs = llm.generate(list(prompt), greedy(8))
        assert [c.index for c in resp.choices] == list(range(len(refs)))
        assert [c.text for c in resp.choices] == [r.text for r in refs]
        assert all(c.finish_reason == "length" for c in resp.choices)
        assert resp.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in refs)
        assert resp.usage.completion_tokens == 8 * len(refs)
        assert resp.object == "text_completion" and resp.model == MODEL and resp.id.startswith("cmpl-")


def test_chat_matches_llm(server, llm):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]
    resp = server["client"].chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                    extra_body={"ignore_eos": True})
    ids = apply_chat_template(llm.tokenizer, messages)
    ref = llm.generate(ids, greedy(10))[0]
    assert resp.choices[0].message.content == ref.text and resp.choices[0].message.role == "assistant"
    assert resp.usage.prompt_tokens == len(ids) and resp.object == "chat.completion"
    parts = [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]}, messages[1]]
    again = server["client"].chat.completions.create(model=MODEL, messages=parts, max_tokens=10, temperature=0,
                                                     extra_body={"ignore_eos": True})
    assert again.choices[0].message.content == ref.text
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # same prompt: prefix cache hit


def test_streaming_equals_non_streaming(server):
    client = server["client"]
    kw = dict(model=MODEL, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(prompt="once upon a time", **kw)
    chunks = list(client.completions.create(prompt="once upon a time", stream=True,
                                            stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 12

    messages = [{"role": "user", "content": "tell me a story"}]
    full = client.chat.completions.create(messages=messages, n=2, **kw)
    chunks = list(client.chat.completions.create(messages=messages, n=2, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == full.choices[i].message.content
        assert mine[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].object == "chat.completion.chunk"
    one = [c.choices[0] for c in client.chat.completions.create(messages=messages, stream=True, **{**kw,
                                                                "max_tokens": 1})]
    assert one[0].delta.role == "assistant" and [c.finish_reason for c in one] == [None, "length"]


def test_concurrent_requests(server, llm):
    prompts = [f"concurrent prompt number {i}" for i in range(6)]
    refs = llm.generate(prompts, greedy(8))
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(lambda p: server["client"].completions.create(
            model=MODEL, prompt=p, max_tokens=8, temperature=0, stream=p.endswith(("1", "3")),
            extra_body={"ignore_eos": True}), prompts))
    texts = [t.choices[0].text if hasattr(t, "choices") else "".join(c.choices[0].text for c in t) for t in texts]
    assert texts == [r.text for r in refs]


def test_n_with_seed(server):
    client = server["client"]
    kw = dict(model=MODEL, prompt="a seeded prompt", max_tokens=10, temperature=1.0)
    both = client.completions.create(n=2, seed=7, **kw)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in client.completions.create(n=2, seed=7, **kw).choices] == [c.text for c in both.choices]
    assert client.completions.create(n=1, seed=8, **kw).choices[0].text == both.choices[1].text
    multi = client.completions.create(model=MODEL, prompt=["p one", "p two"], n=2, max_tokens=3)
    assert [c.index for c in multi.choices] == [0, 1, 2, 3]


@pytest.fixture
def slow_steps(server):
    """Each engine step takes >= 10 ms while the test runs, so a request outlives what the test makes the front
    end do mid-request (a client disconnect, a stop string): the tiny model decodes a token in well under a
    millisecond on the C++ CPU ops, fast enough to finish first."""
    llm_engine = server["engine"].engine
    real = llm_engine.step

    def step():
        time.sleep(0.01)
        return real()

    llm_engine.step = step  # the engine thread looks the method up on every step
    yield
    del llm_engine.step


def test_stop_strings(server, llm, slow_steps):
    client = server["client"]
    base = llm.generate("stop here please", greedy(16))[0].text
    stop = next(base[i:i + 2] for i in range(1, len(base) - 1)
                if "\ufffd" not in base[i:i + 2] and base[i:i + 2].strip())
    ref = llm.generate("stop here please", greedy(16, stop=[stop]))[0]
    resp = client.completions.create(model=MODEL, prompt="stop here please", max_tokens=16, temperature=0,
                                      stop=[stop], extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "stop" and ref.finish_reason == "stop"
    assert resp.choices[0].text == ref.text == base[:base.index(stop)]
    assert resp.usage.completion_tokens == len(ref.token_ids)
    streamed = list(client.completions.create(model=MODEL, prompt="stop here please", max_tokens=16,
                                              temperature=0, stop=stop, stream=True,
                                              extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == ref.text
    assert streamed[-1].choices[0].finish_reason == "stop"
    early = [r for r in server["dispatcher"].closed_early if r.startswith(resp.id)]
    assert early, "a stop string must close the dispatcher iterator"


def test_logprobs(server, llm):
    client = server["client"]
    ref = llm.generate("log prob prompt", greedy(6, logprobs=3))[0]
    resp = client.completions.create(model=MODEL, prompt="log prob prompt", max_tokens=6, temperature=0, logprobs=3,
                                     extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    expected = [ref.logprobs[i][t] for i, t in enumerate(ref.token_ids)]
    assert lp.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert all(1 <= len(top) <= 4 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == resp.choices[0].text

    messages = [{"role": "user", "content": "logprobs please"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob <= 0 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert b"".join(bytes(c.bytes) for c in content).decode(errors="replace").replace("\ufffd", "") == \
        chat.choices[0].message.content.replace("\ufffd", "")
    streamed = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                                   logprobs=True, top_logprobs=2, stream=True,
                                                   extra_body={"ignore_eos": True}))
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [c.token for c in content]


def test_models_health_metrics(server):
    port, client = server["port"], server["client"]
    # One completion of its own, so the counters below do not depend on other tests having run first.
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=2, temperature=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert raw(port, "GET", f"/v1/models/{MODEL}")[0] == 200
    assert raw(port, "GET", "/health")[:3:2] == (200, {"status": "ok"})
    status, headers, text = raw(port, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    fams = check_vllm_families(text, VLLM_ENGINE_FAMILIES + VLLM_REQUEST_FAMILIES + ("vllm:prefix_cache_queries",))
    assert fams["http_requests"] == ("counter", {"handler", "method", "status"})
    assert fams["http_request_duration_seconds"][0] == "histogram"
    assert fams["process_cpu_seconds"][0] == "counter" and fams["python_gc_collections"][0] == "counter"
    assert not [n for n in fams if n.startswith("duet_server_")], "a server stat without a name in the table"
    labels = {"model_name": MODEL, "engine": "0"}
    assert samples(text, "vllm:time_to_first_token_seconds_count")[0] == (labels, pytest.approx(
        samples(text, "vllm:e2e_request_latency_seconds_count")[0][1]))
    assert samples(text, "vllm:time_to_first_token_seconds_count")[0][1] > 0
    assert samples(text, "vllm:request_success_total") and all(
        v == 0 for lb, v in samples(text, "vllm:request_success_total") if lb["finished_reason"] == "repetition")
    assert sum(v for lb, v in samples(text, "vllm:request_success_total") if lb["finished_reason"] == "length") > 0
    assert samples(text, "vllm:num_requests_running") == [(labels, 0.0)]
    assert samples(text, "vllm:generation_tokens_total")[0][1] >= 2
    assert samples(text, "duet_requests_running") == [({}, 0.0)]
    ok = [v for lb, v in samples(text, "http_requests_total") if lb == {"handler": "/v1/completions",
                                                                        "method": "POST", "status": "2xx"}]
    assert ok and ok[0] >= 1


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "temperature": float("nan")}, 400, "temperature"),
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "x", "n": True}, 400, "n"),
    ({"prompt": "x", "n": 17}, 400, "n"),
    ({"prompt": [1, 99999]}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "allowed_token_ids": [99999]}, 400, "allowed_token_ids"),
    ({"prompt": "x", "model": "nope"}, 404, "model"),
])
def test_bad_completion_requests(server, body, status, param):
    got, _, err = raw(server["port"], "POST", "/v1/completions", json.dumps(body).encode())
    assert (got, err["error"]["param"]) == (status, param), err
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]


def test_bad_requests_raw_and_client(server):
    port, client = server["port"], server["client"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4o", prompt="x")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        status, _, err = raw(port, "POST", "/v1/chat/completions", body)
        assert status == 400 and err["error"]["type"] == "invalid_request_error", body
    status, _, err = raw(port, "POST", "/v1/completions", b'{"prompt": "' + b"a" * MAX_BODY + b'"}')
    assert status == 413 and "error" in err
    status, _, err = raw(port, "GET", "/v1/nothing")
    assert status == 404 and "error" in err
    status, _, err = raw(port, "GET", "/v1/completions")
    assert status == 405 and "error" in err
    # The server is still healthy and serving.
    assert client.completions.create(model=MODEL, prompt="still alive", max_tokens=2).choices[0].text is not None


def test_client_disconnect_aborts(server, slow_steps):
    port, engine = server["port"], server["engine"]
    before = len(server["aborted"])
    sock = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"prompt": "a long story", "max_tokens": 400, "stream": True, "ignore_eos": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while b"data: " not in received:
        received += sock.recv(4096)
    sock.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if len(server["aborted"]) > before and engine.snapshot().num_free_blocks == server["initial_free"]:
            break
        time.sleep(0.05)
    assert len(server["aborted"]) > before, "disconnect must abort the engine request"
    assert engine.snapshot().num_free_blocks == server["initial_free"]


def test_client_disconnect_aborts_non_streaming(server, slow_steps):
    port, engine = server["port"], server["engine"]
    before = len(server["aborted"])
    sock = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"prompt": "another long story", "max_tokens": 400, "ignore_eos": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 10
    while engine.snapshot().num_free_blocks == server["initial_free"] and time.monotonic() < deadline:
        time.sleep(0.01)  # until the request holds blocks
    sock.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if len(server["aborted"]) > before and engine.snapshot().num_free_blocks == server["initial_free"]:
            break
        time.sleep(0.05)
    assert len(server["aborted"]) > before, "disconnect must abort the engine request"
    assert engine.snapshot().num_free_blocks == server["initial_free"]


def test_no_blocks_leaked(server):
    engine = server["engine"].engine
    deadline = time.monotonic() + 10
    while engine.num_free_blocks != server["initial_free"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_free_blocks == server["initial_free"]
    assert not engine.has_unfinished_requests()


# ---- front end behaviour against a scripted dispatcher -----------------------------------------------------
class ScriptedDispatcher(Dispatcher):
    model_name, max_model_len, vocab_size = MODEL, 64, 512

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.is_healthy = True

    async def generate(self, request):
        prompt = self.tokenizer.decode(request.prompt_token_ids, skip_special_tokens=True)
        if "hang" in prompt:
            await asyncio.sleep(3600)
        if "busy" in prompt:
            raise DispatchError("all servers are busy", status=429, retry_after_s=1.5)
        yield TokenDelta(token_ids=self.tokenizer.encode(" ok", add_special_tokens=False))
        if "fail" in prompt:
            yield TokenDelta(finished=True, finish_reason="error", error="decode server died", status=503)
            return
        yield TokenDelta(token_ids=[], finished=True, finish_reason="length")

    async def abort(self, request_id):
        pass

    def healthy(self):
        return self.is_healthy


def test_scripted_errors_auth_and_health(llama_dir):
    from duet.engine.tokenizer import load_tokenizer

    dispatcher = ScriptedDispatcher(load_tokenizer(llama_dir))
    app = create_app(dispatcher, dispatcher.tokenizer, MODEL, max_model_len=64, api_key="secret",
                     request_timeout_s=1.0)
    with running(app) as port:
        auth = {"Authorization": "Bearer secret"}
        assert raw(port, "GET", "/health")[0] == 200
        assert raw(port, "GET", "/v1/models")[0] == 401
        assert raw(port, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert raw(port, "GET", "/metrics")[0] == 401
        assert raw(port, "GET", "/v1/models", headers=auth)[0] == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="secret", max_retries=0)
        assert client.completions.create(model=MODEL, prompt="hi", max_tokens=4).choices[0].text == " ok"

        status, headers, err = raw(port, "POST", "/v1/completions", {"prompt": "busy", "max_tokens": 4}, auth)
        assert (status, headers["Retry-After"], err["error"]["type"]) == (429, "2", "rate_limit_error")
        status, _, err = raw(port, "POST", "/v1/completions", {"prompt": "fail", "max_tokens": 4}, auth)
        assert status == 503 and err["error"]["message"] == "decode server died"
        status, _, text = raw(port, "POST", "/v1/completions", {"prompt": "fail", "max_tokens": 4, "stream": True},
                              auth)
        events = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
        assert status == 200 and json.loads(events[0])["choices"][0]["text"] == " ok"
        assert json.loads(events[-2])["error"]["message"] == "decode server died" and events[-1] == "[DONE]"

        status, _, err = raw(port, "POST", "/v1/completions", {"prompt": "hang", "max_tokens": 4}, auth)
        assert status == 504 and err["error"]["code"] == "timeout"

        dispatcher.is_healthy = False
        assert raw(port, "GET", "/health")[0] == 503
