"""The ``duet`` command line: vLLM's flag names, served model ids, one-line start-up errors, the router's
start-up wait. Real processes where the behaviour is the process's (exit status, stderr, HTTP)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from duet.engine.launcher import ROOT, free_port, wait_for_line
from duet.engine.server.cli import add_engine_args, add_logging_args, engine_config, resolve_model_args
from duet.engine.server.vllm_engine import PlatformLimits, check_platform

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DUET_LOG_LEVEL="WARNING")


def parse(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    add_engine_args(ap)
    add_logging_args(ap)
    args = ap.parse_args(list(argv))
    resolve_model_args(ap, args)
    return args


def test_vllm_flag_names_map_onto_the_engine_config(tmp_path):
    args = parse("models/m", "--served-model-name", "a", "b", "--no-enable-prefix-caching", "--enforce-eager",
                 "--tokenizer", str(tmp_path), "--generation-config", "vllm", "--log-level", "debug")
    config = engine_config(args)
    assert config.model == "models/m" and args.served_model_names == ["a", "b", "models/m"]
    assert args.served_model_name == "a" and args.log_level == "DEBUG"
    assert not config.enable_prefix_caching and not config.cuda_graphs
    assert config.tokenizer == str(tmp_path) and config.generation_config == "vllm"
    assert config.block_size == 16
    old = engine_config(parse("--model", "models/m", "--no-prefix-caching", "--no-cuda-graphs"))
    assert not old.enable_prefix_caching and not old.cuda_graphs
    vllm_spelling = engine_config(parse("m", "--num-gpu-blocks-override", "12", "--enable-expert-parallel"))
    assert vllm_spelling.num_kv_blocks == 12 and vllm_spelling.expert_parallel
    assert engine_config(parse("models/m")).enable_prefix_caching
    assert parse("--model", "m").served_model_names == ["m"]
    with pytest.raises(SystemExit):
        parse("a", "--model", "b")
    with pytest.raises(ValueError, match="generation_config"):
        engine_config(parse("m", "--generation-config", str(tmp_path / "missing")))


def checkpoint(path: Path, head_dim: int, dtype: str = "float32") -> str:
    """A model directory with only the config.json fields the platform check reads."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                                  "num_attention_heads": 64 // head_dim, "dtype": dtype}))
    return str(path)


def test_vllm_platform_limits_become_errors_naming_the_flag_or_field(tmp_path):
    from duet.engine.config import EngineConfig

    cpu = PlatformLimits("CPU_ATTN", 32, (32, 64, 128), ("bfloat16", "float16", "float32"))
    model16 = checkpoint(tmp_path / "m16", 16)  # the demo's shape
    model32 = checkpoint(tmp_path / "m32", 32)
    assert check_platform(EngineConfig(checkpoint(tmp_path / "f16", 32, "float16"), block_size=32, device="cpu"),
                          cpu) == "float32"  # as the native engine resolves float16 on CPU
    assert check_platform(EngineConfig(model32, block_size=32, device="cpu"), cpu) == "float32"
    with pytest.raises(ValueError, match=r"--block-size 16: vLLM's CPU_ATTN attention needs a multiple of 32 "
                       r"\(omit --block-size for 32\)"):
        check_platform(EngineConfig(model32, block_size=16, device="cpu"), cpu)
    with pytest.raises(ValueError, match=r"config.json: head_dim 16 is not supported by vLLM's CPU_ATTN"):
        check_platform(EngineConfig(model16, block_size=32, device="cpu"), cpu)
    with pytest.raises(ValueError, match="--dtype bfloat16: vLLM's CPU_ATTN attention supports float32"):
        check_platform(EngineConfig(model32, block_size=32, dtype="bfloat16", device="cpu"),
                       PlatformLimits("CPU_ATTN", 32, None, ("float32",)))
    gpu = PlatformLimits("GPU", None, None, None)
    assert check_platform(EngineConfig(model16, block_size=16, dtype="bfloat16", device="cpu"), gpu) == "bfloat16"


