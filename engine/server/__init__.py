"""Duet's engine servers: one engine per process behind a ZeroMQ command socket and an event socket.

``engine_server.EngineServer`` runs the loop for every role (``prefill``, ``decode``, ``both``);
``cli`` holds the command-line flags shared by ``python -m engine.prefill``, ``engine.decode`` and
``engine.serve``.
"""
