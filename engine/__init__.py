"""Duet: a disaggregated prefill/decode LLM inference engine.

Library entry points: ``LLM`` (batched, synchronous), ``AsyncEngine`` (streaming), ``SamplingParams``,
``EngineConfig``. Imports are lazy so ``import engine`` stays cheap for tools and servers.
"""
from __future__ import annotations

__all__ = ["LLM", "AsyncEngine", "SamplingParams", "EngineConfig", "LLMEngine", "RequestOutput"]

_LOCATIONS = {
    "LLM": "duet.engine.llm",
    "AsyncEngine": "duet.engine.async_engine",
    "SamplingParams": "duet.engine.sampling_params",
    "EngineConfig": "duet.engine.config",
    "LLMEngine": "duet.engine.llm_engine",
    "RequestOutput": "duet.engine.outputs",
}


def __getattr__(name: str):
    if name in _LOCATIONS:
        import importlib

        return getattr(importlib.import_module(_LOCATIONS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