@pytest.fixture(scope="module")
def broken_models(tiny_model, tmp_path_factory):
    good = Path(tiny_model("llama"))
    root = tmp_path_factory.mktemp("broken")
    no_tok = root / "no_tokenizer"
    shutil.copytree(good, no_tok)
    (no_tok / "tokenizer.json").unlink()
    bad_arch = root / "bad_arch"
    shutil.copytree(good, bad_arch)
    raw = json.loads((bad_arch / "config.json").read_text())
    raw["architectures"] = ["FooForCausalLM"]
    (bad_arch / "config.json").write_text(json.dumps(raw))
    return {"missing": str(root / "nope"), "no_tokenizer": str(no_tok), "bad_arch": str(bad_arch)}


@pytest.fixture
def run_cli(capsys):
    """``duet ARGS`` in this process: (exit status, stdout, stderr). The commands configure logging; the
    test's own logging is put back afterwards."""
    from duet.engine.cli import main

    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            main(list(argv))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    root.handlers[:], _ = saved[0], root.setLevel(saved[1])


@pytest.mark.parametrize("command, case, needle", [
    (("serve",), "missing", "nope: model directory does not exist"),
    (("serve",), "no_tokenizer", "tokenizer.json: missing tokenizer file"),
    (("serve",), "bad_arch", "config.json: unsupported architecture ['FooForCausalLM']"),
    (("prefill", "--port", "0"), "bad_arch", "config.json: unsupported architecture ['FooForCausalLM']"),
    (("router", "--decode", "tcp://127.0.0.1:9"), "no_tokenizer", "tokenizer.json: missing tokenizer file"),
])
def test_start_up_errors_are_one_line_naming_the_file(run_cli, broken_models, command, case, needle):
    code, _, err = run_cli(command[0], broken_models[case], *command[1:])
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == [f"duet {command[0]}: error: " + lines[-1].split(": error: ", 1)[1]] and needle in lines[-1], err


def test_debug_log_level_adds_the_traceback(run_cli, broken_models):
    code, _, err = run_cli("serve", broken_models["bad_arch"], "--log-level", "debug")
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("duet serve: error: ")


def test_router_says_which_servers_it_waits_for(run_cli, llama_dir):
    silent = f"tcp://127.0.0.1:{free_port()}"
    code, _, err = run_cli("router", llama_dir, "--decode", silent, "--port", str(free_port()),
                           "--connect-timeout-s", "2.5", "--log-level", "info")
    assert code == 2
    assert "waiting for 1 of 1 servers" in err and f"decode {silent}" in err
    assert err.strip().splitlines()[-1] == \
        f"duet router: error: router cannot start: no answer within 2.5s from decode {silent}"


def test_duet_serve_positional_model_and_served_names(llama_dir, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "duet.engine.cli", "serve", llama_dir, "--port", str(port),
                                 "--served-model-name", "tiny", "tiny-alias", "--num-kv-blocks", "32",
                                 "--torch-threads", "1"], cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_line(proc, log, "DUET_READY", 120)
        base = f"http://127.0.0.1:{port}"
        models = json.loads(urllib.request.urlopen(base + "/v1/models", timeout=10).read())
        assert [m["id"] for m in models["data"]] == ["tiny", "tiny-alias", llama_dir]
        for name in ("tiny-alias", llama_dir):  # the path as given is served too (not its basename)
            req = urllib.request.Request(base + "/v1/completions", json.dumps(
                {"model": name, "prompt": "hi", "max_tokens": 2}).encode(), {"Content-Type": "application/json"})
            assert json.loads(urllib.request.urlopen(req, timeout=60).read())["model"] == name
        req = urllib.request.Request(base + "/v1/completions", json.dumps(
            {"model": os.path.basename(llama_dir), "prompt": "hi", "max_tokens": 2}).encode(),
            {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 404
        metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        assert 'vllm:num_requests_running{engine="0",model_name="tiny"}' in metrics
    finally:
        proc.terminate()
        proc.wait(30)


def test_duet_help_and_unknown_commands(run_cli):
    code, out, _ = run_cli("--help")
    assert code == 0 and "serve MODEL" in out and "bench NAME" in out
    assert run_cli("nonsense")[0] == 2
    code, _, err = run_cli("bench", "nope")
    assert code == 2 and "router_sim" in err
    code, out, _ = run_cli("serve", "--help")
    assert code == 0 and "--no-enable-prefix-caching" in out and "--no-prefix-caching" not in out
    assert "not its basename" in " ".join(out.split())
