"""The OpenAI API's output side: one choice's streamed state (text, stop strings, logprobs, echo, tool calls)
and the response and stream-chunk builders. Requests are parsed in ``engine.router.openai_protocol``, which
re-exports these.

Echo (completions) follows the OpenAI legacy API and vLLM: the prompt text precedes the completion, and with
``logprobs`` the prompt tokens come first in ``tokens`` / ``token_logprobs`` / ``top_logprobs`` /
``text_offset``, the first prompt token with ``null`` logprob and ``null`` alternatives. vLLM's
``prompt_logprobs`` field: per prompt position ``{token id: {"logprob", "rank", "decoded_token"}}``, the
first position ``null``.
"""
from __future__ import annotations

import functools
import json
import math
import re

from duet.engine.detokenizer import IncrementalDetokenizer
from duet.engine.router.api_error import APIError
from duet.engine.router.dispatcher import TokenDelta
from duet.engine.router.tool_parsers import ToolCallStream, tool_calls


# ---- one choice's output -------------------------------------------------------------------------------------
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet: printable bytes map to themselves, the rest to U+0100 onwards."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(0x100 + extra)] = b
            extra += 1
    return table


class TokenStrings:
    """Display text and UTF-8 bytes of single tokens (for logprobs), cached per token id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        try:
            byte_level = type(tokenizer.backend_tokenizer.decoder).__name__ == "ByteLevel"
        except AttributeError:
            byte_level = False
        self._byte_decoder = _byte_level_decoder() if byte_level else None
        self.text = functools.lru_cache(maxsize=65536)(self._text)
        self.bytes = functools.lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _bytes(self, token_id: int) -> list[int]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if self._byte_decoder is not None and piece and all(c in self._byte_decoder for c in piece):
                return [self._byte_decoder[c] for c in piece]
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # SentencePiece byte fallback
            if m:
                return [int(m.group(1), 16)]
        return list(self._text(token_id).encode("utf-8"))


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else -9999.0


class ChoiceState:
    """Turns one choice's ``TokenDelta``s into text (stop strings applied here) and OpenAI logprobs.

    A stop string ends the choice once ``min_tokens`` were generated (as the engine does); tokens after the
    one that completed it are dropped. ``finish_reason`` becomes ``stop``, ``length`` or ``error`` (then
    ``error`` holds the ``APIError`` to report).
    """

    def __init__(self, index: int, kind: str, detokenizer: IncrementalDetokenizer, *, min_tokens: int = 0,
                 top_logprobs: int | None = None, strings: TokenStrings | None = None,
                 echo: tuple[str, list[int]] | None = None, echo_only: bool = False,
                 tools: ToolCallStream | None = None, named_tool: bool = False):
        """``echo``: (prompt text, prompt token ids) to put first (completions). ``echo_only``: generated tokens
        are dropped (``max_tokens: 0``). ``tools``: parses the text into content and tool calls (chat);
        ``named_tool``: the call was forced by name (finish_reason stays ``stop``, as OpenAI's)."""
        self.index = index
        self.kind = kind
        self.detok = detokenizer
        self.min_tokens = min_tokens
        self.top_logprobs = top_logprobs
        self.strings = strings
        self.echo = echo
        self.echo_only = echo_only
        self.tools = tools
        self.named_tool = named_tool
        self.num_tokens = 0
        self.num_cached_tokens = 0
        self.cumulative_logprob = 0.0
        """Sum of the sampled tokens' logprobs (when the engine returned them): ``best_of`` ranks by it."""
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.prompt_token_ranks: list[int | None] | None = None
        self.finish_reason: str | None = None
        self.error: APIError | None = None
        self._pending: list[tuple[int, float | None, list[tuple[int, float]] | None]] = []
        self._text_offset = 0
        self._echo_pending = echo is not None
        self._text = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, delta: TokenDelta) -> None:
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        if delta.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs, self.prompt_token_ranks = delta.prompt_logprobs, delta.prompt_token_ranks
        for i, token_id in enumerate(delta.token_ids):
            if self.finished or self.echo_only:
                break
            self.detok.push(token_id)
            self.num_tokens += 1
            lps = delta.logprobs[i] if delta.logprobs and i < len(delta.logprobs) else {}
            self.cumulative_logprob += lps.get(token_id, 0.0)
            if self.top_logprobs is not None:
                top = sorted(lps.items(), key=lambda kv: -kv[1])[: self.top_logprobs]
                self._pending.append((token_id, lps.get(token_id, float("nan")), top))
            if self.detok.stop_reason is not None and self.num_tokens >= self.min_tokens:
                self.finish_reason = "stop"
        if delta.finished and not self.finished:
            if self.echo_only and delta.finish_reason in ("stop", "length"):
                self.finish_reason = "length"
            elif delta.finish_reason in ("stop", "length"):
                self.finish_reason = delta.finish_reason
            else:
                self.finish_reason = "error"
                message = delta.error or f"request ended early ({delta.finish_reason})"
                self.error = APIError(message, status=delta.status if delta.error else 503)

    def take(self) -> tuple[str, dict | None]:
        """Text and formatted logprobs produced since the previous call (all of it at the first call)."""
        if self.finished:
            self.detok.flush()
        text = self.detok.take_new_text(self.finished)
        echo_entries = []
        if self._echo_pending and (self.prompt_logprobs is not None or self.top_logprobs is None
                                   or self.finished):
            self._echo_pending = False
            prompt_text, prompt_ids = self.echo
            text = prompt_text + text
            echo_entries = self._prompt_entries(prompt_ids)
        elif self._echo_pending:
            return "", None  # the prompt's logprobs come with the first token
        self._text += text
        if self.top_logprobs is None:
            return text, None
        entries, self._pending = echo_entries + self._pending, []
        return text, self._format_logprobs(entries)

    def _prompt_entries(self, prompt_ids: list[int]) -> list[tuple[int, float | None, list | None]]:
        """Echoed prompt tokens as logprob entries: position 0 has none; the rest, the token and its top-k."""
        lps = self.prompt_logprobs or []
        entries = []
        for pos, token_id in enumerate(prompt_ids):
            scored = lps[pos] if pos < len(lps) else None
            if scored is None:
                entries.append((token_id, None, None))
                continue
            top = sorted(scored.items(), key=lambda kv: -kv[1])[: self.top_logprobs]
            entries.append((token_id, scored.get(token_id, float("nan")), top))
        return entries

    def prompt_logprobs_json(self) -> list[dict | None] | None:
        """vLLM's ``prompt_logprobs``: per position ``{"<id>": {"logprob", "rank", "decoded_token"}}``."""
        if self.prompt_logprobs is None:
            return None
        s, ranks = self.strings, self.prompt_token_ranks or []
        out: list[dict | None] = []
        for pos, scored in enumerate(self.prompt_logprobs):
            if scored is None:
                out.append(None)
                continue
            token_id = next(iter(scored))  # the prompt token comes first, then its alternatives
            by_rank = sorted(scored.items(), key=lambda kv: -kv[1])
            entry = {}
            for rank, (t, lp) in enumerate(by_rank, 1):
                if t == token_id:
                    rank = ranks[pos] if pos < len(ranks) and ranks[pos] is not None else rank
                entry[str(t)] = {"logprob": _finite(lp), "rank": rank, "decoded_token": s.text(t)}
            out.append(entry)
        return out

    def _format_logprobs(self, entries: list[tuple[int, float, list[tuple[int, float]]]]) -> dict:
        s = self.strings
        if self.kind == "chat":
            content = [{"token": s.text(t), "logprob": _finite(lp), "bytes": s.bytes(t),
                        "top_logprobs": [{"token": s.text(a), "logprob": _finite(alp), "bytes": s.bytes(a)}
                                         for a, alp in top]}
                       for t, lp, top in entries]
            return {"content": content}
        tokens, offsets = [], []
        for t, _, _ in entries:
            tokens.append(s.text(t))
            offsets.append(self._text_offset)
            self._text_offset += len(tokens[-1])
        return {"tokens": tokens,
                "token_logprobs": [None if lp is None else _finite(lp) for _, lp, _ in entries],
                "top_logprobs": [None if top is None else {s.text(a): _finite(alp) for a, alp in [(t, lp), *top]}
                                 for t, lp, top in entries],
                "text_offset": offsets}

    def choice(self, text: str, logprobs: dict | None, *, stream: bool, first: bool = False) -> dict:
        """This choice as a response (``stream=False``) or chunk entry; ``first`` adds chat's ``role``."""
        out: dict = {"index": self.index}
        if self.kind == "completion":
            out["text"] = text
        elif first:
            out["delta"] = {"role": "assistant", "content": text}
        elif self.tools is not None:
            out["delta" if stream else "message"] = self._tool_message(text, stream)
        elif stream:
            out["delta"] = {"content": text} if text else {}
        else:
            out["message"] = {"role": "assistant", "content": text}
        out["logprobs"] = logprobs
        reason = self.finish_reason if self.finish_reason in ("stop", "length") and not first else None
        if reason == "stop" and self.tools is not None and self.tools.num_calls and not self.named_tool:
            reason = "tool_calls"
        out["finish_reason"] = reason
        if not stream and self.kind == "completion" and self.prompt_logprobs is not None:
            out["prompt_logprobs"] = self.prompt_logprobs_json()
        return out

    def _tool_message(self, text: str, stream: bool) -> dict:
        """Chat content and tool calls of ``text``: a delta (stream) or the whole message."""
        if stream:
            content, calls = self.tools.feed(text, final=self.finished)
            delta: dict = {"content": content} if content else {}
            if calls:
                delta["tool_calls"] = calls
            return delta
        self.tools.feed(self._text, final=True)
        snapshot = self.tools.parse(self._text, True)
        calls = tool_calls(snapshot)
        content = snapshot.content.strip() if calls else snapshot.content
        message: dict = {"role": "assistant", "content": content or (None if calls else "")}
        if calls:
            message["tool_calls"] = calls
        return message


