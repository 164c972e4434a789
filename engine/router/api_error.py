"""The error the OpenAI front end answers with: an ``APIError`` renders as an OpenAI-shaped JSON error body."""
from __future__ import annotations

_ERROR_TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error",
                504: "timeout_error"}


def error_body(message: str, *, status: int = 400, param: str | None = None, code: str | None = None) -> dict:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class APIError(Exception):
    """A request the front end refuses or could not serve; rendered as an OpenAI error body."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, status=self.status, param=self.param, code=self.code)
