"""Next-token bitmasks of a step's grammar-constrained rows, filled while the forward runs.

The model runner calls ``submit`` right after building a step's inputs and before running the model; one
worker thread fills each constrained row's bitmask from its matcher (xgrammar releases the GIL, so the fill
overlaps the forward's kernels), and the runner takes the ``TokenMask`` after the forward and hands it to
the sampler. On the CPU the thread also unpacks the bits into a boolean mask, so applying it is one
``masked_fill``. ``overlap=False`` fills on the caller's thread instead (the benchmark's comparison point).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class TokenMask:
    """Allowed next tokens of some sample rows."""

    bitmask: torch.Tensor  # [num_sample_rows, ceil(vocab / 32)] int32 on the CPU: bit t of a row = token t allowed
    rows: list[int]
    """Sample rows the mask restricts (others are left alone)."""
    disallowed: torch.Tensor | None = None  # [len(rows), vocab] bool on the CPU, or None (GPU: the bitmask is used)

    def apply(self, logits: torch.Tensor) -> None:
        """Set the logits of disallowed tokens to -inf, in place.

        logits  # [num_sample_rows, vocab] float32
        On the CPU one ``masked_fill`` with the mask unpacked on the mask thread (xgrammar's CPU kernel takes
        ~8 ms for 16 rows of a 131k vocabulary); on a GPU xgrammar's kernel, which reads the packed bits.
        """
        if self.disallowed is not None and logits.device.type == "cpu":
            if len(self.rows) == logits.shape[0]:
                logits.masked_fill_(self.disallowed, float("-inf"))
            else:
                idx = torch.tensor(self.rows, dtype=torch.long)
                logits[idx] = logits[idx].masked_fill(self.disallowed, float("-inf"))
            return
        import xgrammar as xgr

        bitmask = self.bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], indices=self.rows)


_SHIFTS = torch.arange(32, dtype=torch.int32)


def unpack_disallowed(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bitmask [n, ceil(vocab / 32)] int32 -> [n, vocab_size] bool, True where the token is NOT allowed."""
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1  # [n, words, 32]: bit j of word w = token 32 * w + j
    return (bits == 0).view(bitmask.shape[0], -1)[:, :vocab_size]


class _Done:
    """A finished future for the inline (non-overlapped) mode."""

    def __init__(self, value):
        self._value = value

    def result(self, timeout=None):
        return self._value


class MaskFiller:
    """Owned by a model runner; ``submit`` and ``result`` are called from the engine thread only."""

    def __init__(self, vocab_size: int, overlap: bool = True, unpack: bool = True):
        """``unpack``: also expand the rows' masks to booleans on the mask thread (CPU sampling)."""
        self.vocab_size = vocab_size
        self.overlap = overlap
        self.unpack = unpack
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, states: Sequence) -> Future | _Done | None:
        """Start filling the rows of ``states`` (one ``GrammarState`` or None per sample row); None if no row
        is constrained. The future's result is a ``TokenMask`` or None (every row unrestricted)."""
        rows = [i for i, s in enumerate(states) if s is not None]
        if not rows:
            return None
        work = ([states[i] for i in rows], rows, len(states))
        if not self.overlap:
            return _Done(self._fill(*work))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="duet-masks")
        return self._pool.submit(self._fill, *work)

    def _fill(self, states: list, rows: list[int], num_rows: int) -> TokenMask | None:
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(num_rows, self.vocab_size)
        restricted = [row for state, row in zip(states, rows) if state.fill(bitmask, row)]
        if not restricted:
            return None
        disallowed = None
        if self.unpack:
            disallowed = unpack_disallowed(bitmask[restricted] if len(restricted) < num_rows else bitmask,
                                           self.vocab_size)
        return TokenMask(bitmask, restricted, disallowed)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
