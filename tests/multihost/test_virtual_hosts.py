"""The harness itself: virtual hosts share no loopback, shared memory or PID space; a link goes down and comes
back; nothing is left behind."""
from __future__ import annotations

import os
import socket
import subprocess

import pytest

from duet.engine.tools import virtual_hosts
from duet.engine.tools.virtual_hosts import VirtualNetwork, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None,
                                reason=f"multi-host tests need network namespaces: {unavailable()}")

SHOW = ("import os, socket, pathlib; pathlib.Path('/dev/shm/duet-probe').touch(); "
        "print(socket.gethostname(), os.getpid(), sorted(os.listdir('/dev/shm')))")


def run_on(host, code: str) -> str:
    out = subprocess.run([*host.wrap(), "python3", "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def listen(port: int, host: str = "0.0.0.0") -> socket.socket:
    s = socket.socket()
    s.bind((host, port))
    s.listen()
    return s


def reachable(ip: str, port: int) -> bool:
    try:
        socket.create_connection((ip, port), timeout=1.5).close()
        return True
    except OSError:
        return False


def test_hosts_share_no_loopback_memory_or_pids_and_links_partition():
    with VirtualNetwork(["a", "b"]) as net:
        a, b = net["a"], net["b"]
        # Own hostname, own PID namespace (a few PIDs in: the shell is 1, its set-up commands next), own /dev/shm.
        for host in (a, b):
            name, pid, shm = run_on(host, SHOW).split(" ", 2)
            assert name == host.netns and 1 < int(pid) < 10 and shm == "['duet-probe']"
        assert not os.path.exists("/dev/shm/duet-probe")

        servers = [b.call(listen, 7700, "127.0.0.1"), b.call(listen, 7701)]
        assert b.call(reachable, "127.0.0.1", 7700)
        assert not a.call(reachable, "127.0.0.1", 7700)  # a's loopback is not b's
        assert a.call(reachable, b.ip, 7701)
        rx, tx = a.link_bytes()
        assert rx > 0 and tx > 0
        b.link_down()
        assert not a.call(reachable, b.ip, 7701)
        b.link_up()
        assert a.call(lambda: any(reachable(b.ip, 7701) for _ in range(10)))
        for s in servers:
            s.close()
        names = [h.netns for h in (a, b)] + [net.switch]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)


def test_unavailable_says_why(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in virtual_hosts.unavailable.__wrapped__()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(virtual_hosts.shutil, "which", lambda tool: None if tool == "unshare" else "/usr/sbin/ip")
    assert virtual_hosts.unavailable.__wrapped__() == "'unshare' is not installed"
