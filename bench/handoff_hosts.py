"""KV hand-off across hosts vs on one host, in one run.

    python -m bench.handoff_hosts [--quick] [--kv-transports nixl,zmq] [--prompt-lens 256,1024,4096] [--record]

For each KV transport, two prefill + decode + router clusters of the same checkpoint run side by side: one on
this host (every process on 127.0.0.1: UCX may pick shared memory or cross-memory attach) and one across
virtual hosts (``engine.tools.virtual_hosts``: router, prefill and decode each in its own network, IPC, mount
and PID namespaces, on a veth bridge: UCX can only use TCP). The same prompts go to both, one request at a
time, the order of the two setups alternating per repeat, so load drift on a shared machine hits both alike.

Per request, from the stage traces of the router and both servers (``--debug-traces``; one machine, one
clock):

- ``handoff_ms``: decode's ``kv_complete`` - prefill's ``last_layer_sent``: the part of the transfer not hidden
  behind the prefill's compute (the last layer, the first token, the notification);
- ``layer_ms``: per layer, decode's ``kv_layer_<i>_received`` - prefill's ``layer_<i>_sent``, averaged: what one
  layer's WRITE takes to land (the prefill side stamps ``sent`` after the post returns, so a copy done inside
  the post, as cross-memory attach does, can read slightly negative);
- ``kv_stream_ms``: decode's ``kv_complete`` - prefill's ``layer_0_sent``: the whole layer-wise stream;
- ``ttft_ms``: the router's ``first_token`` - ``received``.

Medians per (transport, prompt length, setup). The UCX transport NIXL used is read from the prefill server's
``UCX_PROTO_INFO`` tables (e.g. ``tcp/eth0`` across hosts, ``cma/memory`` on one host). Needs root for the
namespaces. Results land in ``bench/runs/cpu/handoff_hosts.*`` (``--record``: ``bench/results/cpu/``).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import urllib.request
from pathlib import Path

from duet.bench.report import add_record_arg, write_results
from duet.engine.launcher import ServerProcess
from duet.engine.tools.make_tiny_model import make_tiny_model
from duet.engine.tools.virtual_hosts import VirtualNetwork, unavailable
from duet.transfer.factory import nixl_importable

MODEL = dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=512,
             max_position_embeddings=8192)  # fp32 KV: 4 KiB per token
SERVER_FLAGS = ("--num-kv-blocks", "1200", "--max-num-batched-tokens", "4096", "--staging-mib", "128")
ROUTER_FLAGS = ("--disagg-threshold-tokens", "0", "--debug-traces", "--heartbeat-s", "0.5")
# UCX_PROTO_INFO's table for a put to a peer: "| <agent> inter-node cfg#1 |", "| remote memory write by ucp_put* ...|",
# a rule, the column titles, a rule, then "| 0..inf | zero-copy | tcp/eth0 |" (the transport/device in use).
_PUT_TABLE = re.compile(r"\| (\S+) (intra-node|inter-node) cfg#\d+ +\|\n.*\| remote memory write by ucp_put\*.*\n"
                        r"(?:.*\n){3}.*\|\s*\S+\s*\|[^|]*\|\s*(\S+)\s*\|", re.M)


class Setup:
    """One prefill, one decode and one router: on this host, or each on a virtual host of ``net``."""

    def __init__(self, name: str, model: str, transport: str, net: VirtualNetwork | None):
        self.name, self.net = name, net
        env = {"UCX_PROTO_INFO": "y", "OMP_WAIT_POLICY": "PASSIVE", "DUET_LOG_LEVEL": "INFO"}
        if net is None:
            start = ServerProcess
            where = {"p": {}, "d": {}, "router": {}}
        else:
            def start(module, model_, *args, **kw):
                host = net[kw.pop("host_name")]
                return host.server(module, model_, "--host", "0.0.0.0", "--advertise-host", host.ip, *args, **kw)
            where = {name: {"host_name": name} for name in ("p", "d", "router")}
        kv = ("--kv-transport", transport)
        self.p = start("prefill", model, *kv, *SERVER_FLAGS, env=env, **where["p"])
        info = {"DUET_LOG_LEVEL": "INFO"}
        self.d = start("decode", model, *kv, *SERVER_FLAGS, env=info, **where["d"])
        self.router = start("router", model, "--prefill", self.p.address, "--decode", self.d.address, *ROUTER_FLAGS,
                            env=info, **where["router"])

    def call(self, fn, *args):
        return fn(*args) if self.net is None else self.net["client"].call(fn, *args)

    def request(self, prompt: list[int]) -> dict[str, float]:
        """One greedy completion; its stage times (ms) from the traces."""
        url = self.router.url

        def run() -> dict:
            body = json.dumps({"prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True}).encode()
            req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
            rid = json.loads(urllib.request.urlopen(req, timeout=120).read())["id"]
            return json.loads(urllib.request.urlopen(f"{url}/debug/requests/{rid}", timeout=60).read())["stages"]

        stages = self.call(run)
        router, p, d = stages["router"], stages[self.p.address], stages[self.d.address]
        layers = [i for i in range(MODEL["num_layers"]) if f"layer_{i}_sent" in p and f"kv_layer_{i}_received" in d]
        return {"handoff_ms": (d["kv_complete"] - p["last_layer_sent"]) * 1e3,
                "layer_ms": statistics.mean(d[f"kv_layer_{i}_received"] - p[f"layer_{i}_sent"] for i in layers) * 1e3,
                "kv_stream_ms": (d["kv_complete"] - p["layer_0_sent"]) * 1e3,
                "ttft_ms": (router["first_token"] - router["received"]) * 1e3}

    def ucx_transport(self) -> str:
        """What UCX chose for the prefill server's KV writes (``UCX_PROTO_INFO``)."""
        found = sorted({f"{m.group(3)} ({m.group(2)})" for m in _PUT_TABLE.finditer(self.p.output())})
        return ", ".join(found) or "-"

    def stop(self) -> None:
        for proc in (self.router, self.p, self.d):
            proc.stop()


