"""What the Triton kernels share: the guarded ``triton`` import, device checks and launch-size helpers.

``kernels`` must import on a machine without Triton (the CPU engine runs the torch references), so this
module is the only place that imports ``triton``. Without it, ``triton`` and ``tl`` below are small
stand-ins that let the ``@triton.jit`` definitions in the kernel modules be *defined* (the decorator
returns the function untouched and ``tl.constexpr`` is only read as an annotation); every public kernel
wrapper calls ``require_triton`` first, so the stand-ins are never launched.
"""
from __future__ import annotations

import functools
import types

import torch

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised by a subprocess test with triton hidden
    TRITON_AVAILABLE = False
    triton = types.SimpleNamespace(jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f))
    tl = types.SimpleNamespace(constexpr=object)


def require_triton(kernel_name: str) -> None:
    """Raise a clear ``RuntimeError`` when a Triton kernel is called but Triton is not installed."""
    if not TRITON_AVAILABLE:
        raise RuntimeError(
            f"{kernel_name} is a Triton kernel but triton is not installed; install triton (CUDA) or use "
            "the torch reference in kernels.reference"
        )


def is_interpreted(kernel: object) -> bool:
    """Whether a ``@triton.jit`` function was created in interpreter mode (``TRITON_INTERPRET=1``).

    Triton decides this when the decorator runs, not at launch, so asking the kernel object is the only
    reliable answer: setting the variable after ``kernels`` was imported changes nothing.
    """
    if not TRITON_AVAILABLE:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def check_device(kernel: object, kernel_name: str, *tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and that device one the kernel can run on; returns the device.

    Compiled kernels need CUDA tensors; interpreted ones (CPU tests) take CPU tensors.
    """
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{kernel_name}: tensors on different devices ({device} and {t.device})")
    if device.type != "cuda" and not is_interpreted(kernel):
        raise RuntimeError(
            f"{kernel_name}: compiled Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
            "before importing kernels to run them on CPU through the interpreter"
        )
    return device


def check_last_dim_contiguous(kernel_name: str, **tensors: torch.Tensor) -> None:
    """Kernels address head_dim with unit stride so loads vectorise; other strides are passed through."""
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{kernel_name}: {name} must have a contiguous last dimension (stride {t.stride()})")


def check_power_of_two(kernel_name: str, name: str, value: int, minimum: int) -> None:
    """Triton block shapes are powers of two; ``tl.dot`` needs at least 16 along every dimension."""
    if value < minimum or value & (value - 1):
        raise ValueError(f"{kernel_name}: {name} must be a power of two >= {minimum}, got {value}")


def dot_options(dtype: torch.dtype, interpreted: bool) -> tuple[str, bool]:
    """(input_precision, upcast) for ``dot`` below, given the operands' dtype.

    fp32 operands would run as TF32 on the GPU (~1e-3 relative error), so they ask for IEEE. The Triton
    3.x interpreter multiplies bfloat16 operands as their raw uint16 bit patterns, so interpreted bf16
    dots are upcast to fp32 first (the compiled path keeps bf16 tensor-core dots).
    """
    upcast = interpreted and dtype == torch.bfloat16
    return ("ieee" if dtype == torch.float32 or upcast else "tf32"), upcast


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot(a, b)`` with float32 accumulation; see ``dot_options`` for the two flags."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _cuda_num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_parallel_units(device: torch.device) -> int:
    """How many programs the device runs at once, to size split-K: SMs on CUDA, 1 in the interpreter.

    The interpreter executes programs one after another, so splitting work across more programs never
    helps there; reporting one unit makes automatic choices pick the cheapest (unsplit) launch.
    """
    if device.type == "cuda":
        return _cuda_num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 1
