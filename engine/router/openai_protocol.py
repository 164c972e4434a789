"""The OpenAI API wire format: request bodies parsed into ``ParsedRequest``, responses and stream chunks built.

No I/O and no web framework: ``engine.router.app`` reads the body, decodes it with ``decode_body`` (strict
UTF-8 JSON, finite numbers, bounded nesting), calls ``parse_completion`` or ``parse_chat``, tokenizes, asks
``ParsedRequest.sampling_params`` for each choice, feeds every choice's ``TokenDelta``s to a ``ChoiceState``
(detokenization, stop strings, logprobs) and formats the choices it returns with the builders below. Every
rejection is an ``APIError``: HTTP status + OpenAI error body ``{"error": {"message", "type", "param",
"code"}}``, where ``param`` names the offending field.

Hostile input: every size that costs the server work is capped by ``RequestLimits`` and checked before that
work (a list's length before its elements' types, a token-id prompt's length before the vocabulary scan);
integers must fit in int64 and floats must be finite; strings must be valid Unicode (no lone surrogates,
which the tokenizers reject). Sampling values the engine's float32 sampler cannot survive (a temperature
of 1e-40 turns its logits into inf/NaN and fails the whole batch's step) are refused here.

Choice ``index`` follows OpenAI: prompt ``p`` of a completions request with ``n`` choices owns indices
``p * n .. p * n + n - 1``. Choice ``i`` of ``n`` with a ``seed`` samples with ``seed + i``. With ``best_of``
(completions, not streamed) ``best_of`` candidates are generated per prompt and the ``n`` with the highest
mean token logprob are returned.

Beyond the sampling knobs: completions ``echo`` (+ ``logprobs``: prompt tokens scored, the first one
``null``; ``max_tokens: 0`` returns the prompt only, as lm-evaluation-harness asks), vLLM's ``prompt_logprobs``,
``logit_bias``, ``allowed_token_ids``, ``bad_words``, ``min_tokens``; output constraints and tools are read by
``engine.router.constraints``. Fields Duet cannot honour (``UNSUPPORTED``) are refused with a 400 naming them.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields

from duet.engine.router.api_error import APIError, error_body  # noqa: F401 - re-exported
from duet.engine.router.constraints import (ToolMode, parse_structured_outputs, parse_tool_choice, parse_tools,
                                            tool_grammar)
from duet.engine.sampling_params import SamplingParams

MAX_N = 16
"""Most choices per prompt (``n``)."""
MAX_CHOICES = 256
"""Most choices per request (prompts x n)."""
MAX_LOGPROBS = 20
"""The engine's own cap on ``logprobs`` (SamplingParams)."""
MAX_STOP_STRINGS = 16
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
SAFE_SCALE_RANGE = (1e-5, 1e5)
"""Where ``temperature`` (when not 0), ``repetition_penalty`` and ``top_p`` (upper bound 1) must lie: the
sampler divides or multiplies float32 logits by them, and values far outside overflow to inf/NaN."""
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_LOGIT_BIAS_ENTRIES = 1024
UNSUPPORTED = {
    "completion": {"suffix": "suffix (insertion) is not supported", "use_beam_search": "beam search is not supported",
                   "logprob_token_ids": "logprob_token_ids is not supported"},
    "chat": {"functions": "the deprecated functions field is not supported: use tools",
             "function_call": "the deprecated function_call field is not supported: use tool_choice",
             "audio": "audio output is not supported", "prediction": "predicted outputs are not supported",
             "web_search_options": "web search is not supported", "echo": "echo is not supported for chat",
             "use_beam_search": "beam search is not supported", "best_of": "best_of is a completions field",
             "logprob_token_ids": "logprob_token_ids is not supported"},
}
"""Fields refused with a 400 when present (and not null / false / the default): Duet cannot honour them."""
_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


