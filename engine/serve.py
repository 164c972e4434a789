"""``duet serve MODEL`` (``python -m engine.serve MODEL``): one server, any role; colocated by default.

``--role both`` (the default) is the colocated server: one engine that prefills and decodes, serving the
OpenAI HTTP API itself (the baseline every disaggregated number is compared against). ``--role prefill`` /
``decode`` run the same server as ``duet prefill`` / ``duet decode`` (``--port`` is then the ZeroMQ port).
"""
from __future__ import annotations

import argparse
import sys

from duet.engine import envs
from duet.engine.server.advertised_address import AdvertisedAddress
from duet.engine.server.cli import (
    add_address_args,
    add_engine_args,
    add_frontend_args,
    add_logging_args,
    apply_threads,
    check_model_files,
    engine_config,
    resolve_model_args,
    server_main,
    setup_logging,
    startup_errors,
)


def main(argv: list[str] | None = None, prog: str = "python -m engine.serve") -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--role", default="both", choices=["both", "prefill", "decode"])
    known, rest = pre.parse_known_args(argv)
    if known.role != "both":
        server_main(known.role, rest, prog=prog)
        return
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--role", default="both", choices=["both"])
    add_engine_args(ap)
    add_frontend_args(ap)
    add_logging_args(ap)
    add_address_args(ap, "the HTTP socket")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port")
    ap.add_argument("--api-key", default=envs.api_key(),
                    help="require 'Authorization: Bearer KEY' (not on /health); default: $DUET_API_KEY (from a "
                    "Secret, say: a flag shows in the process list)")
    from duet.engine.router.app import create_app
    from duet.engine.router.http_server import add_http_args, http_options, run_app

    add_http_args(ap)
    args = ap.parse_args(argv)
    resolve_model_args(ap, args)
    http_kwargs, ssl_context = http_options(ap, args)
    setup_logging(args)
    with startup_errors(prog, args):
        where = AdvertisedAddress.resolve(args.host, args.advertise_host, allow_loopback=args.allow_loopback_advertise)
        from duet.engine.tokenizer import generation_config_dir, generation_defaults, load_chat_template, load_tokenizer

        config = engine_config(args)
        check_model_files(config, executor=args.executor)
        chat_template = load_chat_template(args.chat_template)
        apply_threads(args)
        name = args.served_model_names
        if args.executor == "vllm":
            from duet.engine.router.vllm_dispatcher import VllmDispatcher

            dispatcher = VllmDispatcher(config, name[0])
            tokenizer = load_tokenizer(config.tokenizer or config.model, chat_template)
            max_model_len = dispatcher.max_model_len
            default_sampling = generation_defaults(generation_config_dir(config.model, config.generation_config))
        else:
            from duet.engine.async_engine import AsyncEngine
            from duet.engine.router.local_dispatcher import LocalDispatcher

            engine = AsyncEngine(config)
            dispatcher, tokenizer = LocalDispatcher(engine, name[0]), engine.tokenizer
            if chat_template is not None:
                tokenizer.chat_template = chat_template
            max_model_len, default_sampling = engine.max_model_len, engine.default_sampling
        app = create_app(dispatcher, tokenizer, name, max_model_len=max_model_len, api_key=args.api_key,
                         default_sampling=default_sampling, **http_kwargs)
    scheme = "https" if ssl_context is not None else "http"
    # Ready once listening: the dispatcher (a vLLM engine, say) starts inside run_app, before the socket binds.
    with startup_errors(prog, args):
        run_app(app, args.host, args.port, ssl_context=ssl_context,
                on_ready=lambda _: print(f"DUET_READY both {where.url(scheme, args.port)}", flush=True))


if __name__ == "__main__":
    main()
