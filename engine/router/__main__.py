"""``python -m engine.router``: the OpenAI HTTP router in front of prefill and decode servers.

    python -m engine.router --model DIR --prefill tcp://127.0.0.1:7001 --decode tcp://127.0.0.1:7002 --port 8000

The router tokenizes and detokenizes (with the model directory's tokenizer); servers exchange token ids.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os

from engine.router.app import add_http_args, create_app, http_options, serve
from engine.router.cluster import ClusterDispatcher
from engine.router.scoring import POLICIES, RouterPolicy
from engine.server.cli import add_logging_args, setup_logging
from engine.tokenizer import generation_defaults, load_tokenizer
from transfer.curve import load_keys

logger = logging.getLogger("engine.router")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m engine.router", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory (tokenizer, chat template, defaults)")
    ap.add_argument("--served-model-name")
    ap.add_argument("--prefill", nargs="+", action="extend", default=[],
                    help="prefill servers' command sockets (tcp://H:P)")
    ap.add_argument("--decode", nargs="+", action="extend", default=[], help="decode servers' command sockets (tcp://H:P)")
    ap.add_argument("--registry-port", type=int, help="accept servers registering at run time (--router on them)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (not on /health)")
    ap.add_argument("--policy", default="prefix_aware", choices=list(POLICIES))
    ap.add_argument("--disagg-threshold-tokens", type=int, default=RouterPolicy.disagg_threshold_tokens,
                    help="prefill remotely only when more prompt tokens than this are uncached on the decode server")
    ap.add_argument("--ttft-budget-s", type=float, default=RouterPolicy.default_ttft_budget_s)
    ap.add_argument("--heartbeat-s", type=float, default=0.2, help="servers' heartbeat period (3 missed = dead)")
    ap.add_argument("--max-queue", type=int, default=256, help="admission queue bound (then 429)")
    ap.add_argument("--queue-timeout-s", type=float, default=10.0, help="longest wait in the admission queue")
    ap.add_argument("--kv-timeout-s", type=float, default=30.0)
    ap.add_argument("--zmq-keys", help="CURVE key directory shared with the servers")
    ap.add_argument("--debug-traces", action="store_true",
                    help="serve GET /debug/requests/{id}: a request's stage timestamps on router and servers")
    ap.add_argument("--connect-timeout-s", type=float, default=120.0)
    ap.add_argument("--request-timeout-s", type=float, default=600.0)
    add_http_args(ap)
    add_logging_args(ap)
    args = ap.parse_args(argv)
    args.http_kwargs, args.ssl_context = http_options(ap, args)
    return args


async def amain(args: argparse.Namespace) -> None:
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    tokenizer = load_tokenizer(args.model)
    policy = RouterPolicy(policy=args.policy, disagg_threshold_tokens=args.disagg_threshold_tokens,
                          default_ttft_budget_s=args.ttft_budget_s)
    registry = f"tcp://{args.host}:{args.registry_port}" if args.registry_port else None
    dispatcher = ClusterDispatcher(
        args.prefill, args.decode, name, policy, connect_timeout_s=args.connect_timeout_s,
        kv_timeout_s=args.kv_timeout_s, request_timeout_s=args.request_timeout_s, heartbeat_s=args.heartbeat_s,
        max_queue=args.max_queue, queue_timeout_s=args.queue_timeout_s, registry_address=registry,
        zmq_keys=load_keys(args.zmq_keys))
    try:
        await dispatcher.start()
    except Exception:
        await dispatcher.close()
        raise
    app = create_app(dispatcher, tokenizer, name, max_model_len=dispatcher.max_model_len, api_key=args.api_key,
                     request_timeout_s=args.request_timeout_s, default_sampling=generation_defaults(args.model),
                     debug_traces=args.debug_traces, **args.http_kwargs)
    scheme = "https" if args.ssl_context is not None else "http"
    await serve(app, args.host, args.port, ssl_context=args.ssl_context,
                on_ready=lambda addrs: print(f"DUET_READY router {scheme}://{args.host}:{args.port}", flush=True))


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
