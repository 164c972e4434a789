"""``python -m engine.serve --model DIR --role both --port HTTP``: one server, any role.

``--role both`` is the colocated server: one engine that prefills and decodes, serving the OpenAI HTTP API
itself (the baseline every disaggregated number is compared against). ``--role prefill`` / ``decode`` run
the same server as ``python -m engine.prefill`` / ``engine.decode`` (``--port`` is then the ZeroMQ port).
"""
from __future__ import annotations

import argparse
import os
import sys

from engine.server.cli import add_engine_args, add_logging_args, apply_threads, engine_config, server_main, setup_logging


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--role", default="both", choices=["both", "prefill", "decode"])
    known, rest = pre.parse_known_args(argv)
    if known.role != "both":
        server_main(known.role, rest)
        return
    ap = argparse.ArgumentParser(prog="python -m engine.serve", description=__doc__.splitlines()[0])
    ap.add_argument("--role", default="both", choices=["both"])
    add_engine_args(ap)
    add_logging_args(ap)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (not on /health)")
    from engine.router.app import add_http_args, create_app, http_options, run_app

    add_http_args(ap)
    args = ap.parse_args(argv)
    http_kwargs, ssl_context = http_options(ap, args)
    setup_logging(args)
    apply_threads(args)

    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    if args.executor == "vllm":
        from engine.router.vllm_dispatcher import VllmDispatcher
        from engine.tokenizer import generation_defaults, load_tokenizer

        dispatcher = VllmDispatcher(engine_config(args), name)
        tokenizer, max_model_len = load_tokenizer(args.model), dispatcher.max_model_len
        default_sampling = generation_defaults(args.model)
    else:
        from engine.async_engine import AsyncEngine
        from engine.router.local_dispatcher import LocalDispatcher

        engine = AsyncEngine(engine_config(args))
        dispatcher, tokenizer = LocalDispatcher(engine, name), engine.tokenizer
        max_model_len, default_sampling = engine.max_model_len, engine.default_sampling
    app = create_app(dispatcher, tokenizer, name, max_model_len=max_model_len, api_key=args.api_key,
                     default_sampling=default_sampling, **http_kwargs)
    scheme = "https" if ssl_context is not None else "http"
    # Ready once listening: the dispatcher (a vLLM engine, say) starts inside run_app, before the socket binds.
    run_app(app, args.host, args.port, ssl_context=ssl_context,
            on_ready=lambda _: print(f"DUET_READY both {scheme}://{args.host}:{args.port}", flush=True))


if __name__ == "__main__":
    main()