@dataclass(frozen=True)
class RequestLimits:
    """Caps on what one OpenAI request may ask for; a request over any of them gets a 400 naming the field.

    Body and header sizes are HTTP limits and live on ``engine.router.app.create_app``."""

    max_n: int = MAX_N
    """Most choices per prompt (``n``)."""
    max_choices: int = MAX_CHOICES
    """Most choices per request: number of prompts x ``n``."""
    max_prompt_tokens: int | None = None
    """Most tokens in one prompt (after the chat template); ``None``: the model's context (set by the app)."""
    max_messages: int = 4096
    """Most chat ``messages`` (each costs chat-template work before any token count is known)."""
    max_stop_strings: int = MAX_STOP_STRINGS
    """Most ``stop`` strings."""
    max_stop_chars: int = 1024
    """Longest ``stop`` string, in characters (streaming holds back that much text)."""
    max_stop_token_ids: int = 256
    """Most ``stop_token_ids``."""
    max_logprobs: int = MAX_LOGPROBS
    """Most ``logprobs`` (completions) / ``top_logprobs`` (chat) alternatives per token; at most 20."""
    max_json_depth: int = 32
    """Deepest nesting of arrays and objects in the body (the body object itself is depth 1)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "max_prompt_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
        if self.max_logprobs > MAX_LOGPROBS:
            raise ValueError(f"max_logprobs must be <= {MAX_LOGPROBS} (the engine's cap), got {self.max_logprobs}")
        if self.max_choices < self.max_n:
            raise ValueError(f"max_choices ({self.max_choices}) must be >= max_n ({self.max_n})")


def param_of(message: str, default: str | None = None) -> str | None:
    """The field a ``ValueError`` message starts with (``"max_tokens must be ..."`` -> ``max_tokens``)."""
    m = re.match(r"([a-z_]+)\b", message)
    return m.group(1) if m and (m.group(1) in _SAMPLING_FIELDS or m.group(1) in ("prompt", "messages")) else default


# ---- field readers: type errors name the field -------------------------------------------------------------
def _type_error(name: str, expected: str, value) -> APIError:
    return APIError(f"{name}: expected {expected}, got {type(value).__name__} {_short(value)}", param=name)


def _short(value) -> str:
    """A bounded description of a client's value: never serializes a whole (possibly huge) container."""
    if isinstance(value, list):
        return f"array of {len(value)} items"
    if isinstance(value, dict):
        return f"object with {len(value)} keys"
    if isinstance(value, str) and len(value) > 40:
        value = value[:37]
    text = json.dumps(value, allow_nan=True)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(body: dict, name: str, default=None, lo: int = INT64_MIN, hi: int = INT64_MAX):
    """``body[name]`` as an int in [lo, hi] (by default: int64, so it survives msgpack and torch)."""
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise _type_error(name, "an integer", value)
    if not lo <= value <= hi:
        bounds = f">= {lo}" if hi == INT64_MAX else f"in [{lo}, {hi}]"
        raise APIError(f"{name}: must be {bounds}, got {_short(value)}", param=name)
    return value


def _float(body: dict, name: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(name, "a number", value)
    try:
        number = float(value)  # an int beyond 1.8e308 overflows
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise APIError(f"{name}: must be a finite number, got {_short(value)}", param=name)
    return number


_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value: str, name: str) -> str:
    """A client string the tokenizer will see: JSON's ``\\ud800`` escapes can smuggle in lone surrogates."""
    if _SURROGATE.search(value):
        raise APIError(f"{name}: contains a lone UTF-16 surrogate (not valid Unicode)", param=name)
    return value


