"""What the engine returns for a request: cumulative results plus the delta since the last output."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    """All generated token ids so far."""
    text: str
    """All generated text so far (empty when the engine has no tokenizer)."""
    finished: bool
    finish_reason: str | None = None
    """``stop`` (EOS, stop token id, stop string or a completed grammar), ``length``, ``abort`` or ``error``."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended generation, if any."""
    logprobs: list[dict[int, float]] | None = None
    """Per generated token: sampled token and top-N alternatives -> log-probability."""
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """Once, in the first output after the prompt was scored (``SamplingParams.prompt_logprobs``): per prompt
    position, the prompt token then its top alternatives -> logprob; position 0 is None."""
    prompt_token_ranks: list[int | None] | None = None
    """With ``prompt_logprobs``: each prompt token's rank in its position's distribution (1 = most likely)."""
    error: str | None = None
    """With finish_reason ``error``: what went wrong (a grammar that failed to compile, say)."""
