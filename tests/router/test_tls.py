"""HTTPS on the OpenAI front end: a self-signed certificate made with the ``openssl`` CLI, the colocated app
(LocalDispatcher over a real AsyncEngine on a tiny llama) served with ``serve(ssl_context=...)``, queried by
the real ``openai`` client trusting that certificate; plain HTTP and untrusting clients are refused. The CLIs'
``--ssl-certfile/--ssl-keyfile`` are checked too (``engine.serve --role both`` end to end, in a process)."""
from __future__ import annotations

import http.client
import shutil
import ssl
import subprocess

import openai
import pytest

try:  # the HTTP library the openai client is built on (renamed httpx2 in some environments)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")

from duet.engine import AsyncEngine, EngineConfig
from duet.engine.launcher import ServerProcess
from duet.engine.router.app import create_app
from duet.engine.router.http_server import make_ssl_context
from duet.engine.router.local_dispatcher import LocalDispatcher
from tests.router.test_http_local import running

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[str, str]:
    """(certificate, key) PEM paths of a self-signed certificate for 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed")
    out = tmp_path_factory.mktemp("tls")
    cert_path, key_path = str(out / "cert.pem"), str(out / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key_path, "-out", cert_path, "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_server(llama_dir, cert):
    engine = AsyncEngine(EngineConfig(model=llama_dir, show_progress=False, num_kv_blocks=64, max_model_len=256))
    dispatcher = LocalDispatcher(engine, MODEL)
    app = create_app(dispatcher, engine.tokenizer, MODEL, max_model_len=dispatcher.max_model_len,
                     max_default_tokens=4)
    with running(app, make_ssl_context(*cert)) as port:
        yield port


def trusting_client(base_url: str, cert_path: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="x", max_retries=0,
                         http_client=httpx.Client(verify=ssl.create_default_context(cafile=cert_path)))


def test_openai_client_over_https(tls_server, cert):
    client = trusting_client(f"https://127.0.0.1:{tls_server}/v1", cert[0])
    assert [m.id for m in client.models.list().data] == [MODEL]
    resp = client.completions.create(model=MODEL, prompt="over tls", max_tokens=3, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 3 and resp.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"


def test_plain_http_and_untrusting_clients_are_refused(tls_server, cert):
    conn = http.client.HTTPConnection("127.0.0.1", tls_server, timeout=10)
    with pytest.raises((http.client.HTTPException, OSError)):
        conn.request("GET", "/health")
        conn.getresponse().read()
    conn.close()
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{tls_server}/v1", api_key="x", max_retries=0).models.list()
    with pytest.raises(openai.APIConnectionError):  # the system's CAs do not know the self-signed certificate
        openai.OpenAI(base_url=f"https://127.0.0.1:{tls_server}/v1", api_key="x", max_retries=0).models.list()
    # The server shrugged all of that off.
    assert trusting_client(f"https://127.0.0.1:{tls_server}/v1", cert[0]).models.list().data[0].id == MODEL


def test_router_cli_builds_the_ssl_context(cert):
    from duet.engine.router.__main__ import parse_args

    args = parse_args(["--model", "m", "--ssl-certfile", cert[0], "--ssl-keyfile", cert[1]])
    assert isinstance(args.ssl_context, ssl.SSLContext)
    assert parse_args(["--model", "m"]).ssl_context is None
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--ssl-keyfile", cert[1]])  # a key without its certificate
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--ssl-certfile", cert[1] + ".missing"])


def test_colocated_cli_serves_https_with_its_limits(llama_dir, cert):
    proc = ServerProcess("serve", llama_dir, "--role", "both", "--served-model-name", MODEL, "--num-kv-blocks",
                         "64", "--max-model-len", "256", "--ssl-certfile", cert[0], "--ssl-keyfile", cert[1],
                         "--max-prompt-tokens", "8", "--max-header-bytes", "2048", "--max-n", "2")
    try:
        proc.wait_ready()
        assert f"DUET_READY both https://127.0.0.1:{proc.port}" in proc.output()
        client = trusting_client(f"https://127.0.0.1:{proc.port}/v1", cert[0])
        resp = client.completions.create(model=MODEL, prompt="cli tls", max_tokens=2)
        assert resp.usage.completion_tokens == 2
        with pytest.raises(openai.BadRequestError, match="limit of 8 prompt tokens"):
            client.completions.create(model=MODEL, prompt="a prompt that is rather longer than eight tokens",
                                      max_tokens=2)
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=3)
        assert info.value.body["param"] == "n"
        raw = httpx.Client(verify=ssl.create_default_context(cafile=cert[0]))
        url = f"https://127.0.0.1:{proc.port}/v1/models"
        assert raw.get(url, headers={"X-Big": "a" * 4000}).status_code == 400  # aiohttp's plain-text 400
        assert raw.get(url, headers={"X-Fine": "a" * 1000}).status_code == 200
    finally:
        assert proc.stop() == 0, proc.output()[-3000:]
