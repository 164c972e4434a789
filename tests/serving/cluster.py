"""Start real Duet server processes on 127.0.0.1 for tests, and stop them."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One ``python -m engine.<role>`` process; ``address`` is its ZeroMQ command socket."""

    def __init__(self, role: str, model: str, *args: str, threads: int = 1):
        self.role = role
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        env.setdefault("DUET_LOG_LEVEL", "WARNING")
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"duet-{role}-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"engine.{role}", "--model", model, "--port", str(self.port),
             "--torch-threads", str(threads), *args],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
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
