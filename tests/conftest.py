"""Suite-wide set-up: CPU-only machines run Triton kernels through the interpreter."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is created.
    os.environ.setdefault("TRITON_INTERPRET", "1")
