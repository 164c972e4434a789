"""The compiled extension ``kernels._C`` (csrc/): whether it loaded, which device kernels it has, one warning.

The typed wrappers (``kernels.kv_blocks``, ``kernels.cpu_attention``) call ``use(ops, device, family)``
before each compiled call: True when ``torch.ops.duet.<op>`` is loaded (and not disabled with
``use_extension(False)``, which engines call for ``DUET_DISABLE_EXTENSION=1``) and has a kernel for that device type; otherwise the wrapper runs its torch
version, and the first fallback of each op family logs one warning per process saying why.

Fake (meta) implementations, which torch.compile and FakeTensor need, are registered by each wrapper module
when it is imported; the C++ library names this module (``set_python_module``) as the place torch imports
to find them, so importing it imports the wrappers.
"""
from __future__ import annotations

import functools
import importlib
import logging
from typing import Callable

import torch

logger = logging.getLogger(__name__)

_WRAPPERS = ("duet.kernels.kv_blocks", "duet.kernels.cpu_attention", "duet.kernels.cpu_layers")
_warned: set[str] = set()
_faked: set[str] = set()
_enabled = True


def use_extension(enabled: bool) -> None:
    """Allow (default) or forbid the compiled ops in this process; forbidden, the torch versions run.
    (The kernels read no environment: engines call this for ``DUET_DISABLE_EXTENSION=1``.)"""
    global _enabled
    _enabled = enabled
    load_error.cache_clear()


def register_fakes(fakes: dict[str, Callable[..., None]]) -> None:
    """Register fake (meta) implementations of ``duet::<name>``, once per op per process (a wrapper module
    imported under a second name must not register again), so torch.compile and FakeTensor trace the ops."""
    for name, fake in fakes.items():
        if name not in _faked:
            _faked.add(name)
            torch.library.register_fake(f"duet::{name}")(fake)


def ops_defined(ops: tuple[str, ...]) -> bool:
    """True when every ``torch.ops.duet.<op>`` in ``ops`` is registered (whoever loaded the library)."""
    return all(hasattr(torch.ops.duet, name) for name in ops)


@functools.cache
def load_error() -> str | None:
    """Import the compiled library once; returns why it is unavailable, or None when it is loaded."""
    if not _enabled:
        return "disabled (DUET_DISABLE_EXTENSION=1)"
    try:
        importlib.import_module("duet.kernels._C")
    except ImportError as exc:
        return f"kernels._C could not be imported ({exc})"
    for module in _WRAPPERS:  # their fakes
        importlib.import_module(module)
    return None


@functools.cache
def _missing(ops: tuple[str, ...], device_type: str) -> str | None:
    """Why ``ops`` cannot run on ``device_type`` with the loaded library (None: they can)."""
    absent = [name for name in ops if not hasattr(torch.ops.duet, name)]
    if absent:
        return f"kernels._C does not define {', '.join(absent)} (rebuild it: python setup.py build_ext --inplace)"
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:  # meta / fake tensors while tracing: the registered fake implementation answers
        return None
    if not all(torch._C._dispatch_has_kernel_for_dispatch_key(f"duet::{name}", key) for name in ops):
        return f"kernels._C was built without {device_type} kernels for {', '.join(ops)}"
    return None


def use(ops: tuple[str, ...], device: torch.device, family: str) -> bool:
    """Whether to call the compiled ``ops`` on ``device``; the first "no" per ``family`` logs a warning."""
    reason = load_error() or _missing(ops, device.type)
    if reason is None:
        return True
    if family not in _warned:
        _warned.add(family)
        logger.warning("Duet %s: using the torch reference (slower): %s", family, reason)
    return False


# Torch imports this module (csrc: set_python_module) when it needs the fakes of ops loaded by a plain
# `import kernels._C`: import the wrappers, which register them.
if ops_defined(("gather_kv_blocks",)):
    for _module in _WRAPPERS:
        importlib.import_module(_module)
