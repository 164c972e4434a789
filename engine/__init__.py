"""Duet: a disaggregated prefill/decode LLM inference engine.

Library entry points: ``LLM`` (batched, synchronous), ``AsyncEngine`` (streaming), ``SamplingParams``,
``EngineConfig``. Imports are lazy so ``import engine`` stays cheap for tools and servers.
"""
from __future__ import annotations

__all__ = ["LLM", "AsyncEngine", "SamplingParams", "EngineConfig", "LLMEngine", "RequestOutput"]

_LOCATIONS = {
    "LLM": "engine.llm",
    "AsyncEngine": "engine.async_engine",
    "SamplingParams": "engine.sampling_params",
    "EngineConfig": "engine.config",
    "LLMEngine": "engine.llm_engine",
    "RequestOutput": "engine.outputs",
}


def __getattr__(name: str):
    if name in _LOCATIONS:
        import importlib

        return getattr(importlib.import_module(_LOCATIONS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
