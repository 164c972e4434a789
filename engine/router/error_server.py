"""aiohttp's HTTP server, answering the requests it cannot parse in the OpenAI error shape.

aiohttp refuses some requests while parsing them, before any handler or middleware runs: headers or a request
line over the size limit, malformed HTTP. Its ``RequestHandler.handle_error`` then writes a text/plain body.
Every other error of Duet's API is OpenAI-shaped JSON (``{"error": {"message", "type", "param", "code"}}``), so
``JsonErrorServer`` makes those answers JSON too. Logging, the "nothing sent yet" check and closing the
connection stay aiohttp's.
"""
from __future__ import annotations

import json
from http import HTTPStatus

from aiohttp import web, web_protocol, web_server


class JsonErrorRequestHandler(web_protocol.RequestHandler):
    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if a response already started
        client_error = 400 <= status < 500
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        # A 5xx message could carry internals: only its status phrase is sent.
        text = f"{phrase}: {message}" if client_error and message else phrase
        body = {"error": {"message": text, "type": "invalid_request_error" if client_error else "server_error",
                          "param": None, "code": status}}
        resp = web.Response(status=status, text=json.dumps(body), content_type="application/json")
        resp.force_close()
        return resp


class JsonErrorServer(web_server.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


def use_json_errors(runner: web.AppRunner) -> None:
    """After ``runner.setup()``: answer unparseable requests with OpenAI-shaped JSON errors."""
    if type(runner.server) is web_server.Server:
        runner.server.__class__ = JsonErrorServer
