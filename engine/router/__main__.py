"""``duet router MODEL`` (``python -m engine.router``): the OpenAI HTTP router in front of prefill and decode
servers.

    duet router DIR --prefill tcp://127.0.0.1:7001 --decode tcp://127.0.0.1:7002 --port 8000

The router tokenizes and detokenizes (with the model directory's tokenizer, or ``--tokenizer``); servers
exchange token ids. While it waits for the listed servers at start-up it logs which ones have not answered.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os

from duet.engine import envs
from duet.engine.router.app import create_app
from duet.engine.router.http_server import add_http_args, http_options, serve
from duet.engine.router.cluster import ClusterDispatcher
from duet.engine.router.dispatcher import DispatchError
from duet.engine.router.scoring import POLICIES, RouterPolicy
from duet.engine.router.tier_cost import TierPolicy
from duet.engine.server.advertised_address import AdvertisedAddress
from duet.engine.server.cli import (
    add_address_args,
    add_frontend_args,
    add_logging_args,
    add_model_args,
    resolve_model_args,
    setup_logging,
    startup_errors,
)
from duet.engine.tokenizer import generation_config_dir, generation_defaults, load_chat_template, load_tokenizer
from duet.transfer.curve import load_keys

logger = logging.getLogger("duet.engine.router")


def parse_args(argv: list[str] | None = None, prog: str = "python -m engine.router") -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    ap.add_argument("--generation-config", default="auto",
                    help="sampling defaults: 'auto' (the model's generation_config.json), 'vllm' (none), or a "
                    "directory holding a generation_config.json")
    add_frontend_args(ap)
    ap.add_argument("--prefill", nargs="+", action="extend", default=[],
                    help="prefill servers' command sockets (tcp://H:P)")
    ap.add_argument("--decode", nargs="+", action="extend", default=[], help="decode servers' command sockets (tcp://H:P)")
    ap.add_argument("--registry-port", type=int, help="accept servers registering at run time (--router "
                    "tcp://ADVERTISE_HOST:PORT on them)")
    add_address_args(ap, "the HTTP and registry sockets")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port")
    ap.add_argument("--api-key", default=envs.api_key(),
                    help="require 'Authorization: Bearer KEY' (not on /health); default: $DUET_API_KEY (from a "
                    "Secret, say: a flag shows in the process list)")
    ap.add_argument("--policy", default="prefix_aware", choices=list(POLICIES))
    ap.add_argument("--disagg-threshold-tokens", type=int, default=RouterPolicy.disagg_threshold_tokens,
                    help="prefill remotely only when more prompt tokens than this are uncached on the decode server")
    ap.add_argument("--ttft-budget-s", type=float, default=RouterPolicy.default_ttft_budget_s)
    ap.add_argument("--kv-pulls", action="store_true",
                    help="let a server pull a prompt prefix cached on another server (device or host tier) when "
                    "the pull is predicted cheaper than recomputing it")
    ap.add_argument("--heartbeat-s", type=float, default=0.2, help="servers' heartbeat period")
    ap.add_argument("--missed-heartbeats", type=int, default=5,
                    help="a server silent this many heartbeat periods is taken for dead (its requests move)")
    ap.add_argument("--lease-ttl-s", type=float, default=5.0,
                    help="servers abort this router's requests when they hear nothing from it for this long")
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
    resolve_model_args(ap, args)
    args.prog = prog
    args.http_kwargs, args.ssl_context = http_options(ap, args)
    return args


def advertised(args: argparse.Namespace) -> AdvertisedAddress:
    """The router's bind and advertised addresses (ValueError naming the flag when they cannot work)."""
    return AdvertisedAddress.resolve(args.host, args.advertise_host, allow_loopback=args.allow_loopback_advertise)


async def amain(args: argparse.Namespace) -> None:
    where = advertised(args)  # first: a wrong address fails before the tokenizer loads
    names = args.served_model_names
    tokenizer = load_tokenizer(args.tokenizer or args.model, load_chat_template(args.chat_template))
    default_sampling = generation_defaults(_generation_dir(args))
    policy = RouterPolicy(policy=args.policy, disagg_threshold_tokens=args.disagg_threshold_tokens,
                          default_ttft_budget_s=args.ttft_budget_s, tiers=TierPolicy(pulls=args.kv_pulls))
    registry = where.bind_endpoint(args.registry_port) if args.registry_port else None
    if not args.zmq_keys:
        logger.warning("the ZeroMQ control plane to the servers is plaintext; turn on CURVE with --zmq-keys DIR "
                       "(python -m engine.tools.keys DIR) on the router and every server")
    dispatcher = ClusterDispatcher(
        args.prefill, args.decode, names[0], policy, connect_timeout_s=args.connect_timeout_s,
        kv_timeout_s=args.kv_timeout_s, request_timeout_s=args.request_timeout_s, heartbeat_s=args.heartbeat_s,
        missed_heartbeats=args.missed_heartbeats,
        max_queue=args.max_queue, queue_timeout_s=args.queue_timeout_s, registry_address=registry,
        zmq_keys=load_keys(args.zmq_keys), lease_ttl_s=args.lease_ttl_s)
    try:
        await dispatcher.start()
    except DispatchError as e:
        await dispatcher.close()
        raise ConnectionError(f"router cannot start: {e}") from None
    except Exception:
        await dispatcher.close()
        raise
    app = create_app(dispatcher, tokenizer, names, max_model_len=dispatcher.max_model_len, api_key=args.api_key,
                     request_timeout_s=args.request_timeout_s, default_sampling=default_sampling,
                     debug_traces=args.debug_traces, metrics_engine="router", **args.http_kwargs)
    scheme = "https" if args.ssl_context is not None else "http"
    ready = f"DUET_READY router {where.url(scheme, args.port)}"
    if registry:  # what servers give as --router: the advertised address, not the bind one
        ready += f" registry {where.endpoint(args.registry_port)}"
        logger.info("servers register at %s (bound on %s)", where.endpoint(args.registry_port), registry)
    await serve(app, args.host, args.port, ssl_context=args.ssl_context,
                on_ready=lambda addrs: print(ready, flush=True))


def _generation_dir(args: argparse.Namespace):
    value = args.generation_config
    if value not in ("auto", "vllm", "none") and not os.path.isdir(value):
        raise FileNotFoundError(f"--generation-config {value}: not a directory (nor auto, vllm)")
    return generation_config_dir(args.model, value)


def main(argv: list[str] | None = None, prog: str = "python -m engine.router") -> None:
    args = parse_args(argv, prog)
    setup_logging(args)
    with startup_errors(prog, args):
        asyncio.run(amain(args))


if __name__ == "__main__":
    main()