def _bool(body: dict, name: str, default=False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(name, "a boolean", value)
    return value


def _int_list(value, name: str, max_len: int | None = None, what: str = "items") -> list[int]:
    if not isinstance(value, list):
        raise _type_error(name, "a list of integers", value)
    if max_len is not None and len(value) > max_len:  # before the element scan: 10**6 ids are rejected fast
        raise APIError(f"{name}: {len(value)} {what} exceeds the limit of {max_len}", param=name)
    if not all(_is_int(t) for t in value):
        raise _type_error(name, "a list of integers", value)
    return value


# ---- the body ------------------------------------------------------------------------------------------------
def decode_body(raw: bytes, limits: RequestLimits) -> object:
    """The JSON value of a request body; raises ``APIError`` (400) for anything but strict UTF-8 JSON with
    finite numbers nested at most ``limits.max_json_depth`` deep. The error's ``param`` is the top-level
    field that holds the offending value."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        # NaN / Infinity are not JSON; parsed as floats here so the walk below names their field.
        body = json.loads(text, parse_constant=float)
    except RecursionError:
        raise APIError(f"request body: JSON nested deeper than {limits.max_json_depth} levels") from None
    except ValueError as e:  # JSONDecodeError, or an integer over Python's 4300-digit limit
        raise APIError(f"invalid JSON body: {e}") from None
    _check_tree(body, limits.max_json_depth)
    return body


def _check_tree(body, max_depth: int) -> None:
    """Depth and finiteness of every value, without recursion (one pass; 10**6 ints take ~0.1 s)."""
    if not isinstance(body, (float, list, dict)):
        return
    stack: list[tuple[object, int, str | None]] = [(body, 1, None)]
    while stack:
        value, depth, name = stack.pop()
        if isinstance(value, float):
            if not math.isfinite(value):
                raise APIError(f"{name or 'request body'}: {value} is not a finite number (NaN, Infinity and "
                               "numbers beyond the range of a double are refused)", param=name)
            continue
        if depth > max_depth:
            raise APIError(f"{name or 'request body'}: JSON nested deeper than {max_depth} levels", param=name)
        top = depth == 1 and isinstance(value, dict)
        for key, child in (value.items() if isinstance(value, dict) else enumerate(value)):
            if isinstance(child, (float, list, dict)):
                stack.append((child, depth + 1, key if top else name))


# ---- requests ------------------------------------------------------------------------------------------------
@dataclass
class ParsedRequest:
    """One validated OpenAI request, before tokenization."""

    kind: str
    """``completion`` or ``chat``."""
    prompts: list[str | list[int]] = field(default_factory=list)
    """Completions: text or token-id prompts, one group of ``n`` choices each."""
    messages: list[dict[str, str]] = field(default_factory=list)
    """Chat: ``{"role", "content"}`` with content flattened to text."""
    n: int = 1
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"
    """The field ``max_tokens`` came from (chat: ``max_completion_tokens`` when that was used)."""
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    seed: int | None = None
    sampling: dict = field(default_factory=dict)
    """SamplingParams fields other than max_tokens, seed and stop."""
    max_prompt_tokens: int | None = None
    """``RequestLimits.max_prompt_tokens``, checked by ``check_prompt`` on the tokenized prompt."""
    echo: bool = False
    """Completions: the prompt precedes the completion in ``text`` (and in ``logprobs`` when asked)."""
    best_of: int | None = None
    """Completions: candidates generated per prompt, of which the ``n`` best are returned (> n)."""
    bad_words: list[str] = field(default_factory=list)
    """Tokenized by the front end into ``bad_words_token_ids``."""
    tools: list[dict] | None = None
    """Chat: function tools, as passed to the chat template."""
    tool_mode: ToolMode = field(default_factory=lambda: ToolMode("none"))

    @property
    def echo_only(self) -> bool:
        """``echo`` with ``max_tokens: 0``: score and return the prompt, generate nothing."""
        return self.echo and self.max_tokens == 0

    @property
    def num_candidates(self) -> int:
        """Choices generated per prompt (``best_of`` when larger than ``n``)."""
        return max(self.n, self.best_of or 0)

    @property
    def prompt_param(self) -> str:
        return "prompt" if self.kind == "completion" else "messages"

    @property
    def logprobs_param(self) -> str:
        return "logprobs" if self.kind == "completion" else "top_logprobs"

    def check_prompt(self, token_ids: list[int], vocab_size: int) -> None:
        if not token_ids:
            raise APIError(f"{self.prompt_param}: must contain at least one token", param=self.prompt_param)
        if self.max_prompt_tokens is not None and len(token_ids) > self.max_prompt_tokens:
            raise APIError(f"{self.prompt_param}: {len(token_ids)} tokens exceeds the limit of "
                           f"{self.max_prompt_tokens} prompt tokens", param=self.prompt_param)
        for t in token_ids:
            if not 0 <= t < vocab_size:
                raise APIError(f"{self.prompt_param}: token id {t} is outside the vocabulary [0, {vocab_size})",
                               param=self.prompt_param)
        for t in self.sampling.get("stop_token_ids", ()):
            if not 0 <= t < vocab_size:
                raise APIError(f"stop_token_ids: {t} is outside the vocabulary [0, {vocab_size})",
                               param="stop_token_ids")

    def sampling_params(self, num_prompt_tokens: int, choice_idx: int, *, max_model_len: int,
                        max_default_tokens: int) -> SamplingParams:
        """Params of choice ``choice_idx`` (0..n-1) for a prompt of ``num_prompt_tokens``; no stop strings."""
        room = max_model_len - num_prompt_tokens
        if self.max_tokens is None:
            if room < 1:
                raise APIError(f"{self.prompt_param}: the prompt has {num_prompt_tokens} tokens, which leaves no "
                               f"room to generate within the model's context of {max_model_len} tokens",
                               param=self.prompt_param)
            max_tokens = min(room, max(max_default_tokens, self.sampling.get("min_tokens", 0)))
        elif self.max_tokens > room:
            raise APIError(f"{self.max_tokens_param}: prompt ({num_prompt_tokens} tokens) + {self.max_tokens_param} "
                           f"({self.max_tokens}) exceeds the model's context of {max_model_len} tokens",
                           param=self.max_tokens_param)
        else:
            max_tokens = max(self.max_tokens, 1)  # echo-only runs one token and drops it (vLLM does the same)
        seed = None if self.seed is None else self.seed + choice_idx
        return self._build(max_tokens=max_tokens, seed=seed, **self.sampling)

    def _build(self, **kwargs) -> SamplingParams:
        try:
            return SamplingParams(**kwargs)
        except ValueError as e:
            param = param_of(str(e))
            param = {"max_tokens": self.max_tokens_param, "logprobs": self.logprobs_param}.get(param, param)
            raise APIError(str(e), param=param) from None


def _check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise _type_error("model", "a string", model)
    if model != model_name:
        raise APIError(f"The model `{model}` does not exist; this server serves `{model_name}`.", status=404,
                       param="model", code="model_not_found")


def _parse_common(body: dict, kind: str, defaults: dict | None, limits: RequestLimits) -> ParsedRequest:
    req = ParsedRequest(kind=kind, max_prompt_tokens=limits.max_prompt_tokens)
    req.n = _int(body, "n", 1, 1, limits.max_n)
    req.stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _type_error("stream_options", "an object", options)
        req.include_usage = req.stream and _bool(options, "include_usage")
    req.stop = _stop_strings(body.get("stop"), limits)
    req.include_stop_str_in_output = _bool(body, "include_stop_str_in_output")
    req.seed = _int(body, "seed")
    for name, why in UNSUPPORTED[kind].items():
        if body.get(name) not in (None, False, "", [], {}):
            raise APIError(f"{name}: {why}", param=name)

    sampling = {k: v for k, v in (defaults or {}).items() if k in _SAMPLING_FIELDS - {"max_tokens", "seed", "stop"}}
    floats = {name: _float(body, name) for name in ("temperature", "top_p", "min_p", "presence_penalty",
                                                     "frequency_penalty", "repetition_penalty")}
    floats = {name: value for name, value in floats.items() if value is not None}
    _check_scales(floats)
    sampling.update(floats)
    for name in ("top_k", "min_tokens"):
        value = _int(body, name)
        if value is not None:
            sampling[name] = value
    if body.get("stop_token_ids") is not None:
        sampling["stop_token_ids"] = _int_list(body["stop_token_ids"], "stop_token_ids", limits.max_stop_token_ids,
                                               "stop token ids")
    sampling["ignore_eos"] = _bool(body, "ignore_eos")
    if body.get("logit_bias") is not None:
        sampling["logit_bias"] = _logit_bias(body["logit_bias"])
    if body.get("allowed_token_ids") is not None:
        sampling["allowed_token_ids"] = _int_list(body["allowed_token_ids"], "allowed_token_ids")
        if not sampling["allowed_token_ids"]:
            raise APIError("allowed_token_ids: must not be empty", param="allowed_token_ids")
    if body.get("bad_words") is not None:
        req.bad_words = _stop_strings(body["bad_words"], limits, "bad_words")
        sampling["bad_words"] = req.bad_words
    prompt_logprobs = _int(body, "prompt_logprobs", None, 0, limits.max_logprobs)
    if prompt_logprobs is not None:
        if req.stream:
            raise APIError("prompt_logprobs: not available when stream=true", param="prompt_logprobs")
        sampling["prompt_logprobs"] = prompt_logprobs
    structured = parse_structured_outputs(body)
    if structured is not None:
        sampling["structured_outputs"] = structured
    req.sampling = sampling
    return req


def _logit_bias(value) -> dict[int, float]:
    """OpenAI's ``{"token id": bias}`` (string keys, as JSON has them) as token id -> bias in [-100, 100]."""
    if not isinstance(value, dict):
        raise _type_error("logit_bias", "an object of token id -> bias", value)
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise APIError(f"logit_bias: {len(value)} entries exceeds the limit of {MAX_LOGIT_BIAS_ENTRIES}",
                       param="logit_bias")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(f"logit_bias: key {_short(key)} is not a token id", param="logit_bias") from None
        if not 0 <= token < INT64_MAX:
            raise APIError(f"logit_bias: key {_short(key)} is not a token id", param="logit_bias")
        number = _float({"logit_bias": bias}, "logit_bias")
        if number is None or not -100 <= number <= 100:
            raise APIError(f"logit_bias: bias of token {token} must be in [-100, 100], got {_short(bias)}",
                           param="logit_bias")
        out[token] = number
    return out


def _stop_strings(stop, limits: RequestLimits, name: str = "stop") -> list[str]:
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list):
        raise APIError(f"{name}: expected a non-empty string or a list of non-empty strings", param=name)
    if len(stop) > limits.max_stop_strings:
        raise APIError(f"{name}: at most {limits.max_stop_strings} strings, got {len(stop)}", param=name)
    if any(not isinstance(s, str) or not s for s in stop):
        raise APIError(f"{name}: expected a non-empty string or a list of non-empty strings", param=name)
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise APIError(f"{name}: a string is longer than the limit of {limits.max_stop_chars} characters",
                       param=name)
    return [_text(s, name) for s in stop]