def run_transport(transport: str, model: str, prompt_lens: list[int], repeats: int) -> list[dict]:
    with VirtualNetwork(["client", "router", "p", "d"]) as net:
        setups = [Setup("one host", model, transport, None), Setup("across hosts", model, transport, net)]
        try:
            for s in setups:
                s.router.wait_ready(600)
            samples: dict[tuple[str, int], list[dict]] = {}
            for i in range(repeats + 1):  # the first round warms both up and is dropped
                for n in prompt_lens:
                    prompt = [5 + (i * 131 + n + j * 7) % 400 for j in range(n)]  # new per round: no prefix hits
                    for s in (setups if i % 2 == 0 else setups[::-1]):
                        times = s.request(prompt)
                        if i > 0:
                            samples.setdefault((s.name, n), []).append(times)
            rows = []
            for n in prompt_lens:
                for s in setups:
                    got = samples[(s.name, n)]
                    row = {"transport": transport, "prompt_len": n, "setup": s.name, "requests": len(got)}
                    for key in ("handoff_ms", "layer_ms", "kv_stream_ms", "ttft_ms"):
                        row[key.replace("_ms", "_p50_ms")] = statistics.median(t[key] for t in got)
                    row["handoff_min_ms"] = min(t["handoff_ms"] for t in got)
                    row["kv_mib"] = n * 4 * 1024 / 2**20
                    row["ucx"] = s.ucx_transport() if transport == "nixl" else "zmq over tcp"
                    rows.append(row)
            return rows
        finally:
            for s in setups:
                s.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two prompt lengths, 3 repeats")
    ap.add_argument("--kv-transports", default="nixl,zmq" if nixl_importable() else "zmq")
    ap.add_argument("--prompt-lens", default="256,1024,4096")
    ap.add_argument("--repeats", type=int, default=8)
    add_record_arg(ap)
    args = ap.parse_args(argv)
    why = unavailable()
    if why is not None:
        raise SystemExit(f"bench.handoff_hosts needs network namespaces: {why}")
    prompt_lens = [256, 1024] if args.quick else [int(n) for n in args.prompt_lens.split(",")]
    repeats = 3 if args.quick else args.repeats
    model = str(make_tiny_model("llama", Path(tempfile.mkdtemp(prefix="duet-bench-")) / "model", **MODEL))
    rows = [r for t in args.kv_transports.split(",") for r in run_transport(t, model, prompt_lens, repeats)]
    columns = ["transport", "prompt_len", "kv_mib", "setup", "requests", "handoff_p50_ms", "handoff_min_ms",
               "layer_p50_ms", "kv_stream_p50_ms", "ttft_p50_ms", "ucx"]
    write_results("handoff_hosts", rows, columns, device="cpu", record=args.record, plot=lambda ax: plot(ax, rows),
                  extra={"model": MODEL, "repeats": repeats, "order": "alternating per repeat"})


def plot(ax, rows: list[dict]) -> None:
    """Hand-off p50 per (transport, prompt length): one host beside across hosts."""
    cases = sorted({(r["transport"], r["prompt_len"]) for r in rows})
    for offset, setup in ((-0.2, "one host"), (0.2, "across hosts")):
        by_case = {(r["transport"], r["prompt_len"]): r["handoff_p50_ms"] for r in rows if r["setup"] == setup}
        ax.bar([i + offset for i in range(len(cases))], [by_case.get(c, 0) for c in cases], 0.4, label=setup)
    ax.set_xticks(range(len(cases)), [f"{t}\n{n} tok" for t, n in cases], fontsize=8)
    ax.set_ylabel("hand-off p50 (ms)")
    ax.legend(fontsize=8)


if __name__ == "__main__":
    main()
