"""The runner's block tables: one row per scheduled request, kept between steps.

A decode step gives a request a new block only once every ``block_size`` tokens, so rebuilding every row
from ``Request.block_ids`` each step (a Python list to tensor conversion per request) was most of the host
time of a large decode batch. Here a row is written when its request is first scheduled and afterwards
only its new tail is copied; a step gathers its rows with one numpy index.

A row is keyed by the request object and remembers which ``block_ids`` list it copied: the block manager
replaces that list when it frees a request (finish, preemption, failed remote KV), so a new list means the
row is rewritten from scratch. Rows of requests absent from a step are released (zeroed) at that step.
No CUDA here.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from duet.engine.request import Request

_MIN_ROWS = 16
_MIN_BLOCKS = 64


class _Row:
    __slots__ = ("block_ids", "last_step", "num_copied", "row_idx")

    def __init__(self, row_idx: int, block_ids: list[int]):
        self.row_idx = row_idx
        self.block_ids = block_ids
        """The list copied from (identity is what matters: a new list means a rewrite)."""
        self.num_copied = 0
        self.last_step = 0


class BlockTables:
    def __init__(self) -> None:
        self._table = np.zeros((0, _MIN_BLOCKS), dtype=np.int32)  # [num_rows, capacity_blocks]
        self._rows: dict[Request, _Row] = {}
        self._free_rows: list[int] = []
        self._step = 0

    def gather(self, requests: Sequence[Request]) -> np.ndarray:  # [len(requests), width] int32
        """Block tables of ``requests`` in order, zero-padded to the longest (``width``), as a new array."""
        self._step += 1
        step = self._step
        rows = self._rows
        row_idx: list[int] = []
        width = 0
        for req in requests:
            blocks = req.block_ids
            n = len(blocks)
            row = rows.get(req)
            if row is None or row.block_ids is not blocks or row.num_copied != n:
                row = self._sync(req, row)
            row.last_step = step
            row_idx.append(row.row_idx)
            if n > width:
                width = n
        if len(rows) > len(row_idx):  # some requests were not scheduled: finished, preempted or waiting
            for req in [req for req, row in rows.items() if row.last_step != step]:
                row = rows.pop(req)
                self._table[row.row_idx, :row.num_copied] = 0
                self._free_rows.append(row.row_idx)
        return self._table[row_idx, :width]

    def _sync(self, req: Request, row: _Row | None) -> _Row:
        """Copy what ``row`` lacks of ``req.block_ids`` (all of it for a new request or a replaced list)."""
        blocks = req.block_ids
        n = len(blocks)
        if row is None:
            row = self._rows[req] = _Row(self._take_row(), blocks)
        elif row.block_ids is not blocks or n < row.num_copied:
            self._table[row.row_idx, :row.num_copied] = 0
            row.block_ids, row.num_copied = blocks, 0
        if n > self._table.shape[1]:
            self._grow(self._table.shape[0], n)
        self._table[row.row_idx, row.num_copied:n] = blocks[row.num_copied:]
        row.num_copied = n
        return row

    def _take_row(self) -> int:
        if not self._free_rows:
            num_rows = self._table.shape[0]
            self._grow(max(_MIN_ROWS, 2 * num_rows), self._table.shape[1])
            self._free_rows.extend(range(self._table.shape[0] - 1, num_rows - 1, -1))
        return self._free_rows.pop()

    def _grow(self, num_rows: int, num_blocks: int) -> None:
        old = self._table
        if num_blocks > old.shape[1]:
            num_blocks = max(num_blocks, 2 * old.shape[1])
        self._table = np.zeros((max(num_rows, old.shape[0]), max(num_blocks, old.shape[1])), dtype=np.int32)
        self._table[:old.shape[0], :old.shape[1]] = old