def _check_scales(sent: dict[str, float]) -> None:
    """``SAFE_SCALE_RANGE`` on the values the client sent (generation_config.json defaults are the operator's)."""
    lo, hi = SAFE_SCALE_RANGE
    temperature = sent.get("temperature", 0.0)
    if temperature != 0 and not lo <= temperature <= hi:
        raise APIError(f"temperature: must be 0 (greedy) or in [{lo:g}, {hi:g}], got {temperature:g}",
                       param="temperature")
    for name, top in (("repetition_penalty", hi), ("top_p", 1)):
        if name in sent and not lo <= sent[name] <= top:
            raise APIError(f"{name}: must be in [{lo:g}, {top:g}], got {sent[name]:g}", param=name)


def _finish_parse(req: ParsedRequest, body: dict, max_tokens_name: str) -> ParsedRequest:
    req.max_tokens_param = max_tokens_name
    req.max_tokens = _int(body, max_tokens_name, None, 0 if req.echo else 1)
    # Validate every sampling field now, so errors surface before any tokenization.
    min_tokens = req.sampling.get("min_tokens", 0)
    req._build(max_tokens=req.max_tokens or max(min_tokens, 1), seed=req.seed, **req.sampling)
    if req.seed is not None and req.seed + req.n - 1 >= 2**63:
        raise APIError(f"seed: seed + n - 1 must be < 2**63, got {req.seed}", param="seed")
    return req


