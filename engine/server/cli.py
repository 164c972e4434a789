"""Command-line flags shared by ``duet serve|prefill|decode|router`` (``engine.serve``, ``engine.prefill``,
``engine.decode``, ``engine.router``), and their start-up error handling.

Flag names follow ``vllm serve`` wherever the meaning is the same: the model is positional (``--model`` kept
as an alias), ``--served-model-name`` takes several names, ``--enable-prefix-caching`` /
``--no-enable-prefix-caching``, ``--tokenizer``, ``--chat-template``, ``--generation-config``,
``--enforce-eager``. Duet's older spellings stay as hidden aliases (``--no-prefix-caching``).

``startup_errors`` turns an exception while a command starts into one line naming the file, flag or field
(``duet serve: error: /m/config.json: unsupported architecture ['Foo']; ...``) and exit status 2; with
``--log-level debug`` the traceback is logged as well.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time

from duet.engine import envs
from duet.engine.config import EngineConfig
from duet.engine.server.server_config import ServerConfig

logger = logging.getLogger(__name__)

MODEL_HELP = ("model directory (Hugging Face layout: config.json, safetensors, tokenizer). The API serves it "
              "under this argument exactly as given (not its basename), plus every --served-model-name")


def add_model_args(ap: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``MODEL`` (positional) or ``--model MODEL``, and ``--served-model-name NAME [NAME ...]``;
    ``resolve_model_args`` checks and normalises them after parsing."""
    ap.add_argument("model_arg", nargs="?", metavar="MODEL", help=MODEL_HELP)
    ap.add_argument("--model", help="the same as the positional MODEL (vLLM's spelling)")
    ap.add_argument("--served-model-name", nargs="+", metavar="NAME",
                    help="more ids the API answers to (several allowed); the first names the model in metrics "
                    "and in responses to requests that name none")
    ap.set_defaults(_model_required=required)


