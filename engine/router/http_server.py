"""aiohttp's HTTP server with Duet's connection limits, answering what it refuses in the OpenAI error shape; how
an app is served (``serve``, ``run_app``, TLS) and the HTTP flags every front end takes (``add_http_args``).

aiohttp refuses some requests while parsing them, before any handler or middleware runs: headers or a request
line over the size limit, malformed HTTP. Its ``RequestHandler.handle_error`` then writes a text/plain body and
logs a traceback. Here those answers are OpenAI-shaped JSON (``{"error": {"message", "type", "param",
"code"}}``) and each is logged as one rate-limited WARNING line naming the peer.

Limits every connection lives under (``HttpLimits``):
- a header deadline: a request's headers must be complete within ``header_timeout_s`` of the connection opening
  or of the previous response (so a slowloris client that trickles header bytes is closed, as is an idle
  keep-alive connection); aiohttp's keep-alive timer does the closing;
- a body deadline (``body_timeout_s``, applied where the front end reads the body: 408);
- a chunked body whose first chunk announces more than ``max_body_bytes`` is answered 413 at once;
- at most ``max_connections`` open connections: one more is answered 503 and closed.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import ssl
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable

from aiohttp import web, web_protocol, web_server

from duet.engine.router.openai_protocol import RequestLimits

logger = logging.getLogger(__name__)

LOG_LINES_PER_MINUTE = 10
DEFAULT_MAX_BODY_BYTES = 8 << 20
DEFAULT_MAX_HEADER_BYTES = 8190  # aiohttp's own default


@dataclass(frozen=True)
class HttpLimits:
    header_timeout_s: float = 10.0
    """Headers of each request must arrive within this long; idle keep-alive connections close after it too."""
    body_timeout_s: float = 30.0
    """A request body must arrive within this long of its headers (then 408)."""
    max_connections: int = 2048
    """Open connections at most; one more gets 503 and is closed."""
    max_body_bytes: int = 32 << 20

    def __post_init__(self) -> None:
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise ValueError("header_timeout_s and body_timeout_s must be > 0")
        if self.max_connections < 1 or self.max_body_bytes < 1:
            raise ValueError("max_connections and max_body_bytes must be >= 1")


class _RateLimitedLog:
    """At most ``LOG_LINES_PER_MINUTE`` lines a minute; the rest are counted and reported in the next line."""

    def __init__(self) -> None:
        self.window_start = 0.0
        self.lines = 0
        self.suppressed = 0

    def warning(self, fmt: str, *args) -> None:
        now = time.monotonic()
        if now - self.window_start > 60:
            self.window_start, self.lines = now, 0
        if self.lines >= LOG_LINES_PER_MINUTE:
            self.suppressed += 1
            return
        self.lines += 1
        if self.suppressed:
            fmt, args = fmt + " (%d similar lines suppressed)", (*args, self.suppressed)
            self.suppressed = 0
        logger.warning(fmt, *args)


_refusals = _RateLimitedLog()


def error_bytes(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response carrying an OpenAI-shaped error, for answers written before any handler runs."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class DuetRequestHandler(web_protocol.RequestHandler):
    _first_bytes = b""
    _checked_first_chunk = False

    @property
    def _limits(self) -> HttpLimits:
        return getattr(self._manager, "duet_limits", None) or HttpLimits()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if manager is not None and len(manager.connections) > self._limits.max_connections:
            _refusals.warning("refusing a connection from %s: %d open (limit %d)",
                              transport.get_extra_info("peername"), len(manager.connections),
                              self._limits.max_connections)
            transport.write(error_bytes(503, "too many open connections; retry later"))
            self.force_close()
            transport.close()

    def data_received(self, data: bytes) -> None:
        if not self._checked_first_chunk and self._refuse_oversize_first_chunk(data):
            return
        super().data_received(data)

    def _refuse_oversize_first_chunk(self, data: bytes) -> bool:
        """The first request of a connection announces a chunk over the body limit: answer 413 and close.
        (A body that stalls later, or a later request's, is cut by the body deadline instead.)"""
        self._first_bytes += data
        head, sep, rest = self._first_bytes.partition(b"\r\n\r\n")
        if not sep:
            if len(self._first_bytes) > 65536:
                self._checked_first_chunk, self._first_bytes = True, b""
            return False
        if b"transfer-encoding: chunked" not in head.lower():
            self._checked_first_chunk, self._first_bytes = True, b""
            return False
        size, eol, _ = rest.partition(b"\r\n")
        if not eol:
            if len(rest) > 64:
                self._checked_first_chunk, self._first_bytes = True, b""
            return False
        self._checked_first_chunk, self._first_bytes = True, b""
        try:
            announced = int(size.split(b";")[0].strip(), 16)
        except ValueError:
            return False  # aiohttp's parser answers a malformed chunk itself
        if announced <= self._limits.max_body_bytes:
            return False
        _refusals.warning("refusing a chunked body from %s announcing %d bytes (limit %d)",
                          self.transport.get_extra_info("peername") if self.transport else None, announced,
                          self._limits.max_body_bytes)
        if self.transport is not None:
            self.transport.write(error_bytes(413, f"request body exceeds {self._limits.max_body_bytes} bytes"))
        self.force_close()
        if self.transport is not None:
            self.transport.close()
        return True

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        client_error = 400 <= status < 500
        if client_error:
            _refusals.warning("malformed HTTP from %s: %s", request.remote, message or exc)
        else:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        # A 5xx message could carry internals: only its status phrase is sent.
        text = f"{phrase}: {message}" if client_error and message else phrase
        body = {"error": {"message": text, "type": "invalid_request_error" if client_error else "server_error",
                          "param": None, "code": status}}
        resp = web.Response(status=status, text=json.dumps(body), content_type="application/json")
        resp.force_close()
        return resp


class DuetServer(web_server.Server):
    duet_limits: HttpLimits | None = None

    def __call__(self) -> web_protocol.RequestHandler:
        return DuetRequestHandler(self, loop=self._loop, **self._kwargs)


def use_duet_server(runner: web.AppRunner, limits: HttpLimits) -> None:
    """After ``runner.setup()``: Duet's request handler and connection limits on ``runner``'s server."""
    if type(runner.server) is web_server.Server:
        runner.server.__class__ = DuetServer
    runner.server.duet_limits = limits


HTTP_LIMITS_KEY = web.AppKey("duet_http_limits", HttpLimits)
"""Where ``engine.router.app.create_app`` leaves the app's limits for ``serve``."""


def make_ssl_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2+) from a PEM certificate chain and its key (``None``: in certfile)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context