def _prompts(prompt, n: int, limits: RequestLimits) -> list[str | list[int]]:
    """Completions' ``prompt`` as a list of prompts; sizes are checked before element types."""
    shapes = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt is None:
        raise APIError("prompt: required", param="prompt")
    elif not isinstance(prompt, list) or not prompt:
        raise APIError(f"prompt: expected {shapes}", param="prompt")
    elif _is_int(prompt[0]):
        prompts = [_int_list(prompt, "prompt", limits.max_prompt_tokens, "tokens")]
    else:
        if len(prompt) * n > limits.max_choices:
            raise APIError(f"prompt: {len(prompt)} prompts x n={n} exceeds {limits.max_choices} choices",
                           param="prompt")
        if all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        elif all(isinstance(p, list) for p in prompt):
            prompts = [_int_list(p, "prompt", limits.max_prompt_tokens, "tokens") for p in prompt]
        else:
            raise APIError(f"prompt: expected {shapes}", param="prompt")
    if any(len(p) == 0 for p in prompts):
        raise APIError("prompt: must not be empty", param="prompt")
    return [_text(p, "prompt") if isinstance(p, str) else p for p in prompts]


def parse_completion(body, *, model_name: str, defaults: dict | None = None,
                     limits: RequestLimits | None = None) -> ParsedRequest:
    """Validate a ``POST /v1/completions`` body; raises ``APIError``."""
    limits = limits or RequestLimits()
    if not isinstance(body, dict):
        raise APIError("request body must be a JSON object")
    _check_model(body, model_name)
    req = _parse_common(body, "completion", defaults, limits)
    req.prompts = _prompts(body.get("prompt"), req.n, limits)
    logprobs = _int(body, "logprobs", None, 0, limits.max_logprobs)
    if logprobs is not None:
        req.sampling["logprobs"] = logprobs
    req.echo = _bool(body, "echo")
    if req.echo and logprobs is not None and "prompt_logprobs" not in req.sampling:
        req.sampling["prompt_logprobs"] = logprobs  # the echoed prompt's logprobs (vLLM does the same)
    best_of = _int(body, "best_of", None, 1, limits.max_n)
    if best_of is not None and best_of != req.n:
        if best_of < req.n:
            raise APIError(f"best_of: must be >= n ({req.n}), got {best_of}", param="best_of")
        if req.stream:
            raise APIError("best_of: results cannot be streamed when best_of > n", param="best_of")
        if len(req.prompts) * best_of > limits.max_choices:
            raise APIError(f"best_of: {len(req.prompts)} prompts x best_of={best_of} exceeds "
                           f"{limits.max_choices} choices", param="best_of")
        req.best_of = best_of
    return _finish_parse(req, body, "max_tokens")