def resolve_model_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``args.model``: the model as given (positional or ``--model``); ``args.served_model_names``: every id the
    API serves (served names first, then the model); ``args.served_model_name``: the first, as a string."""
    if args.model_arg and args.model and args.model_arg != args.model:
        ap.error(f"MODEL {args.model_arg!r} and --model {args.model!r} disagree; give one")
    args.model = args.model or args.model_arg
    if not args.model and getattr(args, "_model_required", True):
        ap.error("the model directory is required (MODEL or --model MODEL)")
    names = list(args.served_model_name or [])
    args.served_model_names = list(dict.fromkeys(names + ([args.model] if args.model else [])))
    args.served_model_name = args.served_model_names[0] if args.served_model_names else None


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    add_model_args(ap)
    g = ap.add_argument_group("engine")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    g.add_argument("--generation-config", default="auto",
                   help="sampling defaults and extra EOS ids: 'auto' (the model's generation_config.json), 'vllm' "
                   "(none: neutral defaults), or a directory holding a generation_config.json")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--device", default="auto")
    g.add_argument("--block-size", type=int,
                   help="tokens per KV block (default: 16; with --executor vllm on CPU, 32: vLLM's CPU attention "
                   "needs a multiple of 32)")
    g.add_argument("--num-kv-blocks", "--num-gpu-blocks-override", type=int,
                   help="KV pool size in blocks, instead of sizing it from memory")
    g.add_argument("--kv-cache-memory-bytes", type=int)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-num-seqs", type=int, default=128)
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse KV blocks of identical prompt prefixes")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", help=argparse.SUPPRESS)
    g.add_argument("--host-kv-gib", type=float, default=0.0,
                   help="host memory (GiB) for a KV tier under the prefix cache: cached blocks are written through "
                   "to it and loaded back instead of recomputed; other servers can pull from it (0 = off; native "
                   "executor only)")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "torch"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights at the checkpoint's shapes (benchmarks; no safetensors needed)")
    g.add_argument("--enforce-eager", action="store_true", help="never capture CUDA graphs (decode runs eagerly)")
    g.add_argument("--no-cuda-graphs", action="store_true", help="the same as --enforce-eager")
    g.add_argument("--cuda-graph-max-batch", type=int, default=256, help="largest decode batch captured")
    g.add_argument("--executor", default="native", choices=["native", "vllm"],
                   help="native: Duet's engine; vllm: a vLLM V1 engine (pip install -e .[vllm]) with Duet's KV "
                   "connector, behind the same protocol")
    g.add_argument("--torch-threads", type=int, default=envs.torch_threads(),
                   help="torch intra-op threads (0 = torch default); size it when servers share a host")
    p = ap.add_argument_group("model parallelism (one process per rank; KV transfers work across sizes)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="ranks each layer is split over (attention by heads, MLPs by columns)")
    p.add_argument("--pipeline-parallel-size", type=int, default=1, help="stages the layers are split over")
    p.add_argument("--expert-parallel", "--enable-expert-parallel", action="store_true",
                   help="MoE: each tensor-parallel rank holds whole experts instead of a slice of each")
    p.add_argument("--distributed-timeout-s", type=float, default=300.0,
                   help="deadline of worker start-up and of every collective between ranks")


def add_frontend_args(ap: argparse.ArgumentParser) -> None:
    """Flags of the commands that serve the OpenAI API themselves (``serve``, ``router``)."""
    ap.add_argument("--chat-template", help="Jinja chat template (a file, or the template itself) replacing the "
                    "tokenizer's")


def add_address_args(ap: argparse.ArgumentParser, what: str) -> None:
    """``--host`` (bind), ``--advertise-host`` (what others dial) and ``--allow-loopback-advertise``; see
    ``engine.server.advertised_address`` for how they are checked."""
    g = ap.add_argument_group("addresses (see 'Across hosts' in the README)")
    g.add_argument("--host", default="127.0.0.1",
                   help=f"interface {what} bind to; 0.0.0.0: every interface (containers, pods)")
    g.add_argument("--advertise-host", metavar="HOST",
                   help="the address others dial to reach this process (the pod or node IP; with --host 0.0.0.0). "
                   "Default: --host itself, or this host's primary address when --host is 0.0.0.0")
    g.add_argument("--allow-loopback-advertise", action="store_true",
                   help="allow advertising a loopback address while bound to a non-loopback one (every peer "
                   "runs on this host)")


def add_logging_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--log-level", default=envs.log_level(), type=str.upper,
                    choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                    help="debug also prints the traceback of a start-up error")
    ap.add_argument("--log-format", default=envs.log_format(), choices=["text", "json"])


def engine_config(args: argparse.Namespace) -> EngineConfig:
    block_size = args.block_size
    if block_size is None:
        block_size = 16
        if args.executor == "vllm":
            from duet.engine.server.vllm_engine import default_block_size

            block_size = default_block_size(args.device)
    return EngineConfig(
        model=args.model, tokenizer=args.tokenizer, generation_config=args.generation_config, dtype=args.dtype,
        device=args.device, block_size=block_size,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization, max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        enable_prefix_caching=args.enable_prefix_caching, attention_backend=args.attention_backend,
        host_kv_cache_bytes=int(args.host_kv_gib * (1 << 30)),
        seed=args.seed, show_progress=sys.stderr.isatty(), tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size, expert_parallel=args.expert_parallel,
        distributed_timeout_s=args.distributed_timeout_s, load_format=args.load_format,
        cuda_graphs=not (args.no_cuda_graphs or args.enforce_eager), cuda_graph_max_batch=args.cuda_graph_max_batch,
    )


def check_model_files(config: EngineConfig, *, executor: str = "native", tokenizer: bool = True) -> None:
    """Fail before loading anything when a file the command needs is missing or wrong: the model directory,
    its config.json (and, for the native executor, a supported architecture), the tokenizer (``tokenizer``:
    the command tokenizes), the generation config. Errors name the file or field."""
    from pathlib import Path

    from duet.engine.model_config import ModelConfig
    from duet.engine.tokenizer import generation_config_dir, generation_defaults

    model = Path(config.model)
    if not model.is_dir():
        raise FileNotFoundError(f"{config.model}: model directory does not exist")
    if executor == "native":
        ModelConfig.from_pretrained(model)
    elif not (model / "config.json").is_file():
        raise FileNotFoundError(f"{model / 'config.json'}: missing config.json in the model directory")
    if tokenizer:
        tok = Path(config.tokenizer or config.model)
        if not (tok / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{tok / 'tokenizer.json'}: missing tokenizer file"
                                    + ("" if config.tokenizer else " (--tokenizer DIR names another directory)"))
    generation_defaults(generation_config_dir(config.model, config.generation_config))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (ValueError, OSError, LookupError)):
        return text
    return f"{type(exc).__name__}: {text}"


@contextlib.contextmanager
def startup_errors(prog: str, args: argparse.Namespace | None = None):
    """Inside: start a command. An exception becomes one line on stderr naming what is wrong, and exit 2;
    ``--log-level debug`` logs the traceback too."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - the user gets one clear line, not a traceback
        level = str(getattr(args, "log_level", "") or envs.log_level()).upper()
        if level == "DEBUG":
            logger.exception("%s failed to start", prog)
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.time(), "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler()
    if args.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level, handlers=[handler], force=True)


def apply_threads(args: argparse.Namespace) -> None:
    if args.torch_threads > 0:
        import torch

        torch.set_num_threads(args.torch_threads)


