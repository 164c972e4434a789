"""aiohttp's HTTP server with Duet's connection limits, answering what it refuses in the OpenAI error shape.

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

import json
import logging
import time
from dataclasses import dataclass
from http import HTTPStatus

from aiohttp import web, web_protocol, web_server

logger = logging.getLogger(__name__)

LOG_LINES_PER_MINUTE = 10


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
