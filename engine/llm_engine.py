"""The engine loop: requests in, one ``step()`` at a time, ``RequestOutput``s out.

``LLMEngine`` is synchronous and single-threaded; ``engine.LLM`` drives it for batch use and
``engine.AsyncEngine`` runs it on a worker thread for streaming. Servers drive it from their own loops.
Bad input is rejected in ``add_request`` with a ``ValueError`` naming the field, before anything is
allocated, so one bad request never disturbs the others.

Structured outputs: ``make_request`` checks the grammar (no tokenizer needed) and starts compiling it on the
compiler's thread; the scheduler runs the request once compiled. Every appended token (sampled here, or the
first token handed over by a prefill server) advances the request's matcher; a finished grammar ends the
request (``stop``), a token the grammar refuses ends it with ``error``.

Prompt logprobs: the runner scores the prompt positions of each prefill chunk; the request keeps them and
its first output carries them all (``RequestOutput.prompt_logprobs``).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from duet.engine.block_manager import BlockManager
from duet.engine.config import EngineConfig
from duet.engine.detokenizer import IncrementalDetokenizer
from duet.engine.kv_tier.block_copier import CopyJob
from duet.engine.kv_tier.host_tier import HostKVTier
from duet.engine.kv_tier.kv_fetch import KVFetch
from duet.engine.model_config import ModelConfig
from duet.engine.model_runner import ModelRunner
from duet.engine.models.decoder import LayerHook
from duet.engine.outputs import RequestOutput
from duet.engine.parallel.layout import validate_parallel
from duet.engine.request import Request
from duet.engine.model_runner import RunnerOutput
from duet.engine.sampler import PromptLogprobs, SampleResult
from duet.engine.sampling_params import SamplingParams
from duet.engine.scheduler import Scheduler, SchedulerOutput
from duet.engine.structured_output import GrammarCompiler, GrammarState, validate as validate_grammar
from duet.engine.tokenizer import (bad_words_token_ids, generation_config_dir, generation_defaults, generation_eos_ids,
                              load_tokenizer)

logger = logging.getLogger(__name__)


GRAMMAR_WAIT_S = 0.005
"""An idle step with grammars compiling waits this long for one (instead of spinning)."""


@dataclass
class _Tracked:
    request: Request
    detok: IncrementalDetokenizer | None
    num_returned_tokens: int = 0
    prompt_logprobs_returned: bool = False


class LLMEngine:
    def __init__(self, config: EngineConfig, load_tokenizer_: bool = True):
        self.config = config
        self.model_config = ModelConfig.from_pretrained(config.model)
        mc = self.model_config
        limit = mc.max_position_embeddings
        if mc.sliding_window:
            limit = min(limit, mc.sliding_window)
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's limit of {limit} tokens")
        self.max_model_len = config.max_model_len or limit
        validate_parallel(config.tensor_parallel_size, config.pipeline_parallel_size, config.expert_parallel, mc)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model) if load_tokenizer_ else None
        generation_dir = generation_config_dir(config.model, config.generation_config)
        self.eos_token_ids = tuple(dict.fromkeys(mc.eos_token_ids + generation_eos_ids(generation_dir)))
        self.default_sampling = generation_defaults(generation_dir)
        if config.world_size > 1:
            from duet.engine.parallel.workers import start_parallel_runner  # starts worker processes

            self.runner = start_parallel_runner(config, mc, self.max_model_len)
        else:
            self.runner = ModelRunner(config, mc, self.max_model_len)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_batched_tokens, config.max_num_seqs)
        self.tier: HostKVTier | None = None
        """The host KV tier (``config.host_kv_cache_bytes`` > 0)."""
        if config.host_kv_cache_bytes:
            num_host_blocks = config.host_kv_cache_bytes // self.runner.bytes_per_block
            if num_host_blocks < 1:
                raise ValueError(f"host_kv_cache_bytes: {config.host_kv_cache_bytes} bytes hold no KV block of "
                                 f"{self.runner.bytes_per_block} bytes")
            self.tier = self.scheduler.tier = HostKVTier(self.block_manager, self.runner.kv_cache, num_host_blocks)
        self.packs_done: list[CopyJob] = []
        """Ended copies of cached blocks into pull slabs (``HostKVTier.pack``), for the server to take."""
        self._tracked: dict[str, _Tracked] = {}
        self._finished_outputs: list[RequestOutput] = []
        self._grammar_compiler: GrammarCompiler | None = None
        self.num_prompt_tokens_computed = 0
        """Prompt tokens this engine ran through the model (prefix hits and remote KV excluded)."""
        self.num_generated_tokens = 0

    def close(self) -> None:
        """Stop the model-parallel worker processes, if any; the engine cannot step afterwards. Idempotent."""
        if self.tier is not None:
            self.tier.close()
        self.runner.close()
        if self._grammar_compiler is not None:
            self._grammar_compiler.close()

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """Compiles structured-output grammars against this engine's tokenizer (created at first use)."""
        if self._grammar_compiler is None:
            source = self.config.tokenizer or self.config.model
            self._grammar_compiler = GrammarCompiler(
                self.tokenizer, self.model_config.vocab_size, self.eos_token_ids,
                load_tokenizer=None if self.tokenizer is not None else lambda: load_tokenizer(source))
        return self._grammar_compiler

    # ---- requests ------------------------------------------------------------------------------------
    def default_sampling_params(self, **overrides) -> SamplingParams:
        """SamplingParams seeded with the checkpoint's generation_config.json, then ``overrides``."""
        return SamplingParams(**{**self.default_sampling, **overrides})

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> list[int]:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = list(prompt_token_ids)
        if not ids:
            raise ValueError("prompt: must contain at least one token")
        vocab = self.model_config.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt_token_ids: token id {t!r} is outside the vocabulary [0, {vocab})")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {self.max_model_len} tokens"
            )
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if len(ids) + params.max_tokens > capacity:
            raise ValueError(
                f"max_tokens: prompt ({len(ids)}) + max_tokens ({params.max_tokens}) exceeds the KV pool "
                f"({capacity} tokens)"
            )
        params.token_ids_in_vocab(vocab)
        if params.structured_outputs is not None:
            validate_grammar(params.structured_outputs)
        return ids

    def make_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None) -> Request:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        if request_id in self._tracked:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params if params is not None else self.default_sampling_params()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text prompts need a tokenizer; pass token ids")
            if not prompt:
                raise ValueError("prompt: must not be empty")
            prompt = self.tokenizer.encode(prompt)
        if params.bad_words and not params.bad_words_token_ids:
            params = self._tokenize_bad_words(params)
        ids = self.validate(prompt, params)
        eos = () if params.ignore_eos else self.eos_token_ids
        req = Request(request_id, ids, params, eos)
        if params.structured_outputs is not None:
            req.grammar = GrammarState(self.grammar_compiler.compile_async(params.structured_outputs))
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.include_stop_str_in_output)
        elif params.stop:
            raise ValueError("stop: stop strings need a tokenizer")
        self._tracked[request_id] = _Tracked(req, detok)
        return req

    def _tokenize_bad_words(self, params: SamplingParams) -> SamplingParams:
        if self.tokenizer is None:
            raise ValueError("bad_words: need a tokenizer; pass bad_words_token_ids")
        return dataclasses.replace(params, bad_words_token_ids=bad_words_token_ids(self.tokenizer, params.bad_words))

    def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None) -> None:
        req = self.make_request(request_id, prompt, params)
        self.scheduler.add(req)

    def abort_request(self, request_id: str) -> bool:
        """Abort in any state; its blocks are freed now. Returns False for an unknown id."""
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return False
        req = tracked.request
        self.scheduler.remove(req)
        req.finish_reason = "abort"
        self._finished_outputs.append(self._output(tracked, finished=True))
        del self._tracked[request_id]
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._tracked) or bool(self._finished_outputs)

    def get_request(self, request_id: str) -> Request | None:
        t = self._tracked.get(request_id)
        return t.request if t else None

    # ---- the loop ------------------------------------------------------------------------------------
    def step(self, on_schedule: Callable[[SchedulerOutput], LayerHook | None] | None = None) -> list[RequestOutput]:
        """Schedule, run the model once, apply sampled tokens; outputs of requests that progressed.

        ``on_schedule(sched)`` (servers streaming KV out) sees the step's plan before the model runs and may
        return a hook called after each layer.
        """
        outputs, self._finished_outputs = self._finished_outputs, []
        self.advance_tier()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            self._wait_for_grammars()
            return outputs
        layer_hook = on_schedule(sched) if on_schedule is not None else None
        results = self.runner.execute(sched, layer_hook)
        outputs.extend(self.apply_results(sched, results))
        if self.tier is not None:
            self.tier.write_through()
        return outputs

    def _wait_for_grammars(self) -> None:
        """Nothing could run: if a waiting request's grammar is compiling, give it a moment (no busy loop)."""
        pending = [r.grammar for r in self.scheduler.waiting if r.grammar is not None and not r.ready]
        if pending:
            import concurrent.futures

            concurrent.futures.wait([g.compiled for g in pending], timeout=GRAMMAR_WAIT_S,
                                    return_when=concurrent.futures.FIRST_COMPLETED)

    # ---- the host KV tier ----------------------------------------------------------------------------
    def advance_tier(self) -> None:
        """Between steps: write newly cached blocks through to the host tier, and take in ended copies (requests
        whose blocks loaded resume; ended pull packings go to ``packs_done``). A no-op without a tier."""
        if self.tier is None:
            return
        self.tier.write_through()  # blocks cached outside a step (remote KV arrived) before any step evicts them
        for job in self.tier.poll():
            if job.kind == "load":
                if job.tag.ended:
                    self.scheduler.fetch_ended(job.tag)
            else:
                self.packs_done.append(job)

    @property
    def tier_busy(self) -> bool:
        """Tier copies are in flight: the owner should come back soon (``advance_tier`` takes them in)."""
        return self.tier is not None and self.tier.busy

    def add_pulled_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                           num_blocks: int) -> KVFetch | str:
        """Admit a request whose first ``num_blocks`` prompt blocks another server will send (``pull_ended``
        reports how that went); or why nothing is pulled (it was then queued as usual)."""
        req = self.make_request(request_id, prompt_token_ids, params)
        return self.scheduler.admit_for_pull(req, num_blocks)

    def pull_ended(self, request_id: str, ok: bool) -> None:
        """The pulled blocks of ``request_id`` are in place (``ok``) or will not come: it resumes once its other
        fetch parts ended, at the first block not in place."""
        fetch = self.scheduler.fetching.get(request_id)
        if fetch is None:
            return  # aborted
        fetch.finish("peer", ok)
        if fetch.ended:
            self.scheduler.fetch_ended(fetch)

    def apply_results(self, sched: SchedulerOutput, runner_out: RunnerOutput) -> list[RequestOutput]:
        outputs = []
        results = runner_out.samples
        for request_id, scored in runner_out.prompt_logprobs.items():
            tracked = self._tracked.get(request_id)
            if tracked is not None:
                _add_prompt_logprobs(tracked.request, scored)
        cache_computed_blocks = self.block_manager.cache_computed_blocks
        for chunk in sched.chunks:
            req = chunk.request
            start, num_tokens = chunk.start, chunk.num_tokens
            num_prompt_tokens = len(req.prompt_token_ids)
            if start < num_prompt_tokens:
                self.num_prompt_tokens_computed += min(start + num_tokens, num_prompt_tokens) - start
            req.num_computed_tokens += num_tokens
            cache_computed_blocks(req)
            result = results.get(req.request_id)
            if result is not None:
                out = self.append_token(req, result)
                if out is not None:
                    outputs.append(out)
        return outputs

    def append_token(self, req: Request, result: SampleResult) -> RequestOutput | None:
        """Add one sampled token to ``req``, check stop conditions, finish it if done."""
        tracked = self._tracked[req.request_id]
        req.output_token_ids.append(result.token_id)
        self.num_generated_tokens += 1
        if result.logprobs is not None:
            req.output_logprobs.append(result.logprobs)
        if tracked.detok is not None:
            tracked.detok.push(result.token_id)
        if req.grammar is not None:
            req.grammar.accept(result.token_id)
        self._check_stop(req, tracked)
        finished = req.finish_reason is not None
        if finished:
            self.scheduler.remove(req)
            del self._tracked[req.request_id]
        return self._output(tracked, finished)

    def _check_stop(self, req: Request, tracked: _Tracked) -> None:
        p = req.params
        token = req.output_token_ids[-1]
        n = len(req.output_token_ids)
        if req.grammar is not None:
            if req.grammar.error is not None:
                req.finish_reason, req.error = "error", req.grammar.error
                return
            if req.grammar.is_terminated:  # it accepted a stop token: nothing may follow
                req.finish_reason, req.stop_reason = "stop", token
                return
        if n >= p.min_tokens:
            if token in req.eos_token_ids:
                req.finish_reason, req.stop_reason = "stop", token
                return
            if token in p.stop_token_ids:
                req.finish_reason, req.stop_reason = "stop", token
                return
            if tracked.detok is not None and tracked.detok.stop_reason is not None:
                req.finish_reason, req.stop_reason = "stop", tracked.detok.stop_reason
                return
        if n >= p.max_tokens or req.num_tokens >= self.max_model_len:
            req.finish_reason = "length"

    def _output(self, tracked: _Tracked, finished: bool) -> RequestOutput:
        req = tracked.request
        new_ids = req.output_token_ids[tracked.num_returned_tokens:]
        tracked.num_returned_tokens = len(req.output_token_ids)
        prompt_logprobs = prompt_ranks = None
        if req.wants_prompt_logprobs and req.prompt_logprobs_done and not tracked.prompt_logprobs_returned:
            prompt_logprobs, prompt_ranks = list(req.prompt_logprobs), list(req.prompt_token_ranks)
            tracked.prompt_logprobs_returned = True
        text, new_text = "", ""
        if tracked.detok is not None:
            if finished:
                tracked.detok.flush()
            new_text = tracked.detok.take_new_text(finished)
            text = tracked.detok.text
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=list(req.output_token_ids),
            text=text,
            finished=finished,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            logprobs=list(req.output_logprobs) if req.params.logprobs is not None else None,
            new_token_ids=new_ids,
            new_text=new_text,
            num_cached_tokens=req.num_cached_tokens,
            prompt_logprobs=prompt_logprobs,
            prompt_token_ranks=prompt_ranks,
            error=req.error,
        )

    # ---- remote KV (decode side of a disaggregated request) ------------------------------------------
    def add_remote_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams) -> Request | None:
        """Admit a request whose prompt KV will arrive from a prefill server.

        Blocks for the whole prompt are allocated now (prefix-cache hits first: ``req.num_computed_tokens``
        says how many prompt tokens need not be sent). None when the pool has no room (nothing allocated;
        the caller prefills locally instead). ValueError for bad input, as ``add_request``.
        """
        req = self.make_request(request_id, prompt_token_ids, params)
        if not self.scheduler.admit_for_remote_kv(req):
            del self._tracked[request_id]
            return None
        return req

    def complete_remote_request(self, request_id: str, first_token: SampleResult) -> RequestOutput | None:
        """All prompt KV is in the request's blocks: append the prefill's first token and start decoding.

        A seeded request continues the prefill's random stream when ``first_token.generator_state`` carries it.
        """
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return None
        req = tracked.request
        if first_token.generator_state is not None and req.generator is not None:
            state = torch.frombuffer(bytearray(first_token.generator_state), dtype=torch.uint8)
            try:
                req.generator.set_state(state)
            except RuntimeError as exc:  # another torch's generator layout: keep the fresh seed
                logger.warning("request %s: cannot restore the prefill's generator state (%s)", request_id, exc)
        self.scheduler.remote_kv_arrived(req)
        return self.append_token(tracked.request, first_token)

    def fail_remote_request(self, request_id: str) -> None:
        """KV did not arrive in time: compute the prompt here instead (recompute policy)."""
        tracked = self._tracked.get(request_id)
        if tracked is not None:
            self.scheduler.remote_kv_failed(tracked.request)

    def has_runnable_work(self) -> bool:
        """Something for ``step`` to compute (requests waiting for remote KV do not count)."""
        return self.scheduler.has_work() or bool(self._finished_outputs)

    # ---- introspection -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.block_manager.num_blocks


def _add_prompt_logprobs(req: Request, scored: PromptLogprobs) -> None:
    """Append one step's prompt scores; positions already known (recompute after preemption) are skipped."""
    skip = len(req.prompt_logprobs) - scored.start
    if skip < 0:
        raise RuntimeError(f"{req.request_id}: prompt logprobs from position {scored.start} but only "
                           f"{len(req.prompt_logprobs)} known")
    req.prompt_logprobs.extend(scored.logprobs[skip:])
    req.prompt_token_ranks.extend(scored.ranks[skip:])

