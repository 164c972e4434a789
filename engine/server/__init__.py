"""Duet's servers: one engine per process behind a ZeroMQ command socket and an event socket.

``server.Server`` runs the loop for every role (``prefill``, ``decode``, ``both``) over an ``executor.Executor``
(``native_executor.NativeExecutor`` or ``vllm_executor.VllmExecutor``), configured by
``server_config.ServerConfig``; ``cli`` holds the command-line flags shared by ``python -m engine.prefill``,
``engine.decode`` and ``engine.serve``.
"""
