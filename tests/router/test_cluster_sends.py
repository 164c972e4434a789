"""The router's fire-and-forget sends from synchronous code (an Abort to a superseded attempt, a KVFailed when a
prefill server dies) go out on a real ``zmq.asyncio`` socket."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import zmq
import zmq.asyncio

from duet.engine.protocol import Abort, KVFailed
from duet.engine.router.cluster import _send_soon
from duet.transfer.wire import decode


def test_send_soon_takes_zmq_asyncio_futures():
    """``zmq.asyncio``'s send returns a Future that may already be done; ``asyncio.create_task`` refused it with
    TypeError, which killed the registry's watch loop at the first prefill death with a transfer in flight."""
    async def main():
        ctx = zmq.asyncio.Context()
        server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        try:
            port = server.bind_to_random_port("tcp://127.0.0.1")
            client.connect(f"tcp://127.0.0.1:{port}")
            link = SimpleNamespace(socket=client)
            sent = [Abort("r1", attempt=2), KVFailed("r2", "t2", "prefill server tcp://10.0.0.3:7001 died")]
            for msg in sent:
                _send_soon(link, msg)
            got = [decode((await asyncio.wait_for(server.recv_multipart(), 10))[1]) for _ in sent]
            assert got == sent
        finally:
            client.close(0)
            server.close(0)
            ctx.term()

    asyncio.run(main())
