"""Next-token bitmasks of a step's grammar-constrained rows, filled while the forward runs.

The model runner calls ``submit`` right after building a step's inputs and before running the model; one
worker thread fills each constrained row's bitmask from its matcher (xgrammar releases the GIL, so the fill
overlaps the forward's kernels), and the runner takes the ``TokenMask`` after the forward and hands it to
the sampler. On the CPU the thread also turns each row into a short list of token ids (``TokenMask``), so
applying it touches only those. ``overlap=False`` fills on the caller's thread instead (the benchmark's comparison point).
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class TokenMask:
    """Allowed next tokens of some sample rows.

    On the CPU the mask thread also turns each row into a short id list: the allowed ids when at most half the
    vocabulary is allowed (structure, keys, enums, digits), else the disallowed ones (inside a string). Then
    no vocab-wide pass is needed: a greedy row with few allowed tokens takes the argmax over them, and every
    other row gets -inf written at its disallowed ids only. (xgrammar's CPU kernel took ~8 ms per step for
    16 rows x 131k tokens, a boolean ``masked_fill`` ~1.5 ms.) On a GPU xgrammar's kernel reads the bits.
    """

    bitmask: torch.Tensor  # [num_sample_rows, ceil(vocab / 32)] int32 on the CPU: bit t of a row = token t allowed
    rows: list[int]
    """Sample rows the mask restricts (others are left alone)."""
    greedy_rows: torch.Tensor | None = None  # [r] int64: rows allowing at most half the vocabulary (CPU)
    greedy_ids: torch.Tensor | None = None  # [r, k] int64: their allowed ids, padded by repeating one of them
    disallowed_flat: torch.Tensor | None = None  # [m] int64: row * vocab + token of the other rows' disallowed ids

    def apply(self, logits: torch.Tensor, greedy: list[bool]) -> dict[int, int]:
        """Mask ``logits`` in place; returns row -> token for greedy rows decided from their allowed ids.

        logits  # [num_sample_rows, vocab] float32, contiguous
        greedy  # per sample row: it takes the argmax
        """
        if logits.device.type != "cpu" or self.greedy_rows is None:
            import xgrammar as xgr

            bitmask = self.bitmask.to(logits.device, non_blocking=True)
            xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], indices=self.rows)
            return {}
        vocab = logits.shape[-1]
        flat = logits.view(-1)
        decided: dict[int, int] = {}
        if self.greedy_rows.numel():
            rows = self.greedy_rows.tolist()
            picks = self.greedy_ids.gather(1, flat[self.greedy_rows[:, None] * vocab + self.greedy_ids]
                                           .argmax(dim=1, keepdim=True))[:, 0].tolist()
            for i, row in enumerate(rows):
                if greedy[row]:
                    decided[row] = picks[i]
                else:  # a sampled row with few allowed tokens: everything else to -inf
                    ids = self.greedy_ids[i]
                    values = logits[row, ids]
                    logits[row].fill_(float("-inf"))
                    logits[row, ids] = values
        if self.disallowed_flat.numel():
            flat.index_fill_(0, self.disallowed_flat, float("-inf"))
        return decided


_SHIFTS = torch.arange(32, dtype=torch.int32)


def unpack_allowed(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bitmask [n, ceil(vocab / 32)] int32 -> [n, vocab_size] bool, True where the token is allowed."""
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1  # [n, words, 32]: bit j of word w = token 32 * w + j
    return (bits != 0).view(bitmask.shape[0], -1)[:, :vocab_size]


class _Done:
    """A finished future for the inline (non-overlapped) mode."""

    def __init__(self, value):
        self._value = value

    def result(self, timeout=None):
        return self._value


class MaskFiller:
    """Owned by a model runner; ``submit`` and ``result`` are called from the engine thread only."""

    def __init__(self, vocab_size: int, overlap: bool = True, unpack: bool = True):
        """``unpack``: also turn the rows' masks into id lists on the mask thread (CPU sampling)."""
        self.vocab_size = vocab_size
        self.overlap = overlap
        self.unpack = unpack
        self.fill_cpu_s = 0.0
        """CPU seconds spent filling masks so far (whichever thread did it)."""
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
        start = time.thread_time()
        try:
            return self._fill_rows(states, rows, num_rows)
        finally:
            self.fill_cpu_s += time.thread_time() - start

    def _fill_rows(self, states: list, rows: list[int], num_rows: int) -> TokenMask | None:
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(num_rows, self.vocab_size)
        restricted = [row for state, row in zip(states, rows) if state.fill(bitmask, row)]
        if not restricted:
            return None
        mask = TokenMask(bitmask, restricted)
        if self.unpack:
            allowed = unpack_allowed(bitmask[restricted], self.vocab_size)  # [len(restricted), vocab]
            counts = allowed.sum(dim=1)
            if bool((counts == 0).any()):
                return mask  # a failed matcher allows nothing: leave all rows to the bitmask path
            sparse = counts <= self.vocab_size // 2
            rows = torch.tensor(restricted, dtype=torch.long)
            picked = allowed[sparse]  # [r, vocab]
            if picked.shape[0]:
                # Row i's allowed ids, padded to the longest row with repeats of its first (argmax unchanged).
                hits = torch.nonzero(picked)  # [t, 2]: (row, token), row-major
                sizes = counts[sparse]
                starts = torch.cumsum(sizes, 0) - sizes
                ids = hits[starts, 1][:, None].repeat(1, int(sizes.max()))
                ids[hits[:, 0], torch.arange(hits.shape[0]) - starts[hits[:, 0]]] = hits[:, 1]
                mask.greedy_ids = ids
            else:
                mask.greedy_ids = torch.empty(0, 0, dtype=torch.long)
            mask.greedy_rows = rows[sparse]
            dense = ~sparse
            hits = torch.nonzero(~allowed[dense])  # [m, 2]: (index among dense rows, token)
            mask.disallowed_flat = rows[dense][hits[:, 0]] * self.vocab_size + hits[:, 1]
        return mask

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