async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 8000, *,
                shutdown_timeout_s: float = 30.0, stop: asyncio.Event | None = None,
                on_ready: Callable[[list], None] | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives (signals only on the main thread).

    Shutdown: stop accepting, give in-flight requests ``shutdown_timeout_s`` to finish, cancel the rest
    (which aborts them downstream), then close the dispatcher. ``on_ready(addresses)`` runs once listening.
    ``ssl_context``: serve HTTPS only (``make_ssl_context``).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout_s, handle_signals=False)
    await runner.setup()
    use_duet_server(runner, app[HTTP_LIMITS_KEY])
    signals = []
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
                signals.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread: the caller stops us through ``stop``
        scheme = "https" if ssl_context is not None else "http"
        logger.info("serving on %s", ", ".join(f"{scheme}://{a[0]}:{a[1]}" for a in runner.addresses))
        if on_ready is not None:
            on_ready(runner.addresses)
        await stop.wait()
        logger.info("shutting down")
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def run_app(app: web.Application, host: str = "127.0.0.1", port: int = 8000, *,
            shutdown_timeout_s: float = 30.0, ssl_context: ssl.SSLContext | None = None,
            on_ready: Callable[[list], None] | None = None) -> None:
    """Blocking: ``serve`` on a fresh event loop until SIGTERM/SIGINT, then shut down cleanly."""
    asyncio.run(serve(app, host, port, shutdown_timeout_s=shutdown_timeout_s, ssl_context=ssl_context,
                      on_ready=on_ready))


# ---- CLI flags shared by ``engine.serve --role both`` and ``engine.router`` -----------------------------------
def add_http_args(ap: argparse.ArgumentParser) -> None:
    """Request limits and TLS flags; ``http_options`` turns them into ``create_app`` and ``serve`` arguments."""
    group = ap.add_argument_group("HTTP limits (violations get a 4xx) and TLS")
    group.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="larger bodies get 413")
    group.add_argument("--max-header-bytes", type=int, default=DEFAULT_MAX_HEADER_BYTES,
                       help="longest request line or header line (aiohttp answers a plain 400)")
    for f in dataclasses.fields(RequestLimits):
        default = "the model's context" if f.default is None else "%(default)s"
        group.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default,
                           help=f"RequestLimits.{f.name} (default: {default})")
    group.add_argument("--header-timeout-s", type=float, default=HttpLimits.header_timeout_s,
                       help="a request's headers must arrive within this long (idle connections close after it too)")
    group.add_argument("--body-timeout-s", type=float, default=HttpLimits.body_timeout_s,
                       help="a request's body must arrive within this long of its headers (else 408)")
    group.add_argument("--max-connections", type=int, default=HttpLimits.max_connections,
                       help="open HTTP connections at most (one more gets 503)")
    group.add_argument("--ssl-certfile", help="serve HTTPS with this PEM certificate (chain)")
    group.add_argument("--ssl-keyfile", help="the certificate's PEM private key (default: inside --ssl-certfile)")


def http_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[dict, ssl.SSLContext | None]:
    """(``create_app`` keyword arguments, ``serve``'s ssl_context) from ``add_http_args`` flags; bad values
    end the CLI through ``ap.error``."""
    try:
        if args.max_body_bytes < 1 or args.max_header_bytes < 1:
            raise ValueError("--max-body-bytes and --max-header-bytes must be positive")
        limits = RequestLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RequestLimits)})
        http_limits = HttpLimits(args.header_timeout_s, args.body_timeout_s, args.max_connections)
        if args.ssl_keyfile and not args.ssl_certfile:
            raise ValueError("--ssl-keyfile needs --ssl-certfile")
    except ValueError as e:
        ap.error(str(e))
    try:
        context = make_ssl_context(args.ssl_certfile, args.ssl_keyfile) if args.ssl_certfile else None
    except OSError as e:  # ssl.SSLError is an OSError
        ap.error(f"--ssl-certfile {args.ssl_certfile} / --ssl-keyfile {args.ssl_keyfile}: {e}")
    return {"max_body_bytes": args.max_body_bytes, "max_header_bytes": args.max_header_bytes,
            "limits": limits, "http_limits": http_limits}, context
