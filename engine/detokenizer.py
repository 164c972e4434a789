"""Incremental detokenization and stop-string detection.

Text is produced by decoding a short window of recent tokens and emitting only what grew, so each step costs
O(window), and text is held back while it ends in an incomplete UTF-8 sequence (decoded as U+FFFD) — a
multi-byte character split across tokens is never emitted broken. Bytes that stay invalid after 4 tokens can
never complete a character; they are emitted as U+FFFD rather than held to the end. When stop strings are set, the last
``max(len(stop)) - 1`` characters are held back too, so streamed text never shows a stop string's start that
is later cut.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5
_MAX_HELD_TOKENS = 4  # a UTF-8 character spans at most 4 bytes, hence at most 4 byte-level tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str] | None = None,
                 include_stop_str_in_output: bool = False, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._tokens = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.text = ""
        """All text decoded so far (truncated at a stop string once one is found)."""
        self._emitted = 0
        self.stop = list(stop or [])
        self.include_stop = include_stop_str_in_output
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.stop_reason: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> None:
        """Add one generated token; may set ``stop_reason`` when a stop string appears."""
        if self.stop_reason is not None:
            return
        self._tokens.append(token_id)
        prefix = self._decode(self._tokens[self._prefix_offset:self._read_offset])
        full = self._decode(self._tokens[self._prefix_offset:])
        held = len(self._tokens) - self._read_offset
        if len(full) <= len(prefix) or (full.endswith(REPLACEMENT) and held < _MAX_HELD_TOKENS):
            return  # incomplete character (or nothing visible yet): wait for more tokens
        # Past 4 held tokens the bytes can never complete a character: they are invalid, shown as U+FFFD.
        delta = full[len(prefix):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        search_from = max(0, len(self.text) - self._hold)
        self.text += delta
        for s in self.stop:
            idx = self.text.find(s, search_from)
            if idx >= 0:
                self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]
                self.stop_reason = s
                break

    def flush(self) -> None:
        """At finish: decode what was held back because it looked incomplete."""
        if self.stop_reason is None and self._read_offset < len(self._tokens):
            prefix = self._decode(self._tokens[self._prefix_offset:self._read_offset])
            full = self._decode(self._tokens[self._prefix_offset:])
            self.text += full[len(prefix):]
            self._read_offset = len(self._tokens)

    def take_new_text(self, finished: bool) -> str:
        """Text not returned before; while unfinished, holds back a possible stop-string prefix."""
        end = len(self.text) if finished or self.stop_reason is not None else max(self._emitted, len(self.text) - self._hold)
        new = self.text[self._emitted:end]
        self._emitted = end
        return new
