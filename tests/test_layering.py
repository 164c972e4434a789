"""Package boundaries: ``transfer/`` (the KV data plane, ``duet.transfer``) never imports ``engine/``
(``duet.engine``), and every router module imports on its own (no import cycle that only an import order hides)."""
from __future__ import annotations

import concurrent.futures
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_transfer_never_imports_engine():
    modules = ["duet.transfer"] + [f"duet.transfer.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "transfer")])]
    try:
        import vllm  # noqa: F401
    except ImportError:
        modules.remove("duet.transfer.vllm_connector")  # it subclasses vLLM's connector base
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "leaked = sorted(m for m in sys.modules if m.startswith(('duet.engine', 'engine')))\n"
            "assert not leaked, leaked\n")
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_issue_one_liner():
    result = _run("import duet.transfer, sys\n"
                  "assert not any(m.startswith(('engine', 'duet.engine')) for m in sys.modules)")
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("package", ["engine.router", "engine.server"])
def test_every_module_imports_on_its_own(package):
    folder = ROOT.joinpath(*package.split("."))
    names = [f"duet.{package}.{m.name}" for m in pkgutil.iter_modules([str(folder)]) if m.name != "__main__"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = dict(zip(names, pool.map(lambda n: _run(f"import {n}"), names)))
    failed = {n: r.stderr.strip().splitlines()[-1] for n, r in results.items() if r.returncode}
    assert not failed, failed
