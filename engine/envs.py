"""The one module that reads the environment. Every Duet setting from the environment is ``DUET_*``.

Read lazily (functions, not constants) so tests can set variables after import.
"""
from __future__ import annotations

import os


def _get(name: str, default: str) -> str:
    return os.environ.get(name, default)


def log_level() -> str:
    """DUET_LOG_LEVEL: logging level name for Duet's loggers (default INFO)."""
    return _get("DUET_LOG_LEVEL", "INFO").upper()


def log_format() -> str:
    """DUET_LOG_FORMAT: ``text`` or ``json``; command-line ``--log-format`` wins."""
    return _get("DUET_LOG_FORMAT", "text")


def api_key() -> str | None:
    """DUET_API_KEY: default of ``--api-key`` (router, ``duet serve``): set it from a secret store rather than on
    the command line, where every process listing shows it."""
    return os.environ.get("DUET_API_KEY") or None


def attention_backend() -> str:
    """DUET_ATTENTION_BACKEND: ``auto`` (Triton on CUDA, torch elsewhere), ``triton`` or ``torch``."""
    return _get("DUET_ATTENTION_BACKEND", "auto").lower()


def disable_extension() -> bool:
    """DUET_DISABLE_EXTENSION=1: never load the compiled ``duet`` ops (use the torch references)."""
    return _get("DUET_DISABLE_EXTENSION", "0") == "1"


def bench_commit() -> str:
    """DUET_BENCH_COMMIT: commit recorded in benchmark results where ``git`` cannot tell (a copied tree)."""
    return _get("DUET_BENCH_COMMIT", "")


def torch_threads() -> int:
    """DUET_TORCH_THREADS: torch intra-op threads per process (0 = torch's default)."""
    return int(_get("DUET_TORCH_THREADS", "0"))


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1 (Triton's own variable): kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fault_fail_write_p() -> float:
    """DUET_FAULT_FAIL_WRITE_P (tests only): probability that posting a KV write fails on the prefill side."""
    return float(_get("DUET_FAULT_FAIL_WRITE_P", "0"))


def fault_drop_notif_p() -> float:
    """DUET_FAULT_DROP_NOTIF_P (tests only): probability that the decode side drops an arrived KV notification."""
    return float(_get("DUET_FAULT_DROP_NOTIF_P", "0"))


def vllm_cpu_kvcache_space() -> str | None:
    """VLLM_CPU_KVCACHE_SPACE (vLLM's own variable): GiB of KV cache for vLLM's CPU backend, None when unset."""
    return os.environ.get("VLLM_CPU_KVCACHE_SPACE")


def ucx_tls() -> str | None:
    """DUET_UCX_TLS: default of ``--ucx-tls`` (UCX transports for NIXL, e.g. ``tcp`` or ``rc,cuda_copy``)."""
    return os.environ.get("DUET_UCX_TLS") or None


def ucx_net_devices() -> str | None:
    """DUET_UCX_NET_DEVICES: default of ``--ucx-net-devices`` (UCX devices for NIXL, e.g. ``eth0`` or
    ``mlx5_0:1``)."""
    return os.environ.get("DUET_UCX_NET_DEVICES") or None


def ucx_setting(name: str) -> str | None:
    """The value of UCX's own variable ``name`` in this process's environment (None when unset)."""
    return os.environ.get(name)


def apply_ucx_settings(tls: str | None, net_devices: str | None) -> dict[str, str]:
    """Export ``UCX_TLS`` / ``UCX_NET_DEVICES`` (UCX's own variables) into this process's environment, before the
    NIXL agent starts: UCX reads them once, when the agent's UCX context is created, and every process started
    from here (a vLLM worker, model-parallel ranks) inherits them. ``None`` leaves a variable as it is (set by
    the user, or UCX's default: every transport and device it finds). Returns what was set."""
    applied = {}
    for name, value in (("UCX_TLS", tls), ("UCX_NET_DEVICES", net_devices)):
        if value is not None:
            os.environ[name] = applied[name] = value
    return applied
