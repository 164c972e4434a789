"""Command-line flags shared by ``engine.prefill``, ``engine.decode``, ``engine.serve`` (and the router)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from engine import envs
from engine.config import EngineConfig
from engine.server.server_config import ServerConfig


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("engine")
    g.add_argument("--model", required=True, help="Hugging Face model directory")
    g.add_argument("--served-model-name", help="name in the OpenAI API (default: the model path)")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--device", default="auto")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int)
    g.add_argument("--kv-cache-memory-bytes", type=int)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-num-seqs", type=int, default=128)
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "torch"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights at the checkpoint's shapes (benchmarks; no safetensors needed)")
    g.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly on CUDA")
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
    p.add_argument("--expert-parallel", action="store_true",
                   help="MoE: each tensor-parallel rank holds whole experts instead of a slice of each")
    p.add_argument("--distributed-timeout-s", type=float, default=300.0,
                   help="deadline of worker start-up and of every collective between ranks")


def add_logging_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--log-level", default=envs.log_level())
    ap.add_argument("--log-format", default=envs.log_format(), choices=["text", "json"])


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization, max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching, attention_backend=args.attention_backend,
        seed=args.seed, show_progress=sys.stderr.isatty(), tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size, expert_parallel=args.expert_parallel,
        distributed_timeout_s=args.distributed_timeout_s, load_format=args.load_format,
        cuda_graphs=not args.no_cuda_graphs, cuda_graph_max_batch=args.cuda_graph_max_batch,
    )


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


def server_main(role: str, argv: list[str] | None = None) -> None:
    """``python -m engine.prefill`` / ``engine.decode``: one engine behind ZeroMQ."""
    ap = argparse.ArgumentParser(prog=f"python -m engine.{role}", description=f"Duet {role} server")
    add_engine_args(ap)
    add_logging_args(ap)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True, help="ZeroMQ command port (0 = random)")
    ap.add_argument("--event-port", type=int, help="ZeroMQ event (PUB) port (default: random)")
    ap.add_argument("--kv-transport", default="auto", choices=["auto", "nixl", "zmq"])
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
    args = ap.parse_args(argv)
    setup_logging(args)
    apply_threads(args)
    from engine.server.server import make_server

    server = make_server(engine_config(args), server_config(role, args))
    print(f"DUET_READY {role} {server.address} {server.event_address}", flush=True)
    server.serve_forever()


def server_config(role: str, args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        role=role, host=args.host, port=args.port, event_port=args.event_port or 0, executor=args.executor,
        kv_transport=args.kv_transport, zone=args.zone, staging_bytes=args.staging_mib << 20,
        kv_timeout_s=args.kv_timeout_s, kv_failure_policy=args.kv_failure_policy, heartbeat_s=args.heartbeat_s,
        router_address=args.router, drain_timeout_s=args.drain_timeout_s,
        model_name=args.served_model_name or args.model, zmq_keys_dir=args.zmq_keys,
        debug_layer_delay_s=args.debug_layer_delay_s, debug_step_delay_s=args.debug_step_delay_s)
