"""A minimal P/D proxy in front of two ``vllm serve`` servers that use vLLM's own ``NixlConnector``.

    python -m bench.vllm_nixl_proxy --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 --port 8000

Benchmark harness for row (b) of ``bench.vllm_peer``, not product code: one prefill and one decode server, no
routing, no retries. Prints ``PROXY_READY <url>`` once it listens.

Contract, per ``POST /v1/completions``:

1. The client's JSON body goes to the prefill server with ``max_tokens=1``, ``stream=False`` (no
   ``stream_options``, no ``min_tokens``) and ``kv_transfer_params`` asking for a remote decode
   (``do_remote_decode: true``). vLLM then keeps the prompt's KV blocks after the request finishes and
   answers with the ``kv_transfer_params`` (engine id, block ids, side-channel host/port) that the decode
   server needs to READ them over NIXL.
2. The original body, plus those ``kv_transfer_params``, goes to the decode server, which pulls the blocks
   and generates. Its response (streamed or not, as the client asked) is relayed to the client unchanged.

A failed or malformed prefill reply is passed back as it is (or as a 502): the decode server is never asked
to prefill by itself, so the row cannot silently become colocated serving. Every upstream call has a
deadline (``--timeout-s``). ``GET /v1/models`` and ``GET /health`` are answered by the decode server.
"""
from __future__ import annotations

import argparse
import logging
import uuid

import aiohttp
from aiohttp import web

logger = logging.getLogger(__name__)

REMOTE_DECODE = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                 "remote_block_ids": None, "remote_host": None, "remote_port": None}


def prefill_body(body: dict) -> dict:
    """The prefill server's request: one token, not streamed, KV kept for a remote decode."""
    out = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens")}
    out.update(max_tokens=1, stream=False, kv_transfer_params=dict(REMOTE_DECODE))
    return out


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "proxy_error", "code": status}}, status=status)


async def completions(request: web.Request) -> web.StreamResponse:
    app = request.app
    session: aiohttp.ClientSession = app["session"]
    body = await request.json()
    headers = {"X-Request-Id": str(uuid.uuid4())}
    try:
        async with session.post(app["prefill"] + "/v1/completions", json=prefill_body(body), headers=headers,
                                timeout=app["timeout"]) as resp:
            if resp.status != 200:
                return web.Response(status=resp.status, body=await resp.read(), content_type="application/json")
            params = (await resp.json()).get("kv_transfer_params")
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        return _error(502, f"prefill server: {type(exc).__name__}: {exc}")
    if not params:
        return _error(502, "prefill server returned no kv_transfer_params (is NixlConnector configured?)")

    out = web.StreamResponse()
    try:
        async with session.post(app["decode"] + "/v1/completions", json={**body, "kv_transfer_params": params},
                                headers=headers, timeout=app["timeout"]) as resp:
            out.set_status(resp.status)
            out.content_type = resp.content_type
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
    except (TimeoutError, aiohttp.ClientError) as exc:
        if not out.prepared:
            return _error(502, f"decode server: {type(exc).__name__}: {exc}")
        logger.warning("decode stream broke off: %s", exc)  # the client sees a stream without [DONE]
    await out.write_eof()
    return out


async def _relay_get(request: web.Request) -> web.Response:
    app = request.app
    try:
        async with app["session"].get(app["decode"] + request.path, timeout=app["timeout"]) as resp:
            return web.Response(status=resp.status, body=await resp.read(), content_type=resp.content_type)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return _error(502, f"decode server: {type(exc).__name__}: {exc}")


def make_app(prefill_url: str, decode_url: str, timeout_s: float) -> web.Application:
    app = web.Application()
    app["prefill"], app["decode"] = prefill_url.rstrip("/"), decode_url.rstrip("/")
    app["timeout"] = aiohttp.ClientTimeout(total=timeout_s)

    async def session_ctx(app: web.Application):
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app["session"].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", _relay_get)
    app.router.add_get("/health", _relay_get)
    return app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", required=True, help="prefill server base URL")
    ap.add_argument("--decode", required=True, help="decode server base URL")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--timeout-s", type=float, default=300.0, help="deadline of each upstream request")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    url = f"http://{args.host}:{args.port}"
    web.run_app(make_app(args.prefill, args.decode, args.timeout_s), host=args.host, port=args.port,
                print=lambda _: print(f"PROXY_READY {url}", flush=True), access_log=None)


if __name__ == "__main__":
    main()
