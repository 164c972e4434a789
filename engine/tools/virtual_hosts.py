"""Several "hosts" on one Linux machine, for multi-host tests and benchmarks: each a network namespace with its
own IP on a private bridge, and, for every process started on it, its own IPC, mount, PID and UTS namespaces.

So no two hosts share loopback, SysV or POSIX shared memory (each gets a private ``/dev/shm``), or a PID space
(UCX's cross-memory-attach and shared-memory transports then see a peer on another node and use TCP, as
between real machines); they share only the file system (the model directory, logs), like hosts on NFS.
Processes on a host are started with ``VirtualHost.server`` (an ``engine.launcher.ServerProcess`` whose command
runs under ``ip netns exec NS unshare ...``); the calling process talks to a host through ``VirtualHost.call``,
which runs a function on a thread that has entered the host's network namespace (sockets it opens live there).

    with VirtualNetwork(["client", "router", "p1", "d1"]) as net:
        d = net["d1"].server("decode", model, "--host", "0.0.0.0", "--advertise-host", net["d1"].ip)
        ...
        net["d1"].link_down()   # a partition: the process lives on, unreachable; link_up() heals it

The network: a switch namespace holding a bridge, and one veth pair per host (``eth0`` inside the host, a port
on the bridge). Nothing is created in the calling process's own namespace: its interfaces and routes are never
touched. Every name carries a random token, so concurrent runs never collide, and ``close`` (also at exit)
kills every process left in the namespaces and deletes them, which removes the veth pairs and the bridge too.

Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN), ``ip`` (iproute2) and ``unshare`` (util-linux); ``unavailable()``
says why not, for a test to skip with.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import functools
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from typing import Callable, TypeVar

from duet.engine.launcher import ServerProcess

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
COMMAND_TIMEOUT_S = 20.0
MAX_CALLERS = 4  # threads per host for ``call``: a stream and the queries a test makes while it runs
# Per process: new IPC, mount, PID and UTS namespaces; a private /dev/shm and hostname; the server runs as a
# child of the shell (PID 1 of the namespace), so it keeps ordinary signal handling.
_SHELL = 'mount -t tmpfs -o size=1g,mode=1777 tmpfs /dev/shm || exit 97; hostname "$0" || exit 98; "$@" & wait $!'


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=check)


@functools.lru_cache(maxsize=1)
def unavailable() -> str | None:
    """None when this machine can build virtual hosts; else why not (a test skips with it)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed"
    probe = f"duetprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return f"'ip netns add' is not permitted here: {getattr(e, 'stderr', '') or e}".strip()
    try:
        _ip("-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0")
        subprocess.run(["ip", "netns", "exec", probe, "unshare", "--ipc", "--mount", "--pid", "--fork", "--uts",
                        "--mount-proc", "--propagation", "private", "sh", "-c", _SHELL, "probe", "true"],
                       capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=True)
    except subprocess.CalledProcessError as e:
        return f"namespaces are not permitted here: {' '.join(e.cmd[:4])}...: {e.stderr.strip()}"
    except subprocess.TimeoutExpired:
        return "creating namespaces timed out"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class VirtualHost:
    """One host: a network namespace with ``eth0`` at ``ip`` on the network's bridge."""

    def __init__(self, network: "VirtualNetwork", name: str, ip: str, port: str):
        self.network, self.name, self.ip = network, name, ip
        self.netns = f"{network.token}-{name}"
        self.switch_port = port
        """The bridge's end of this host's link (in the switch namespace)."""
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # its threads live in ``netns``
        self.processes: list[HostProcess] = []

    # ---- processes ----------------------------------------------------------------------------------------
    def wrap(self) -> tuple[str, ...]:
        """The command prefix that runs a program on this host (its own namespaces; see the module docstring)."""
        return ("ip", "netns", "exec", self.netns, "unshare", "--ipc", "--mount", "--pid", "--fork", "--uts",
                "--mount-proc", "--propagation", "private", "sh", "-c", _SHELL, self.netns)

    def server(self, module: str, model: str, *args: str, **kwargs) -> "HostProcess":
        """``python -m engine.<module>`` on this host (``ServerProcess``'s arguments); its ``address`` / ``url``
        are on this host's IP."""
        proc = HostProcess(module, model, *args, host=self.ip, wrap=self.wrap(), **kwargs)
        self.processes.append(proc)
        return proc

    def submit(self, fn: Callable[..., T], *args, **kwargs) -> concurrent.futures.Future[T]:
        """Run ``fn(*args, **kwargs)`` on a thread inside this host's network namespace (a small pool per host):
        sockets it opens, and threads it starts, are on this host's network."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(MAX_CALLERS, f"host-{self.name}", self._enter)
        return self._pool.submit(fn, *args, **kwargs)

    def call(self, fn: Callable[..., T], *args, timeout_s: float = 300.0, **kwargs) -> T:
        """``submit`` and wait: fn's result (or its exception)."""
        return self.submit(fn, *args, **kwargs).result(timeout_s)

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/var/run/netns/{self.netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({self.netns}): {os.strerror(err)}")
        finally:
            os.close(fd)

    # ---- the link -----------------------------------------------------------------------------------------
    def link_down(self) -> None:
        """Partition this host: its link to the bridge goes down. Its processes live on, unreachable; packets to
        and from it are dropped (TCP connections stall, they are not reset)."""
        _ip("-n", self.network.switch, "link", "set", self.switch_port, "down")

    def link_up(self) -> None:
        """Heal the partition."""
        _ip("-n", self.network.switch, "link", "set", self.switch_port, "up")

    def link_bytes(self) -> tuple[int, int]:
        """(received, sent) bytes on this host's ``eth0``: what crossed the network, whatever carried it."""
        out = _ip("-n", self.netns, "-j", "-s", "link", "show", "eth0").stdout
        stats = json.loads(out)[0]["stats64"]
        return stats["rx"]["bytes"], stats["tx"]["bytes"]

    def close(self) -> None:
        for proc in self.processes:
            proc.stop(timeout_s=5)
        self.close_pool()

    def close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class HostProcess(ServerProcess):
    """A ``ServerProcess`` under a host's namespaces: ``ip netns exec`` execs ``unshare``, which forks the
    namespace's PID 1 (a shell), whose child is the server. Signals go to the server; ``kill`` SIGKILLs the
    namespace's PID 1, which takes every process of the namespace with it."""

    def _children(self, pid: int) -> list[int]:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                return [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            return []

    def _is_server(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f"duet.engine.{self.role}".encode() in f.read()
        except (FileNotFoundError, ProcessLookupError):
            return False

    @property
    def pid(self) -> int:
        deadline = time.monotonic() + 10
        while True:
            for init in self._children(self.proc.pid):
                for child in self._children(init):  # the server, once the shell's set-up commands are done
                    if self._is_server(child):
                        return child
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise ProcessLookupError(f"{self.role}: no server process under pid {self.proc.pid}")
            time.sleep(0.02)

    def kill(self) -> None:
        for init in self._children(self.proc.pid):
            try:
                os.kill(init, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.kill()


class VirtualNetwork:
    """Hosts named ``names`` on one bridge, at consecutive addresses of ``subnet`` (from .1). A context manager;
    ``close`` tears everything down (also at interpreter exit, if the caller never got to it)."""

    def __init__(self, names: list[str], subnet: str = "10.213.7.0/24"):
        why = unavailable()
        if why is not None:
            raise RuntimeError(f"virtual hosts are unavailable: {why}")
        self.token = f"duet{secrets.token_hex(3)}"
        self.switch = f"{self.token}-sw"
        self.hosts: dict[str, VirtualHost] = {}
        self._closed = False
        atexit.register(self.close)
        net = ipaddress.ip_network(subnet)
        if len(names) > net.num_addresses - 2:
            raise ValueError(f"{len(names)} hosts do not fit in {subnet}")
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, name in enumerate(names):
                host = VirtualHost(self, name, str(net.network_address + i + 1), f"port{i}")
                _ip("netns", "add", host.netns)
                self.hosts[name] = host
                # Both ends are created right in their namespaces: nothing appears in the caller's namespace.
                _ip("-n", self.switch, "link", "add", host.switch_port, "type", "veth", "peer", "name", "eth0",
                    "netns", host.netns)
                _ip("-n", self.switch, "link", "set", host.switch_port, "master", "br0", "up")
                _ip("-n", host.netns, "addr", "add", f"{host.ip}/{net.prefixlen}", "dev", "eth0")
                _ip("-n", host.netns, "link", "set", "eth0", "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> VirtualHost:
        return self.hosts[name]

    def __enter__(self) -> "VirtualNetwork":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL), kill whatever is left in the namespaces, delete them."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        procs = [p for host in self.hosts.values() for p in host.processes]
        for proc in procs:  # SIGTERM all at once: they drain in parallel
            try:
                if proc.proc.poll() is None:
                    os.kill(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, OSError):
                pass
        deadline = time.monotonic() + 5
        for proc in procs:
            try:
                proc.stop(timeout_s=max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - tear down the rest regardless
                pass
        for host in self.hosts.values():
            host.close_pool()
        for netns in [h.netns for h in self.hosts.values()] + [self.switch]:
            pids = _ip("netns", "pids", netns, check=False).stdout.split()
            for pid in pids:  # only processes inside our own namespaces
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", netns, check=False)
