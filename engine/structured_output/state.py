"""One request's grammar matcher: which tokens may come next, given the tokens generated so far.

Lifecycle: created with the compile future (``PENDING``); becomes ``READY`` when the grammar is compiled and
every token accepted meanwhile was replayed; ``FAILED`` when compiling failed or a token broke the grammar
(the engine then ends the request with ``finish_reason="error"``). ``accept`` is called by the engine for
every appended token (locally sampled, or handed over by a prefill server); ``fill`` by the mask thread.
The two never overlap: the engine waits for the step's masks before it samples and appends.
"""
from __future__ import annotations

import enum
import logging
from concurrent.futures import Future
from typing import Iterable

logger = logging.getLogger(__name__)


class GrammarStatus(enum.Enum):
    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"


class GrammarState:
    def __init__(self, compiled: Future):
        """``compiled``: resolves to an ``xgrammar.CompiledGrammar`` (or raises ValueError)."""
        self._compiled = compiled
        self._matcher = None
        self._pending: list[int] = []
        self.error: str | None = None
        self.num_accepted = 0

    @classmethod
    def resume(cls, compiled: Future, token_ids: Iterable[int]) -> "GrammarState":
        """A matcher that has accepted ``token_ids`` (a request's generated tokens so far)."""
        state = cls(compiled)
        state.accept_all(token_ids)
        return state

    @property
    def compiled(self) -> Future:
        """The compile future (the engine waits on it when nothing else can run)."""
        return self._compiled

    @property
    def status(self) -> GrammarStatus:
        if self.error is not None:
            return GrammarStatus.FAILED
        if self._matcher is not None:
            return GrammarStatus.READY
        if self._compiled.done():
            self._materialize()
            return self.status
        return GrammarStatus.PENDING

    @property
    def ready(self) -> bool:
        """Compiled (or failed): the scheduler may run the request; its masks never block on compilation."""
        return self.status is not GrammarStatus.PENDING

    def _materialize(self, timeout_s: float | None = None) -> None:
        """Build the matcher once compiled and replay the tokens accepted before; errors set ``error``."""
        if self._matcher is not None or self.error is not None:
            return
        try:
            compiled = self._compiled.result(timeout_s)
        except ValueError as e:
            self.error = str(e)
            return
        except Exception as e:  # noqa: BLE001 - a compile crash fails this request only
            logger.exception("grammar compilation failed")
            self.error = f"structured_outputs: grammar compilation failed ({e})"
            return
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)
        pending, self._pending = self._pending, []
        for token_id in pending:
            self._accept_now(token_id)

    def _accept_now(self, token_id: int) -> bool:
        if self.error is not None:
            return False
        if not self._matcher.accept_token(token_id):
            self.error = f"token {token_id} does not continue the grammar (structured_outputs)"
            logger.warning("grammar matcher rejected token %d after %d tokens", token_id, self.num_accepted)
            return False
        self.num_accepted += 1
        return True

    def accept(self, token_id: int) -> bool:
        """Advance by one generated token; False (and ``error`` set) if the grammar does not allow it."""
        if self._matcher is None and self.error is None and self._compiled.done():
            self._materialize()
        if self._matcher is None:
            if self.error is None:
                self._pending.append(token_id)  # replayed once compiled
            return self.error is None
        return self._accept_now(token_id)

    def accept_all(self, token_ids: Iterable[int]) -> bool:
        return all(self.accept(t) for t in token_ids)

    def fill(self, bitmask, row: int) -> bool:
        """Write the allowed-next-token bits into ``bitmask[row]``; True when the row restricts anything.

        bitmask  # [num_rows, ceil(vocab / 32)] int32 on the CPU
        Waits for compilation if needed (a decode server may run a handed-over request first).
        """
        self._materialize()
        if self._matcher is None:
            return False  # failed: the engine ends the request after this step
        return bool(self._matcher.fill_next_token_bitmask(bitmask, row))

    @property
    def is_terminated(self) -> bool:
        """The grammar accepted a stop token: nothing more may be generated."""
        return self._matcher is not None and self._matcher.is_terminated()
