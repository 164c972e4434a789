"""Turning ``StructuredOutputsParams`` into grammars: checked without a tokenizer, compiled against one.

``validate`` builds the tokenizer-free grammar (cheap: no token masks), so the router and the engine refuse a
bad schema, regex or EBNF with a ``ValueError`` that names the field before anything is queued.
``GrammarCompiler.compile_async`` compiles against the engine's tokenizer on one worker thread (xgrammar
precomputes per-rule token masks there: ~20 ms for a small schema over a 131k vocabulary) and caches
compiled grammars by their text, so repeated schemas cost nothing.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

from duet.engine.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

GRAMMAR_CACHE_BYTES = 256 << 20
"""Compiled grammars kept by the compiler (xgrammar's LRU cache)."""
JSON_MAX_WHITESPACE = 16
"""Most whitespace characters in a row between JSON tokens. Unbounded whitespace is valid JSON, but a weak or
uncertain model can emit blanks forever without closing the object; 16 still fits newline + indentation of
pretty-printed JSON 7 levels deep (``disable_any_whitespace`` allows none)."""
ANY_OBJECT = '{"type": "object"}'
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def _import_xgrammar():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - xgrammar ships with the install
        raise ValueError(f"structured_outputs: the grammar engine (xgrammar) is not installed ({e})") from None
    return xgrammar


def _choice_ebnf(choices: Sequence[str]) -> str:
    # JSON string literals are valid EBNF literals in xgrammar's dialect (same escapes, \uXXXX included).
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def _schema(params: StructuredOutputsParams) -> str:
    """The JSON schema as xgrammar should see it.

    xgrammar 0.2.8 turns a string with ``minLength``/``maxLength`` (and no ``pattern``) into a rule that admits
    raw control characters, which JSON forbids (``json.loads`` rejects the output). The same bounds written as
    a ``pattern`` go through its JSON-string regex path, which escapes correctly; so bounded strings are
    rewritten that way, as a class without control characters, quote, backslash and the UTF-16 surrogate
    range (xgrammar counts an encoded surrogate as one character; it is not valid UTF-8 and decodes to three
    U+FFFD, which breaks ``maxLength``). A string the rewritten schema accepts is one the original accepts.
    """
    schema = json.loads(params.json)
    if _rewrite_bounded_strings(schema):
        return json.dumps(schema, ensure_ascii=False)
    return params.json


def _rewrite_bounded_strings(node) -> bool:
    changed = False
    if isinstance(node, dict):
        bounded = "minLength" in node or "maxLength" in node
        if (node.get("type") == "string" and bounded and not {"pattern", "format", "enum", "const"} & node.keys()
                and all(isinstance(node.get(k, 0), int) for k in ("minLength", "maxLength"))):
            lo, hi = node.pop("minLength", 0), node.pop("maxLength", "")
            node["pattern"] = f"^[^\\x00-\\x1f\"\\\\\\ud800-\\udfff]{{{lo},{hi}}}$"
            changed = True
        for value in node.values():
            changed |= _rewrite_bounded_strings(value)
    elif isinstance(node, list):
        for value in node:
            changed |= _rewrite_bounded_strings(value)
    return changed


def _json_kwargs(params: StructuredOutputsParams) -> dict:
    if params.disable_any_whitespace:
        return {"any_whitespace": False}
    return {"any_whitespace": True, "max_whitespace_cnt": JSON_MAX_WHITESPACE}


def _error(params: StructuredOutputsParams, e: Exception) -> ValueError:
    message = _XGRAMMAR_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return ValueError(f"structured_outputs.{params.kind}: {message}")


def _grammar(params: StructuredOutputsParams):
    """The tokenizer-free ``xgrammar.Grammar``; ValueError naming ``structured_outputs.<kind>``."""
    xgr = _import_xgrammar()
    try:
        kind = params.kind
        if kind == "json":
            return xgr.Grammar.from_json_schema(_schema(params), **_json_kwargs(params))
        if kind == "json_object":
            return xgr.Grammar.from_json_schema(ANY_OBJECT, strict_mode=False, **_json_kwargs(params))
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(_choice_ebnf(params.choice))
        return xgr.Grammar.from_ebnf(params.grammar)
    except (RuntimeError, ValueError, TypeError) as e:
        raise _error(params, e) from None


def validate(params: StructuredOutputsParams) -> None:
    """ValueError (naming ``structured_outputs.<kind>``) when the grammar cannot be built; no tokenizer needed."""
    _grammar(params)


def ebnf(params: StructuredOutputsParams) -> str:
    """The grammar as EBNF text (xgrammar's dialect), exactly what the native engine enforces: handed to vLLM's
    ``StructuredOutputsParams.grammar`` so both executors constrain alike (vLLM would otherwise apply its own
    schema conversion, with unbounded whitespace, per-engine whitespace options and no bounded-string fix)."""
    return str(_grammar(params))


class GrammarCompiler:
    """Compiles grammars against one tokenizer. Created by ``LLMEngine``; used from the engine thread.

    ``vocab_size`` is the model's (logit rows), which may exceed the tokenizer's: padding ids are never
    allowed. ``stop_token_ids`` are the tokens a finished grammar allows (the engine's EOS ids).
    The tokenizer table is built on the worker thread at the first compile (~0.7 s for 131k tokens).
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int], max_threads: int = 1,
                 load_tokenizer: Callable[[], object] | None = None):
        """``tokenizer``: the engine's; None with ``load_tokenizer``, which the worker thread calls at the first
        compile (a server's engine has no tokenizer of its own, and loading one takes seconds: not on its loop)."""
        if tokenizer is None and load_tokenizer is None:
            raise ValueError("GrammarCompiler needs a tokenizer or a way to load one")
        self.tokenizer = tokenizer
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = [t for t in stop_token_ids if 0 <= t < vocab_size]
        self.max_threads = max_threads
        self._compiler = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="duet-grammar")

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    try:
                        self.tokenizer = self._load_tokenizer()
                    except (OSError, ValueError) as e:
                        raise ValueError(f"structured_outputs: grammars need the model's tokenizer ({e})") from None
                xgr = _import_xgrammar()
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=self.max_threads, cache_enabled=True,
                                                     cache_limit_bytes=GRAMMAR_CACHE_BYTES)
            return self._compiler

    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar (an ``xgrammar.CompiledGrammar``); blocks. ValueError for a bad grammar."""
        compiler = self._get_compiler()
        try:
            kind = params.kind
            if kind == "json":
                return compiler.compile_json_schema(_schema(params), **_json_kwargs(params))
            if kind == "json_object":  # an object, not any JSON value (xgrammar's builtin grammar takes both)
                return compiler.compile_json_schema(ANY_OBJECT, strict_mode=False, **_json_kwargs(params))
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                return compiler.compile_grammar(_choice_ebnf(params.choice))
            return compiler.compile_grammar(params.grammar)
        except (RuntimeError, ValueError, TypeError) as e:
            raise _error(params, e) from None

    def compile_async(self, params: StructuredOutputsParams) -> Future:
        """``compile`` on the worker thread."""
        return self._pool.submit(self.compile, params)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
