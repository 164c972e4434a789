"""Per-request sampling parameters, validated on construction (ValueError names the field).

Every field is wire-encodable (ints, floats, strings, lists and dicts of them, one nested dataclass), so the
router ships a ``SamplingParams`` to prefill and decode servers as it is (``transfer.wire``).
Field names follow vLLM's ``SamplingParams`` wherever the meaning is the same.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

MAX_LOGPROBS = 20
"""Most alternatives per position for ``logprobs`` and ``prompt_logprobs``."""
MAX_LOGIT_BIAS = 100.0
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def _check_number(name: str, value: Any, *, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


@dataclass
class StructuredOutputsParams:
    """A grammar the generated text must match (vLLM's ``StructuredOutputsParams``): exactly one kind is set.

    The engine compiles it into a token-level matcher (``engine.structured_output``) that masks every token
    which cannot continue a match; once the text is complete only EOS is allowed.
    """

    json: str | None = None
    """A JSON schema, as JSON text (a dict is accepted and serialized, key order kept)."""
    regex: str | None = None
    """A regular expression the whole output matches."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """An EBNF grammar (GBNF dialect, ``root ::= ...``)."""
    json_object: bool = False
    """Any JSON object (``response_format: {"type": "json_object"}``)."""
    disable_any_whitespace: bool = False
    """JSON without optional whitespace (compact output; also keeps a weak model from looping on blanks)."""

    def __post_init__(self) -> None:
        if isinstance(self.json, (dict, bool)):
            self.json = json.dumps(self.json, ensure_ascii=False)
        if self.json is not None:
            if not isinstance(self.json, str):
                raise ValueError(f"structured_outputs.json must be a JSON schema, got {type(self.json).__name__}")
            try:
                schema = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("structured_outputs.json must be a JSON schema object")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None:
            if (not isinstance(self.choice, list) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        for name in ("json_object", "disable_any_whitespace"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"structured_outputs.{name} must be a boolean")
        kinds = self.kinds()
        if len(kinds) != 1:
            raise ValueError(f"structured_outputs: exactly one of {list(STRUCTURED_KINDS)} must be set, got "
                             f"{kinds or 'none'}")

    def kinds(self) -> list[str]:
        return [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]

    @property
    def kind(self) -> str:
        return self.kinds()[0]

    def cache_key(self) -> tuple:
        """Equal keys compile to the same grammar."""
        value = getattr(self, self.kind)
        return self.kind, tuple(value) if isinstance(value, list) else value, self.disable_any_whitespace


@dataclass
class SamplingParams:
    """How to sample one request's tokens. ``temperature == 0`` means greedy."""

    max_tokens: int = 16
    """Maximum number of generated tokens (>= 1)."""
    min_tokens: int = 0
    """EOS and stop token ids are ignored until this many tokens were generated."""
    temperature: float = 1.0
    """0 = greedy; otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 or -1 = off)."""
    top_p: float = 1.0
    """Nucleus sampling: smallest set of tokens whose probability mass reaches top_p, in (0, 1]."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's, in [0, 1]."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens, whatever else is batched alongside."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens seen in the prompt or output (divides positive logits, multiplies negative)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from the logit of every generated token, in [-2, 2]."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation ends when the text contains one (the stop string is not returned)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end generation (the token is kept in the output ids, like EOS)."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS token."""
    logprobs: int | None = None
    """If set, return the log-probability of each generated token and of the top-N alternatives (0..20)."""
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    """If set, return the log-probability of every prompt token but the first (which has no context) and of
    the top-N alternatives at each position (0..20). Requests asking for it do not read the prefix cache for
    positions whose logprobs are still missing: a cached prefix has no logits."""
    logit_bias: dict[int, float] | None = None
    """Token id -> value added to its logit before sampling (greedy too), in [-100, 100]."""
    allowed_token_ids: list[int] | None = None
    """Only these token ids may be generated."""
    bad_words: list[str] = field(default_factory=list)
    """Words that must not be generated; turned into ``bad_words_token_ids`` by whoever holds the tokenizer."""
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    """Token sequences that must not be generated: the last token of one is banned when the tokens before it
    were just generated (a one-token sequence is always banned)."""
    structured_outputs: StructuredOutputsParams | None = None
    """A grammar the output must match (JSON schema, regex, choice, EBNF, any JSON object)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check_number("max_tokens", self.max_tokens, integer=True)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        _check_number("min_tokens", self.min_tokens, integer=True)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_number("top_k", self.top_k, integer=True)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _check_number("seed", self.seed, integer=True)
            if not 0 <= self.seed < 2**63:
                raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            _check_number("stop_token_ids", t, integer=True)
        if self.logprobs is not None:
            _check_number("logprobs", self.logprobs, integer=True)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None:
            _check_number("prompt_logprobs", self.prompt_logprobs, integer=True)
            if not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
                raise ValueError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
        self._check_token_constraints()
        if isinstance(self.structured_outputs, dict):
            known = {f.name for f in fields(StructuredOutputsParams)}
            unknown = set(self.structured_outputs) - known
            if unknown:
                raise ValueError(f"structured_outputs: unknown field(s) {sorted(unknown)}")
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams")

    def _check_token_constraints(self) -> None:
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError("logit_bias must map token ids to numbers")
            bias = {}
            for t, v in self.logit_bias.items():
                if isinstance(t, str) and t.lstrip("-").isdigit():
                    t = int(t)  # JSON object keys are strings
                _check_number("logit_bias", t, integer=True)
                _check_number("logit_bias", v)
                if not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
                    raise ValueError(f"logit_bias values must be in [-100, 100], got {v} for token {t}")
                bias[t] = float(v)
            self.logit_bias = bias or None
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, list) or not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must be a non-empty list of token ids")
            for t in self.allowed_token_ids:
                _check_number("allowed_token_ids", t, integer=True)
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        self.bad_words = list(self.bad_words or [])
        for w in self.bad_words:
            if not isinstance(w, str) or not w:
                raise ValueError(f"bad_words must be non-empty strings, got {w!r}")
        self.bad_words_token_ids = [list(seq) for seq in (self.bad_words_token_ids or [])]
        for seq in self.bad_words_token_ids:
            if not seq:
                raise ValueError("bad_words_token_ids must be non-empty token id lists")
            for t in seq:
                _check_number("bad_words_token_ids", t, integer=True)

    def token_ids_in_vocab(self, vocab_size: int) -> None:
        """ValueError naming the field when a token id of these params is outside [0, vocab_size)."""
        checks = (("stop_token_ids", self.stop_token_ids), ("logit_bias", list(self.logit_bias or ())),
                  ("allowed_token_ids", self.allowed_token_ids or ()),
                  ("bad_words_token_ids", [t for seq in self.bad_words_token_ids for t in seq]))
        for name, ids in checks:
            for t in ids:
                if not 0 <= t < vocab_size:
                    raise ValueError(f"{name}: {t} is outside the vocabulary [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_token_constraints(self) -> bool:
        """Some field restricts or shifts the next token's logits beyond temperature/top-k/top-p/min-p."""
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words_token_ids
                    or self.structured_outputs is not None)
