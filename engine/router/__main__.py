"""``python -m engine.router``: the OpenAI HTTP router in front of prefill and decode servers.

    python -m engine.router --model DIR --prefill tcp://127.0.0.1:7001 --decode tcp://127.0.0.1:7002 --port 8000

The router tokenizes and detokenizes (with the model directory's tokenizer); servers exchange token ids.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os

from engine.router.app import create_app, serve
from engine.router.cluster import ClusterDispatcher
from engine.router.placement import Placement
from engine.server.cli import add_logging_args, setup_logging
from engine.tokenizer import generation_defaults, load_tokenizer

logger = logging.getLogger("engine.router")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m engine.router", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory (tokenizer, chat template, defaults)")
    ap.add_argument("--served-model-name")
    ap.add_argument("--prefill", nargs="*", default=[], help="prefill servers' command sockets (tcp://H:P)")
    ap.add_argument("--decode", nargs="+", required=True, help="decode servers' command sockets (tcp://H:P)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (not on /health)")
    ap.add_argument("--policy", default="least_loaded", choices=["round_robin", "least_loaded"])
    ap.add_argument("--min-prefill-tokens", type=int, default=0,
                    help="prompts shorter than this are prefilled by the decode server itself")
    ap.add_argument("--kv-timeout-s", type=float, default=30.0)
    ap.add_argument("--connect-timeout-s", type=float, default=120.0)
    ap.add_argument("--request-timeout-s", type=float, default=600.0)
    add_logging_args(ap)
    return ap.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    tokenizer = load_tokenizer(args.model)
    dispatcher = ClusterDispatcher(
        args.prefill, args.decode, name, Placement(args.policy, args.min_prefill_tokens),
        connect_timeout_s=args.connect_timeout_s, kv_timeout_s=args.kv_timeout_s,
        request_timeout_s=args.request_timeout_s)
    try:
        await dispatcher.start()
    except Exception:
        await dispatcher.close()
        raise
    app = create_app(dispatcher, tokenizer, name, max_model_len=dispatcher.max_model_len, api_key=args.api_key,
                     request_timeout_s=args.request_timeout_s, default_sampling=generation_defaults(args.model))
    await serve(app, args.host, args.port,
                on_ready=lambda addrs: print(f"DUET_READY router http://{args.host}:{args.port}", flush=True))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args)
    try:
        asyncio.run(amain(args))
    except Exception as e:  # noqa: BLE001 - start-up errors end the process with one clear line
        from engine.router.dispatcher import DispatchError

        if isinstance(e, DispatchError):
            logger.error("router cannot start: %s", e)
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":
    main()
