"""A request's state inside one engine: tokens, KV blocks, progress and sampling state."""
from __future__ import annotations

import enum
import time
from typing import Optional

import torch

from duet.engine.block_hash import ROOT_HASH, hash_block
from duet.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    """Queued for (re)prefill."""
    WAITING_FOR_KV = "waiting_for_kv"
    """Decode side of a disaggregated request: blocks allocated, KV arriving from a prefill server."""
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """Mutable per-request state. Owned by the scheduler; the runner only reads it."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float | None = None,
    ):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[dict[int, float]] = []
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        """Tokens whose K/V are in this request's blocks."""
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []
        """Chained hashes of this request's full blocks (prompt + output), computed incrementally."""
        self.num_registered_blocks = 0
        """Leading ``block_ids`` already in the prefix cache: ``cache_computed_blocks`` resumes after them."""
        self.num_cached_tokens = 0
        """Prompt tokens served from the prefix cache at the last admission."""
        self.num_preemptions = 0
        self.finish_reason: Optional[str] = None
        """``stop`` (EOS, stop token or stop string), ``length`` or ``abort``."""
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        """With finish_reason ``error``: why (safe to show the client)."""
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.first_token_time: float | None = None
        self.argmax_only = (
            params.greedy and params.logprobs is None and params.min_tokens == 0 and params.repetition_penalty == 1.0
            and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0
            and not params.needs_token_constraints
        )
        """``params`` sample by a bare argmax of the logits (greedy; no penalties, min_tokens, logprobs, biases,
        allowed/bad tokens or grammar)."""
        self.sampler_cache: dict[str, torch.Tensor] = {}
        """Tensors the sampler derives once from ``params`` (logit_bias ids and values, the allowed-token mask)."""
        self.grammar = None
        """``engine.structured_output.GrammarState`` when ``params.structured_outputs`` is set (the engine sets
        it); it has accepted every token of ``output_token_ids``."""
        self.wants_prompt_logprobs = params.prompt_logprobs is not None
        self.prompt_logprobs: list[dict[int, float] | None] = [None] if self.wants_prompt_logprobs else []
        """Per prompt position computed so far: the prompt token and its top alternatives -> logprob (position 0,
        which has no context, is None). Filled chunk by chunk during prefill; kept across preemption."""
        self.prompt_token_ranks: list[int | None] = [None] if self.wants_prompt_logprobs else []
        """Rank of each prompt token in its position's distribution (1 = most likely); position 0 is None."""
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)

    @property
    def num_prompt_logprob_rows(self) -> int:
        """Logit rows (positions 0..n-1, each predicting the next prompt token) whose prompt logprobs are known."""
        return max(0, len(self.prompt_logprobs) - 1)

    @property
    def prompt_logprobs_done(self) -> bool:
        return len(self.prompt_logprobs) >= len(self.prompt_token_ids)

    @property
    def max_prefix_hit_tokens(self) -> int:
        """Most prompt tokens a prefix-cache hit may cover: a cached token has no logits, so a request still
        missing prompt logprobs may only skip positions whose logprobs it already has."""
        if self.wants_prompt_logprobs and not self.prompt_logprobs_done:
            return self.num_prompt_logprob_rows
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def ready(self) -> bool:
        """Nothing keeps the scheduler from running it (its grammar, if any, finished compiling)."""
        return self.grammar is None or self.grammar.ready

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_id(self, idx: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[idx] if idx < p else self.output_token_ids[idx - p]

    def token_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    def update_block_hashes(self, block_size: int) -> list[int]:
        """Extend ``block_hashes`` to every full block of the current tokens; returns them."""
        num_full = self.num_tokens // block_size
        while len(self.block_hashes) < num_full:
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else ROOT_HASH
            self.block_hashes.append(hash_block(parent, self.token_slice(i * block_size, (i + 1) * block_size)))
        return self.block_hashes

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.value}, prompt={self.num_prompt_tokens}, "
                f"out={len(self.output_token_ids)}, computed={self.num_computed_tokens})")
