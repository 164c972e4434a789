"""``duet``: the command line. ``duet serve MODEL``, ``duet prefill``, ``duet decode``, ``duet router``,
``duet bench NAME``.

Each subcommand is the matching module's own command line (``python -m engine.serve`` and so on, which keep
working): this module only picks it and passes the remaining arguments on, under the program name
``duet <subcommand>``. ``setup.py``'s ``entry_points`` installs it as the ``duet`` console script.
"""
from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "attention": "duet.bench.attention", "kv_pack": "duet.bench.kv_pack", "transfer": "duet.bench.transfer",
    "engine_throughput": "duet.bench.engine_throughput", "pd_vs_colocated": "duet.bench.pd_vs_colocated",
    "serving": "duet.bench.serving", "router_sim": "duet.bench.router_sim", "vllm_peer": "duet.bench.vllm_peer",
    "decode_roofline": "duet.bench.decode_roofline", "handoff_hosts": "duet.bench.handoff_hosts",
    "kv_tier": "duet.bench.kv_tier",
}

USAGE = """usage: duet <command> [arguments]

commands:
  serve MODEL     OpenAI-compatible server: colocated (--role both, default) or one role (--role prefill|decode)
  prefill MODEL   prefill server (ZeroMQ; --port); streams KV to decode servers
  decode MODEL    decode server (ZeroMQ; --port); receives KV, generates tokens
  router MODEL    OpenAI HTTP router in front of prefill and decode servers (--prefill, --decode)
  bench NAME      a benchmark: {benchmarks}

'duet <command> --help' lists a command's flags. MODEL is served under the id given (not its basename).
"""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("duet")
    except Exception:  # noqa: BLE001 - not installed (a source checkout)
        return "unknown (not installed)"


def parse_command(argv: list[str]) -> tuple[str, argparse.Namespace]:
    """``duet prefill|decode|router ARGS`` parsed exactly as that command parses them, starting nothing: how
    deployment manifests are checked against the CLI (``tests/deploy``). Exits 2 on a bad flag, as the command."""
    if not argv or argv[0] not in ("prefill", "decode", "router"):
        raise ValueError(f"not a server command: {argv[:1]} (prefill, decode or router)")
    command, rest = argv[0], argv[1:]
    if command == "router":
        from duet.engine.router.__main__ import parse_args

        return command, parse_args(rest, prog=f"duet {command}")
    from duet.engine.server.cli import parse_server_args

    return command, parse_server_args(command, rest, prog=f"duet {command}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = USAGE.format(benchmarks=", ".join(BENCHMARKS))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage, end="")
        return
    if argv[0] in ("-V", "--version"):
        print(f"duet {_version()}")
        return
    command, rest = argv[0], argv[1:]
    prog = f"duet {command}"
    if command == "serve":
        from duet.engine.serve import main as serve_main

        serve_main(rest, prog=prog)
    elif command in ("prefill", "decode"):
        from duet.engine.server.cli import server_main

        server_main(command, rest, prog=prog)
    elif command == "router":
        from duet.engine.router.__main__ import main as router_main

        router_main(rest, prog=prog)
    elif command == "bench":
        if not rest or rest[0] not in BENCHMARKS:
            names = ", ".join(BENCHMARKS)
            got = f"unknown benchmark {rest[0]!r}; " if rest and not rest[0].startswith("-") else ""
            print(f"usage: duet bench NAME [arguments]\nduet bench: error: {got}NAME is one of: {names}",
                  file=sys.stderr)
            raise SystemExit(2)
        sys.argv = [f"duet bench {rest[0]}", *rest[1:]]  # argparse's prog for the benchmark's own --help
        importlib.import_module(BENCHMARKS[rest[0]]).main(rest[1:])
    else:
        print(usage, end="", file=sys.stderr)
        print(f"duet: error: unknown command {command!r}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