def server_parser(role: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of ``duet prefill|decode`` (``server_main``); parse with ``parse_server_args``."""
    prog = prog or f"python -m engine.{role}"
    ap = argparse.ArgumentParser(prog=prog, description=f"Duet {role} server")
    add_engine_args(ap)
    add_logging_args(ap)
    add_address_args(ap, "the command, event, metrics and ZeroMQ KV sockets")
    ap.add_argument("--port", type=int, required=True, help="ZeroMQ command port (0 = random)")
    ap.add_argument("--event-port", type=int, help="ZeroMQ event (PUB) port (default: random)")
    ap.add_argument("--metrics-port", type=int,
                    help="serve this server's Prometheus metrics at http://HOST:PORT/metrics, and GET /health "
                    "(200 while it takes requests, 503 while draining or broken: a readiness probe)")
    ap.add_argument("--kv-transport", default="auto", choices=["auto", "nixl", "zmq"])
    u = ap.add_argument_group("NIXL/UCX (exported to UCX before the NIXL agent starts; see 'Across hosts' in "
                              "the README)")
    u.add_argument("--ucx-tls", default=envs.ucx_tls(), metavar="LIST",
                   help="UCX transports NIXL may use (UCX_TLS): between hosts 'rc' (InfiniBand/RoCE) or 'tcp', "
                   "plus 'cuda_copy,cuda_ipc' for GPU memory; default: $DUET_UCX_TLS, else UCX's own choice")
    u.add_argument("--ucx-net-devices", default=envs.ucx_net_devices(), metavar="LIST",
                   help="UCX devices NIXL may use (UCX_NET_DEVICES), e.g. 'eth0' or 'mlx5_0:1'; default: "
                   "$DUET_UCX_NET_DEVICES, else every device UCX finds")
    ap.add_argument("--zone")
    ap.add_argument("--staging-mib", type=int, default=64, help="registered staging memory for KV slabs")
    ap.add_argument("--kv-timeout-s", type=float, default=30.0, help="how long KV may take to arrive")
    ap.add_argument("--kv-failure-policy", default="recompute", choices=["recompute", "fail"],
                    help="when KV does not arrive: prefill locally (recompute) or fail the request")
    ap.add_argument("--heartbeat-s", type=float, default=0.2, help="load report / heartbeat period")
    ap.add_argument("--router", help="register with this router at run time (its --registry-port)")
    ap.add_argument("--drain-timeout-s", type=float, default=30.0,
                    help="on SIGTERM: stop admitting, finish in-flight requests for up to this long, exit")
    ap.add_argument("--zmq-keys", help="CURVE key directory (python -m engine.tools.keys DIR): authenticate and "
                    "encrypt every ZeroMQ socket")
    ap.add_argument("--debug-layer-delay-s", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--debug-step-delay-s", type=float, default=0.0, help=argparse.SUPPRESS)
    return ap


def parse_server_args(role: str, argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """``duet prefill|decode``'s arguments, checked as the command checks them (exit 2 on a bad one)."""
    ap = server_parser(role, prog)
    args = ap.parse_args(argv)
    resolve_model_args(ap, args)
    return args


def server_main(role: str, argv: list[str] | None = None, prog: str | None = None) -> None:
    """``duet prefill|decode`` (``python -m engine.prefill`` / ``engine.decode``): one engine behind ZeroMQ."""
    prog = prog or f"python -m engine.{role}"
    args = parse_server_args(role, argv, prog)
    setup_logging(args)
    with startup_errors(prog, args):
        sconfig = server_config(role, args)  # addresses first: a wrong one fails before anything loads
        config = engine_config(args)
        check_model_files(config, executor=args.executor, tokenizer=False)
        apply_threads(args)
        from duet.engine.server.server import make_server

        server = make_server(config, sconfig)
        exporter = None
        if args.metrics_port is not None:
            from duet.engine.metrics.server_exporter import ServerMetricsExporter

            exporter = ServerMetricsExporter(server.stats, model_name=args.served_model_name, role=role,
                                             engine_id=server.engine_id, host=args.host, port=args.metrics_port,
                                             ready=server.ready)
            try:
                exporter.start()
            except OSError:
                server.close()
                raise
    print(f"DUET_READY {role} {server.address} {server.event_address}", flush=True)
    try:
        server.serve_forever()
    finally:
        if exporter is not None:
            exporter.close()


def server_config(role: str, args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        role=role, host=args.host, advertise_host=args.advertise_host,
        allow_loopback_advertise=args.allow_loopback_advertise, port=args.port, event_port=args.event_port or 0,
        executor=args.executor, ucx_tls=args.ucx_tls, ucx_net_devices=args.ucx_net_devices,
        kv_transport=args.kv_transport, zone=args.zone, staging_bytes=args.staging_mib << 20,
        kv_timeout_s=args.kv_timeout_s, kv_failure_policy=args.kv_failure_policy, heartbeat_s=args.heartbeat_s,
        router_address=args.router, drain_timeout_s=args.drain_timeout_s,
        model_name=args.served_model_name or args.model, zmq_keys_dir=args.zmq_keys,
        debug_layer_delay_s=args.debug_layer_delay_s, debug_step_delay_s=args.debug_step_delay_s)
