"""A Duet cluster on virtual hosts (``engine.tools.virtual_hosts``): the router, two prefill and two decode
servers, each on its own host, plus a client host the test talks through.

Every server binds ``0.0.0.0`` and advertises its host's IP (``--advertise-host``), as a pod would; every
ZeroMQ socket carries CURVE keys. The test process reaches the cluster only from the client host (an HTTP
client and raw DEALERs on a thread inside that host's network namespace), so nothing passes through loopback.
"""
from __future__ import annotations

import asyncio
import re
import urllib.request
from dataclasses import asdict

from duet.engine import LLM, SamplingParams
from duet.engine.launcher import query_server
from duet.engine.protocol import StatsRequest
from duet.engine.tools.virtual_hosts import HostProcess, VirtualNetwork
from tests.serving.test_faults import stream, wait_until
from duet.transfer.curve import load_keys, make_keys

HOSTS = ["client", "router", "p1", "p2", "d1", "d2"]
# Server heartbeats every 0.2 s; the router declares a server dead after 3 missed 0.6 s periods (1.8 s), which
# a loaded 2-core CI machine does not trip by accident. Leases outlast every partition here: a lease lapse is
# another test's subject, and must not end the requests a partition test follows.
ROUTER_ARGS = ("--disagg-threshold-tokens", "0", "--heartbeat-s", "0.6", "--lease-ttl-s", "20",
               "--kv-timeout-s", "10", "--connect-timeout-s", "240")
REGISTRY_PORT = 7100
LEAK_FIELDS = ("free_blocks", "total_blocks", "running", "waiting", "open_requests", "open_transfers")


class Cluster:
    def __init__(self, model: str, keys_dir, *, transport: str, server_args: tuple[str, ...] = (),
                 host_args: dict[str, tuple[str, ...]] | None = None, registered: tuple[str, ...] = ()):
        """``server_args``: flags of all four servers; ``host_args``: more flags per host (``--zone``, say: a
        request with ``X-Duet-Zone`` then goes to that zone's servers only); ``registered``: servers that are
        not listed on the router's command line but register with its registry (``--router``), as pods do."""
        make_keys(keys_dir)
        self.model, self.keys_dir, self.keys = model, str(keys_dir), load_keys(keys_dir)
        self.net = VirtualNetwork(HOSTS)
        self.client = self.net["client"]
        host_args = host_args or {}
        registry = f"tcp://{self.net['router'].ip}:{REGISTRY_PORT}"
        try:
            self.servers: dict[str, HostProcess] = {}
            for name in ("p1", "p2", "d1", "d2"):
                role = "prefill" if name.startswith("p") else "decode"
                register = ("--router", registry) if name in registered else ()
                self.servers[name] = self._start(name, role, "--kv-transport", transport, "--num-kv-blocks", "400",
                                                 *register, *server_args, *host_args.get(name, ()))
            listed = {role: [self.servers[n].address for n in names if n not in registered]
                      for role, names in (("--prefill", ("p1", "p2")), ("--decode", ("d1", "d2")))}
            self.router = self._start("router", "router", *[a for role, addrs in listed.items() if addrs
                                                             for a in (role, *addrs)],
                                      *(("--registry-port", str(REGISTRY_PORT)) if registered else ()), *ROUTER_ARGS)
            self.router.wait_ready(240)
            for name in registered:
                wait_until(lambda: self.router_metric("duet_router_server_healthy",
                                                      server=self.servers[name].address) == 1, 120,
                           f"{name} to register with the router")
        except BaseException:
            self.close()
            raise

    def _start(self, host: str, module: str, *args: str) -> HostProcess:
        h = self.net[host]
        return h.server(module, self.model, "--host", "0.0.0.0", "--advertise-host", h.ip, "--zmq-keys",
                        self.keys_dir, *args)

    def __getitem__(self, name: str) -> HostProcess:
        return self.router if name == "router" else self.servers[name]

    def close(self) -> None:
        self.net.close()

    # ---- talking to the cluster from the client host ----------------------------------------------------
    def query(self, proc: HostProcess, messages: list, want: int, timeout_s: float = 20.0, keys="cluster") -> list:
        """``query_server`` from the client host (``keys=None``: as a process without the cluster's keys)."""
        keys = self.keys if keys == "cluster" else keys

        def run():
            import zmq

            ctx = zmq.Context()  # its I/O thread starts here, in the client host's network namespace
            try:
                return query_server(proc.address, messages, want, timeout_s, keys=keys, ctx=ctx)
            finally:
                ctx.destroy(linger=0)

        return self.client.call(run, timeout_s=timeout_s + 30)

    def stats(self, name: str) -> dict[str, float]:
        [s] = self.query(self[name], [StatsRequest(1)], 1)
        return asdict(s.values)

    def stream(self, prompt: list[int], max_tokens: int, on_token=None, zone: str | None = None):
        """(status, token strings, error) of a greedy streamed completion through the router."""
        return self.submit_stream(prompt, max_tokens, on_token, zone).result(300)

    def submit_stream(self, prompt: list[int], max_tokens: int, on_token=None, zone: str | None = None):
        """``stream`` started on the client host: its future."""
        headers = {"X-Duet-Zone": zone} if zone else None
        return self.client.submit(lambda: asyncio.run(stream(self.router.url, prompt, max_tokens, on_token, headers)))

    def router_metric(self, name: str, **labels: str) -> float:
        """The sum of a router metric's samples whose labels include ``labels``."""
        text = self.client.call(lambda: urllib.request.urlopen(self.router.url + "/metrics", timeout=30).read())
        total = 0.0
        for m in re.finditer(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", text.decode(), re.M):
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def leaks(self, *names: str) -> dict[str, dict[str, float]]:
        """The servers among ``names`` (default: all four) that still hold a block, a request or a transfer."""
        out = {}
        for name in names or tuple(self.servers):
            s = self.stats(name)
            if s["free_blocks"] != s["total_blocks"] or any(s[k] for k in LEAK_FIELDS[2:]):
                out[name] = {k: s[k] for k in LEAK_FIELDS}
        return out


class Reference:
    """Greedy tokens of the colocated engine (``engine.LLM`` on the same checkpoint), as token strings."""

    def __init__(self, model: str):
        self.llm = LLM(model, show_progress=False, num_kv_blocks=600)

    def tokens(self, prompt: list[int], max_tokens: int) -> list[str]:
        out = self.llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                                         logprobs=0))[0]
        tok = self.llm.tokenizer
        return [tok.convert_tokens_to_string([tok.convert_ids_to_tokens(t)]) for t in out.token_ids]


def prompt_of(num_tokens: int, seed: int = 0) -> list[int]:
    return [5 + (i * 7 + seed * 13) % 400 for i in range(num_tokens)]
