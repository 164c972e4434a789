"""Reading wire messages off a ZeroMQ socket without blocking: what every loop that serves a socket does."""
from __future__ import annotations

import logging
from typing import Callable, Iterator

import zmq

from duet.transfer.wire import Message, ProtocolError, decode

logger = logging.getLogger(__name__)


def recv_messages(sock: zmq.Socket, *, routed: bool = False,
                  on_bad: Callable[[bytes | None, ProtocolError], None] | None = None
                  ) -> Iterator[tuple[bytes | None, Message]]:
    """Every message waiting on ``sock`` now, decoded, as ``(sender identity, message)``.

    ``routed``: a ROUTER socket (frames: identity, payload); otherwise one frame, identity None. Frame lists of
    another shape are dropped; bytes that are not a valid message are logged and reported to ``on_bad``.
    """
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        if len(frames) != (2 if routed else 1):
            continue
        ident = frames[0] if routed else None
        try:
            msg = decode(frames[-1])
        except ProtocolError as e:
            logger.warning("dropping a malformed message: %s", e)
            if on_bad is not None:
                on_bad(ident, e)
            continue
        yield ident, msg
