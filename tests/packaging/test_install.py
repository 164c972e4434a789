"""A clean install, as a user does it: ``pip install .`` into a fresh venv (build isolation, pyproject.toml's
build requirements), then ``duet serve MODEL`` from another directory.

Checked: the C++ extension was built and loads (``duet.kernels._C``: the server logs no fallback), the
distribution installs one top-level name (``duet``), Hugging Face's ``kernels`` package installed in the same
venv keeps its name and breaks nothing, and the installed server answers chat completions and scores a
prompt as Hugging Face ``transformers`` does.

The venv gets the torch this test suite runs on (a pip constraint, for the build environment too): the CPU
build on a machine without CUDA, as the Makefile pins it. One install takes a few minutes (torch twice: the
build environment and the venv), so everything is checked on that one install.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
import transformers

from duet.engine.launcher import ROOT, free_port, wait_for_line

INSTALL_TIMEOUT_S = 1500
# What a source distribution would not hold: environments, build trees, compiled objects, results.
IGNORE = shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__", "*.so", ".scratch",
                                "runs", ".pytest_cache", ".whl")
PROMPT = "The quick brown fox jumps over the lazy dog because"


def _run(argv: list, timeout_s: float, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, **kwargs)
    assert done.returncode == 0, f"{argv} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with ``pip install <copy of this checkout> kernels`` done in it."""
    work = tmp_path_factory.mktemp("install")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    env_dir = work / "venv"
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(env_dir)], 300)
    constraints = work / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    env = dict(os.environ, PIP_CONSTRAINT=str(constraints))
    env.pop("PYTHONPATH", None)
    _run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", str(src), "kernels"], INSTALL_TIMEOUT_S,
         env=env, cwd=work)
    return env_dir


def _python(venv: Path, code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return _run([str(venv / "bin" / "python"), "-c", code], 300, cwd=cwd, env=env).stdout


def test_one_top_level_name_and_the_extension_built(venv, tmp_path):
    [record] = (venv / "lib").glob("python*/site-packages/duet-*.dist-info/RECORD")
    tops = {line.split(",")[0].split("/")[0] for line in record.read_text().splitlines()}
    tops = {t for t in tops if not t.endswith(".dist-info") and t != ".."}  # ../../bin/duet: the console script
    assert tops == {"duet"}, tops
    assert any(line.startswith("duet/kernels/_C.") for line in record.read_text().splitlines())
    out = _python(venv, "import duet.kernels.kv_blocks as k, duet.kernels.cpu_attention as a, kernels, json\n"
                        "print(json.dumps([k.extension_available(), a.extension_available(),\n"
                        "                  kernels.__file__, hasattr(kernels, 'get_kernel')]))", tmp_path)
    kv_ops, attention_ops, hf_file, hf_api = json.loads(out.splitlines()[-1])
    assert kv_ops and attention_ops  # the compiled ops, not the torch fallback
    assert "site-packages/kernels/" in hf_file and hf_api  # Hugging Face's kernels, under its own name
    for generic in ("engine", "transfer", "bench"):
        code = f"import importlib.util as u; print(u.find_spec({generic!r}) is None)"
        assert _python(venv, code, tmp_path).strip() == "True", f"{generic} is importable from the install"


def test_duet_serve_from_another_directory(venv, tmp_path, llama_dir):
    port = free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(venv / "bin" / "duet"), "serve", llama_dir, "--port", str(port),
                                 "--num-kv-blocks", "64", "--torch-threads", "1", "--log-level", "info"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_line(proc, log, "DUET_READY", 300)
        base = f"http://127.0.0.1:{port}/v1"
        chat = _post(base + "/chat/completions", {"model": llama_dir, "max_tokens": 6, "temperature": 0,
                                                  "messages": [{"role": "user", "content": "hello"}]})
        assert chat["choices"][0]["message"]["role"] == "assistant" and chat["usage"]["completion_tokens"] == 6
        # The installed model, with the compiled ops, scores the prompt as transformers does.
        scored = _post(base + "/completions", {"model": llama_dir, "prompt": PROMPT, "echo": True, "logprobs": 1,
                                               "max_tokens": 0})
        got = scored["choices"][0]["logprobs"]["token_logprobs"]
        model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
        ids = transformers.AutoTokenizer.from_pretrained(llama_dir).encode(PROMPT)
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # [len(ids), vocab]
        want = [None] + [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
        assert len(got) == len(want) and got[0] is None
        assert max(abs(g - w) for g, w in zip(got[1:], want[1:])) < 1e-3
    finally:
        proc.terminate()
        proc.wait(30)
    text = log.read_text()
    assert "using the torch reference" not in text, text[-3000:]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=120).read())