# ---- responses -----------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_response(request_id: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    """``choices``: ``{"index", "text", "logprobs", "finish_reason"}`` each."""
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}


def chat_response(request_id: str, created: int, model: str, choices: list[dict], usage_: dict,
                  prompt_logprobs: list | None = None) -> dict:
    """``choices``: ``{"index", "message": {"role", "content"}, "logprobs", "finish_reason"}`` each;
    ``prompt_logprobs`` (vLLM's field) when asked for."""
    out = {"id": request_id, "object": "chat.completion", "created": created, "model": model,
           "choices": choices, "usage": usage_}
    if prompt_logprobs is not None:
        out["prompt_logprobs"] = prompt_logprobs
    return out


def chunk(kind: str, request_id: str, created: int, model: str, choices: list[dict],
          usage_: dict | None = None) -> dict:
    """One stream event; ``choices`` as in the responses, with ``delta`` instead of ``message`` for chat."""
    obj = {"id": request_id, "object": "text_completion" if kind == "completion" else "chat.completion.chunk",
           "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        obj["usage"] = usage_
    return obj


def models_response(model_name: str, created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [model_card(model_name, created, max_model_len)]}


def model_card(model_name: str, created: int, max_model_len: int) -> dict:
    return {"id": model_name, "object": "model", "created": created, "owned_by": "duet",
            "max_model_len": max_model_len}


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