def _message_text(content, i: int, role: str) -> str:
    name = f"messages[{i}].content"
    if content is None and role in ("assistant", "tool"):
        return ""
    if isinstance(content, str):
        return _text(content, name)
    if isinstance(content, list) and content:
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(f"{name}: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported",
                               param=name)
            parts.append(_text(part["text"], name))
        return "\n".join(parts)
    raise APIError(f"{name}: expected a string or a non-empty list of text parts", param=name)


def _tool_calls(calls, i: int) -> list[dict]:
    """An assistant message's ``tool_calls``, arguments decoded to objects (chat templates expect mappings)."""
    name = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise _type_error(name, "a list", calls)
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(f"{name}: expected {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                           "\"arguments\"}}}} entries", param=name)
        arguments = fn.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                pass  # left as text: the template renders it as given
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": fn["name"], "arguments": arguments}})
    return out


def parse_chat(body, *, model_name: str, defaults: dict | None = None,
               limits: RequestLimits | None = None) -> ParsedRequest:
    """Validate a ``POST /v1/chat/completions`` body; raises ``APIError``."""
    limits = limits or RequestLimits()
    if not isinstance(body, dict):
        raise APIError("request body must be a JSON object")
    _check_model(body, model_name)
    req = _parse_common(body, "chat", defaults, limits)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("messages: expected a non-empty list of messages", param="messages")
    if len(messages) > limits.max_messages:
        raise APIError(f"messages: {len(messages)} messages exceeds the limit of {limits.max_messages}",
                       param="messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _type_error(f"messages[{i}]", "an object", msg)
        role = msg.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise APIError(f"messages[{i}].role: expected one of {sorted(CHAT_ROLES)}, got {_short(role)}",
                           param=f"messages[{i}].role")
        message = {"role": CHAT_ROLES[role], "content": _message_text(msg.get("content"), i, role)}
        if role == "assistant" and msg.get("tool_calls") is not None:
            message["tool_calls"] = _tool_calls(msg["tool_calls"], i)
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str):
                raise APIError(f"messages[{i}].tool_call_id: a tool message needs the id of the call it answers",
                               param=f"messages[{i}].tool_call_id")
            message["tool_call_id"] = call_id
        if isinstance(msg.get("name"), str):
            message["name"] = msg["name"]
        req.messages.append(message)
    req.tools = parse_tools(body)
    req.tool_mode = parse_tool_choice(body, req.tools)
    grammar = tool_grammar(req.tools, req.tool_mode, _bool(body, "parallel_tool_calls", True)) if req.tools else None
    if grammar is not None:
        if "structured_outputs" in req.sampling:
            raise APIError("tool_choice: a required or named tool call cannot be combined with another output "
                           "constraint (response_format, structured_outputs)", param="tool_choice")
        req.sampling["structured_outputs"] = grammar
    top = _int(body, "top_logprobs", None, 0, limits.max_logprobs)
    if _bool(body, "logprobs"):
        req.sampling["logprobs"] = top or 0
    elif top is not None:
        raise APIError("top_logprobs: requires logprobs to be true", param="top_logprobs")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _finish_parse(req, body, name)


# The output side lives in its own module; re-exported so callers use one namespace.
from duet.engine.router.openai_output import (  # noqa: E402, F401
    TokenStrings,
    ChoiceState,
    usage,
    completion_response,
    chat_response,
    chunk,
    models_response,
    model_card,
    sse,
    SSE_DONE,
)
