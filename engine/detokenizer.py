"""Incremental detokenization and stop-string detection.

Text is produced by decoding a short window of recent tokens and emitting only what grew, so each step costs
O(window), and text is held back while it ends in an incomplete UTF-8 sequence (decoded as U+FFFD) — a
multi-byte character split across tokens is never emitted broken. Bytes that stay invalid after 4 tokens can
never complete a character; they are emitted as U+FFFD rather than held to the end. When stop strings are set, the last
``max(len(stop)) - 1`` characters are held back too, so streamed text never shows a stop string's start that
is later cut.
"""
from __future__ import annotations

import weakref
from functools import partial
from collections.abc import Callable

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
        self._decode, self._single_token_texts = _window_decoder(tokenizer, skip_special_tokens)

    def push(self, token_id: int) -> None:
        """Add one generated token; may set ``stop_reason`` when a stop string appears."""
        if self.stop_reason is not None:
            return
        tokens = self._tokens
        tokens.append(token_id)
        start, read = self._prefix_offset, self._read_offset
        single = self._single_token_texts
        if single is not None and read - start == 1:  # usual: the window before this token is one token
            prefix = single.get(tokens[start])
            if prefix is None:
                prefix = single[tokens[start]] = self._decode(tokens[start:read])
        else:
            prefix = self._decode(tokens[start:read])
        full = self._decode(tokens[start:])
        if len(full) <= len(prefix) or (full.endswith(REPLACEMENT) and len(tokens) - read < _MAX_HELD_TOKENS):
            return  # incomplete character (or nothing visible yet): wait for more tokens
        # Past 4 held tokens the bytes can never complete a character: they are invalid, shown as U+FFFD.
        delta = full[len(prefix):]
        self._prefix_offset = read
        self._read_offset = len(tokens)
        if not self.stop:
            self.text += delta
            return
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


_single_token_texts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""tokenizer -> {skip_special_tokens: {token id: its text decoded alone}}, shared by every detokenizer."""


Decode = Callable[[list[int]], str]


def _window_decoder(tokenizer, skip_special_tokens: bool) -> tuple[Decode, dict[int, str] | None]:
    """``ids -> text`` as ``tokenizer.decode(ids, skip_special_tokens, clean_up_tokenization_spaces=False)``, and a
    memo of single-token texts (None when there is none).

    ``push`` decodes twice per generated token, and for a stock ``transformers`` fast tokenizer the Python
    wrapper (argument conversion, checks) costs about three times the Rust decode it ends in; with cleanup off
    that wrapper adds nothing, so the backend is called directly. One of the two windows is usually the single
    previous token, whose text never depends on context: those texts are memoized, shared per tokenizer. Any
    other tokenizer goes through its ``decode`` and gets no memo.
    """
    cls = type(tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    stock = (
        getattr(cls.decode, "__module__", None) == "transformers.tokenization_utils_base"
        and getattr(getattr(cls, "_decode", None), "__module__", None) == "transformers.tokenization_utils_tokenizers"
        and "decode" not in getattr(tokenizer, "__dict__", {})
        and type(backend).__module__ == "tokenizers"
    )
    if not stock:
        return lambda ids: tokenizer.decode(
            ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        ), None
    memo = _single_token_texts.setdefault(tokenizer, {}).setdefault(skip_special_tokens, {})
    return partial(backend.decode, skip_special_tokens=skip_special_tokens), memo
