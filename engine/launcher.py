"""Start Duet server processes on this host and stop them: used by the demo, tests and benchmarks.

Each process prints ``DUET_READY`` once it serves; ``ServerProcess.wait_ready`` waits for that line.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One ``python -m engine.<module>`` process on a free port.

    ``address``: the ZeroMQ command socket (prefill / decode); ``url``: the HTTP base (router, serve); both on
    ``host`` (what clients dial). ``wrap``: a command prefix the process runs under (``ip netns exec NS ...``:
    another network namespace, see ``engine.tools.virtual_hosts``); a wrapper that forks overrides ``pid`` and
    ``kill`` so signals reach the server itself.
    """

    def __init__(self, module: str, model: str, *args: str, threads: int = 1, env: dict[str, str] | None = None,
                 port: int | None = None, host: str = "127.0.0.1", wrap: tuple[str, ...] = ()):
        self.role = module
        self.port = port or free_port()
        self.address = f"tcp://{host}:{self.port}"
        self.url = f"http://{host}:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", **(env or {}))
        env.setdefault("DUET_LOG_LEVEL", "WARNING")
        where = "" if host == "127.0.0.1" else f"{host}-"
        self.log_path = Path(tempfile.gettempdir()) / f"duet-{module}-{where}{self.port}.log"
        self.log = open(self.log_path, "w")
        threads_args = [] if module == "router" else ["--torch-threads", str(threads)]
        self.proc = subprocess.Popen(
            [*wrap, sys.executable, "-m", f"duet.engine.{module}", "--model", model, "--port", str(self.port),
             *threads_args, *args],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        """The server process's pid (signals go there)."""
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL the server (and whatever it started)."""
        self.proc.kill()

    def wait_ready(self, timeout_s: float = 120.0) -> "ServerProcess":
        wait_for_line(self.proc, self.log_path, "DUET_READY", timeout_s)
        return self

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # exiting already
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode

    def output(self) -> str:
        return self.log_path.read_text()


def wait_for_line(proc: subprocess.Popen, log_path: Path, needle: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if needle in log_path.read_text():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"{needle!r} not seen in {timeout_s}s:\n{log_path.read_text()[-3000:]}")


def query_server(address: str, messages: list, want: int, timeout_s: float = 30.0, keys=None, ctx=None) -> list:
    """Send wire messages to a server's command socket as a raw DEALER; collect ``want`` decoded replies.
    ``ctx``: the ``zmq.Context`` to use (default: the process's), e.g. one whose I/O thread lives in another
    network namespace."""
    import zmq

    from duet.transfer.curve import secure_client
    from duet.transfer.wire import decode, encode

    ctx = ctx or zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    secure_client(sock, keys)
    sock.connect(address)
    try:
        for msg in messages:
            sock.send(encode(msg))
        replies = []
        deadline = time.monotonic() + timeout_s
        while len(replies) < want:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000)):
                raise TimeoutError(f"{len(replies)}/{want} replies from {address}: {replies}")
            replies.append(decode(sock.recv()))
        return replies
    finally:
        sock.close(0)
