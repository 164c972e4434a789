"""What every Duet server shares, whatever runs its model: the command socket's plumbing.

``CommandServer`` is the base of ``EngineServer`` (native engine) and ``VllmServer`` (vLLM engine). It binds
sockets, decodes commands and dispatches each to ``_on_<messagetype>``, answers by router identity, keeps
bounded per-request traces, applies the checks every ``Generate`` gets (role, draining, sampling), and runs
the serve loop with its two-step stop (drain, then exit). A subclass sets ``self.cmd`` (the ROUTER socket),
``self.role``, ``self.engine_id``, ``self.draining``, ``self.stopping``, ``self.drain_timeout_s`` and
``self.traces`` before serving, and provides ``run_once`` (one poll-and-work turn) and ``close``.
"""
from __future__ import annotations

import logging
import signal
import time

import zmq

from engine.sampling_params import SamplingParams
from transfer.messages import Generate, Refused, Tokens
from transfer.wire import Message, ProtocolError, decode, encode

logger = logging.getLogger(__name__)

MAX_TRACES = 1024
ROLES = ("prefill", "decode", "both")


def check_server_args(role: str, kv_failure_policy: str, heartbeat_s: float) -> None:
    """ValueError naming the field for settings every server kind takes."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if kv_failure_policy not in ("recompute", "fail"):
        raise ValueError(f"kv_failure_policy must be recompute or fail, got {kv_failure_policy!r}")
    if not heartbeat_s > 0:
        raise ValueError(f"heartbeat_s must be > 0, got {heartbeat_s}")


class CommandServer:
    cmd: zmq.Socket
    role: str
    engine_id: str
    draining: bool
    stopping: bool
    drain_timeout_s: float
    traces: dict[str, dict[str, float]]

    def serve_forever(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
        try:
            while not self.stopping:
                self.run_once()
        finally:
            self.close()

    def stop(self) -> None:
        """First call (SIGTERM): drain — admit nothing new, finish what runs (bounded by drain_timeout_s), exit.
        A second call exits now."""
        if self.draining:
            self.stopping = True
            return
        logger.info("%s draining (up to %.0fs)", self.engine_id, self.drain_timeout_s)
        self.draining = True
        self._drain_deadline = time.monotonic() + self.drain_timeout_s

    def run_once(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @staticmethod
    def _bind(sock: zmq.Socket, host: str, port: int) -> int:
        """Bind ``sock`` on ``host``; port 0 picks a free one. Returns the port."""
        if port == 0:
            return sock.bind_to_random_port(f"tcp://{host}")
        sock.bind(f"tcp://{host}:{port}")
        return port

    def _recv_command(self) -> tuple[bytes, Message] | None:
        """The next decoded command, or None when none is waiting. Malformed ones are answered and skipped."""
        while True:
            try:
                ident, raw = self.cmd.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return None
            except ValueError:
                continue  # wrong frame count: not one of ours
            try:
                return ident, decode(raw)
            except ProtocolError as e:
                logger.warning("dropping malformed command: %s", e)
                self._reply(ident, Refused(f"malformed message: {e}"))

    def _handle(self, ident: bytes, msg: Message) -> None:
        handler = getattr(self, f"_on_{type(msg).__name__.lower()}", None)
        if handler is None:
            self._reply(ident, Refused(f"{type(msg).__name__} is not a command for a {self.role} server"))
        else:
            handler(ident, msg)

    def _reply(self, ident: bytes, msg: Message) -> None:
        try:
            self.cmd.send_multipart([ident, encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.warning("reply %s dropped: %s", type(msg).__name__, e)

    def _trace(self, request_id: str, stage: str) -> None:
        self.traces.setdefault(request_id, {}).setdefault(stage, time.time())
        while len(self.traces) > MAX_TRACES:
            self.traces.pop(next(iter(self.traces)))

    def _generate_params(self, ident: bytes, msg: Generate) -> SamplingParams | None:
        """The request's SamplingParams, or None after answering why this server will not generate it."""
        if self.role == "prefill" or self.draining:
            why = "server is draining" if self.draining else "a prefill server does not generate"
            self._reply(ident, Tokens(msg.request_id, [], finished=True, finish_reason="error", error=why,
                                      status=503, retryable=True))
            return None
        try:
            return SamplingParams.from_dict(msg.sampling)
        except (ValueError, TypeError) as e:
            self._reply(ident, Tokens(msg.request_id, [], finished=True, finish_reason="error", error=str(e),
                                      status=400))
            return None
