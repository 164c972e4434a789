"""A vLLM V1 engine (its public ``AsyncLLM`` API) on a thread of its own, for ``--executor vllm`` servers.

``VllmEngine`` owns an asyncio loop thread that holds the ``AsyncLLM``; callers on any thread ``submit``
token-id prompts with Duet ``SamplingParams`` and receive ``engine.protocol.Tokens`` (new tokens only, the
message the server sends on) through the ``on_output`` callback, which runs on the engine thread and must
only hand the output over (queue, wake-up).
vLLM itself runs its scheduler and its workers in processes of its own.

``engine_args`` maps Duet's engine flags onto vLLM's: model, tokenizer, generation config, dtype, max model
length, block size, memory fraction, KV blocks, batch limits, prefix caching, seed, tensor parallel size;
plus Duet's KV connector (``transfer.vllm_connector``) and vLLM's KV-event publisher when the server asks
for them. Before vLLM starts, ``check_platform`` holds the configuration against what vLLM's attention
backend on this platform accepts (``platform_limits``: on CPU vLLM's ``CPU_ATTN`` backend, read from vLLM
itself) and raises a ``ValueError`` naming the flag or the config.json field otherwise; vLLM would only fail
later (a head size its CPU kernels lack fails at the first request). ``default_block_size`` is what
``--block-size`` means when not given: 16 on GPUs, the smallest accepted multiple (32) on CPU.
The dtype is resolved as the native engine resolves it (``auto``: the checkpoint's, float16 -> float32 on
CPU), so vLLM and native servers agree on the KV layout. On a CPU-only host vLLM's CPU backend needs
``gpu_memory_utilization`` <= 0.3 (it is capped there) and ``VLLM_CPU_KVCACHE_SPACE`` (GiB; set from
``--kv-cache-memory-bytes`` or 1 GiB when absent), and the engine runs eagerly (no torch.compile warm-up).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duet.engine import envs
from duet.engine.config import EngineConfig
from duet.engine.loader import model_identity
from duet.engine.model_config import SUPPORTED_ARCHITECTURES, parse_dtype
from duet.engine.protocol import FinishReason, TokenDelta, Tokens
from duet.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

CPU_MAX_MEMORY_FRACTION = 0.3
GPU_DEFAULT_BLOCK_SIZE = 16


def model_id(model: str) -> str:
    """The model part of a KV layout, as native servers spell it (``engine.loader.model_identity``)."""
    raw = json.loads((Path(model) / "config.json").read_text())
    archs = raw.get("architectures") or ["unknown"]
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), archs[0])
    return model_identity(model, arch)


def on_cpu(device: str) -> bool:
    """Whether a ``--device`` value means vLLM's CPU backend."""
    if device != "auto":
        return device == "cpu"
    import torch

    return not torch.cuda.is_available()


@dataclass(frozen=True)
class PlatformLimits:
    """What vLLM's attention backend on this platform accepts; None where vLLM decides per model (GPUs)."""

    backend: str
    block_size_multiple: int | None
    head_sizes: tuple[int, ...] | None
    dtypes: tuple[str, ...] | None


def platform_limits(cpu: bool) -> PlatformLimits:
    """Read from vLLM itself: on CPU its ``CPU_ATTN`` backend's kernel block sizes, head sizes and dtypes."""
    if not cpu:
        return PlatformLimits("GPU", None, None, None)
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    multiples = [getattr(b, "base", b) for b in CPUAttentionBackend.get_supported_kernel_block_sizes()]
    backend_dtypes = set(CPUAttentionBackend.supported_dtypes)
    dtypes = tuple(str(d).removeprefix("torch.") for d in current_platform.supported_dtypes if d in backend_dtypes)
    return PlatformLimits(CPUAttentionBackend.get_name(), min(multiples) if multiples else None,
                          tuple(CPUAttentionBackend.get_supported_head_sizes()), dtypes)


def default_block_size(device: str = "auto") -> int:
    """``--block-size`` when not given, for a vLLM engine: 16 on GPUs; on CPU the smallest size vLLM's CPU
    attention accepts (a multiple of 32; vLLM's own CPU default is 128) that native servers also support."""
    return _block_size_for(platform_limits(on_cpu(device)))


def _block_size_for(limits: PlatformLimits) -> int:
    multiple = limits.block_size_multiple or GPU_DEFAULT_BLOCK_SIZE
    return -(-GPU_DEFAULT_BLOCK_SIZE // multiple) * multiple


def _checkpoint(config: EngineConfig) -> tuple[Path, dict]:
    path = Path(config.model) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: missing config.json in the model directory")
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def check_platform(config: EngineConfig, limits: PlatformLimits | None = None) -> str:
    """The dtype to give vLLM, after checking block size, head size and dtype against ``limits`` (default:
    this platform's). Raises ``ValueError`` naming the flag or config.json field vLLM would refuse."""
    limits = limits or platform_limits(on_cpu(config.device))
    path, raw = _checkpoint(config)
    text = raw.get("text_config") or raw  # multimodal checkpoints nest the language model's fields
    checkpoint = str(text.get("dtype") or text.get("torch_dtype") or raw.get("dtype") or raw.get("torch_dtype")
                     or "float32")
    try:
        resolved = config.torch_dtype(parse_dtype(checkpoint))
    except ValueError:  # a dtype Duet does not know: let vLLM resolve it
        resolved = None
    dtype = str(resolved).removeprefix("torch.") if resolved is not None else config.dtype
    m = limits.block_size_multiple
    if m is not None and config.block_size % m:
        raise ValueError(f"--block-size {config.block_size}: vLLM's {limits.backend} attention needs a multiple of {m} "
                         f"(omit --block-size for {_block_size_for(limits)})")
    if limits.head_sizes is not None:
        heads = text.get("num_attention_heads")
        head_dim = text.get("head_dim") or (text["hidden_size"] // heads if heads and text.get("hidden_size") else None)
        if head_dim is not None and head_dim not in limits.head_sizes:
            raise ValueError(f"{path}: head_dim {head_dim} is not supported by vLLM's {limits.backend} attention "
                             f"(head sizes {', '.join(map(str, limits.head_sizes))}); serve it with --executor native")
    if limits.dtypes is not None and resolved is not None and dtype not in limits.dtypes:
        what = f"--dtype {config.dtype}" if config.dtype != "auto" else f"{path}: dtype {checkpoint}"
        raise ValueError(f"{what}: vLLM's {limits.backend} attention supports {', '.join(limits.dtypes)} here")
    return dtype


def engine_args(config: EngineConfig, *, kv_connector_extra: dict[str, Any] | None = None,
                kv_failure_policy: str = "recompute", kv_events_endpoint: str | None = None):
    """vLLM ``AsyncEngineArgs`` for Duet's ``EngineConfig`` (+ Duet's connector and KV events when given)."""
    from vllm.config import KVEventsConfig, KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    cpu = on_cpu(config.device)
    dtype = check_platform(config)
    memory_fraction = config.gpu_memory_utilization
    if cpu:
        memory_fraction = min(memory_fraction, CPU_MAX_MEMORY_FRACTION)
        if envs.vllm_cpu_kvcache_space() is None:
            gib = max(1, math.ceil((config.kv_cache_memory_bytes or (1 << 30)) / (1 << 30)))
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(gib)
    kwargs: dict[str, Any] = dict(
        model=config.model, tokenizer=config.tokenizer, generation_config=_vllm_generation_config(config),
        dtype=dtype, max_model_len=config.max_model_len, block_size=config.block_size,
        gpu_memory_utilization=memory_fraction, max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs, enable_prefix_caching=config.enable_prefix_caching, seed=config.seed,
        tensor_parallel_size=config.tensor_parallel_size, pipeline_parallel_size=config.pipeline_parallel_size,
        num_gpu_blocks_override=config.num_kv_blocks, enforce_eager=cpu or not config.cuda_graphs,
        disable_log_stats=False)
    if config.kv_cache_memory_bytes and not cpu:
        kwargs["kv_cache_memory_bytes"] = config.kv_cache_memory_bytes
    if kv_connector_extra is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="DuetConnector", kv_connector_module_path="duet.transfer.vllm_connector", kv_role="kv_both",
            kv_load_failure_policy=kv_failure_policy, kv_connector_extra_config=kv_connector_extra)
    if kv_events_endpoint is not None:
        # A non-wildcard tcp endpoint makes vLLM's publisher connect to it: the server binds the SUB side.
        kwargs["kv_events_config"] = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                                    endpoint=kv_events_endpoint, topic="kv")
    return AsyncEngineArgs(**kwargs)


def _vllm_generation_config(config: EngineConfig) -> str:
    """Duet's ``--generation-config`` in vLLM's spelling (``auto``, ``vllm`` or a directory)."""
    return "vllm" if config.generation_config in ("vllm", "none") else config.generation_config


def vllm_sampling(params: SamplingParams, kv_transfer_params: dict[str, Any] | None = None):
    """Duet sampling parameters as vLLM's (delta outputs, no detokenization: Duet's front end detokenizes).

    ``logit_bias``, ``allowed_token_ids``, ``bad_words`` (vLLM tokenizes them itself) and ``prompt_logprobs`` map
    onto vLLM's fields of the same names; structured outputs go as the EBNF grammar the native engine enforces
    (``engine.structured_output.grammar.ebnf``), which vLLM runs with xgrammar.
    """
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    extra = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None
    structured = None
    if params.structured_outputs is not None:
        from duet.engine.structured_output.grammar import ebnf

        # The native engine's grammar, as EBNF: both executors enforce the same language.
        structured = StructuredOutputsParams(grammar=ebnf(params.structured_outputs))
    return VSamplingParams(
        n=1, max_tokens=params.max_tokens, min_tokens=params.min_tokens, temperature=params.temperature,
        top_k=params.top_k if params.top_k > 0 else -1, top_p=params.top_p, min_p=params.min_p, seed=params.seed,
        repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos, logprobs=params.logprobs, detokenize=False,
        output_kind=RequestOutputKind.DELTA, extra_args=extra, structured_outputs=structured,
        logit_bias=dict(params.logit_bias) if params.logit_bias else None,
        allowed_token_ids=list(params.allowed_token_ids) if params.allowed_token_ids else None,
        bad_words=list(params.bad_words) or None, prompt_logprobs=params.prompt_logprobs)


def prompt_logprobs_of(prompt: list[int], scored: list) -> tuple[list, list]:
    """vLLM's ``RequestOutput.prompt_logprobs`` (per position: None, or token -> ``Logprob``) as Duet's: per
    position the token -> logprob map and the rank of the prompt's own token (first position None)."""
    logprobs: list[dict[int, float] | None] = []
    ranks: list[int | None] = []
    for token, position in zip(prompt, scored):
        if position is None:
            logprobs.append(None)
            ranks.append(None)
            continue
        logprobs.append({int(t): float(lp.logprob) for t, lp in position.items()})
        own = position.get(token)
        ranks.append(int(own.rank) if own is not None and own.rank is not None else None)
    return logprobs, ranks


@dataclass
class EngineLoad:
    """The latest scheduler snapshot vLLM reported (one step stale at most)."""

    running: int = 0
    waiting: int = 0
    waiting_blocked: int = 0
    """Requests waiting on something else than room: remote KV among them."""
    kv_cache_usage: float = 0.0
    prompt_tokens_computed: int = 0
    prompt_tokens_external: int = 0
    prompt_tokens_local_hit: int = 0
    prefix_query_tokens: int = 0
    """Prompt tokens looked up in vLLM's prefix cache."""
    generated_tokens: int = 0
    preemptions: int = 0


class VllmEngine:
    """``AsyncLLM`` on its own thread. ``submit``/``abort``/``shutdown`` may be called from any thread."""

    def __init__(self, args, on_output: Callable[[Tokens], None], start_timeout_s: float = 900.0):
        self.args = args
        self.on_output = on_output
        self.load = EngineLoad()
        self.llm = None
        self.num_total_blocks = 0
        self.max_model_len = 0
        self.vocab_size = 0
        self._tasks: dict[str, asyncio.Task] = {}
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="duet-vllm-engine", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout_s):
            raise TimeoutError(f"vLLM engine did not start within {start_timeout_s}s")
        if self._error is not None:
            raise RuntimeError(f"vLLM engine failed to start: {self._error}") from self._error

    # ---- any thread ---------------------------------------------------------------------------------
    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               kv_transfer_params: dict[str, Any] | None = None) -> None:
        self._loop.call_soon_threadsafe(self._start, request_id, list(prompt_token_ids), params, kv_transfer_params)

    def abort(self, request_id: str) -> None:
        self._loop.call_soon_threadsafe(self._abort, request_id)

    def healthy(self) -> bool:
        return self._error is None and self._thread.is_alive() and not getattr(self.llm, "errored", False)

    def shutdown(self) -> None:
        if self._loop.is_closed():
            return
        fut = asyncio.run_coroutine_threadsafe(self._stop(), self._loop)
        try:
            fut.result(timeout=60)
        except Exception as e:  # noqa: BLE001 - shutting down anyway
            logger.warning("vLLM engine shutdown: %s", e)
        self._thread.join(timeout=10)

    # ---- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._init())
        except BaseException as e:  # noqa: BLE001 - reported to the constructor
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _init(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        host = self

        from vllm.v1.metrics.loggers import StatLoggerBase

        class LoadLogger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                host._record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self):
                pass

        self.llm = AsyncLLM.from_engine_args(self.args, stat_loggers=[LoadLogger])
        cfg = self.llm.vllm_config
        self.num_total_blocks = int(cfg.cache_config.num_gpu_blocks or 0)
        self.max_model_len = int(cfg.model_config.max_model_len)
        self.vocab_size = int(cfg.model_config.get_vocab_size())

    def _record(self, sched, it) -> None:
        load = self.load
        if sched is not None:
            load.running, load.waiting = sched.num_running_reqs, sched.num_waiting_reqs
            load.waiting_blocked = getattr(sched, "num_skipped_waiting_reqs", 0)
            load.kv_cache_usage = sched.kv_cache_usage
            prefix = getattr(sched, "prefix_cache_stats", None)
            if prefix is not None:  # a delta since the previous report, as vLLM's own loggers read it
                load.prefix_query_tokens += prefix.queries
        if it is not None:
            pts = it.prompt_token_stats
            load.prompt_tokens_computed += pts.computed
            load.prompt_tokens_external += pts.external_kv_transfer
            load.prompt_tokens_local_hit += pts.local_cache_hit
            load.generated_tokens += it.num_generation_tokens
            load.preemptions += it.num_preempted_reqs

    def _start(self, request_id: str, prompt: list[int], params: SamplingParams, kv_params) -> None:
        self._tasks[request_id] = self._loop.create_task(self._generate(request_id, prompt, params, kv_params))

    def _abort(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()  # closing the generator aborts the request inside vLLM

    async def _generate(self, request_id: str, prompt: list[int], params: SamplingParams, kv_params) -> None:
        from vllm.inputs import TokensPrompt

        try:
            sp = vllm_sampling(params, kv_params)
            prompt_scored = False
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt), sp, request_id):
                c = out.outputs[0]
                logprobs = None
                if c.logprobs is not None:
                    logprobs = [{int(t): float(lp.logprob) for t, lp in d.items()} for d in c.logprobs]
                reason = FinishReason.of(c.finish_reason) if out.finished else None
                delta = TokenDelta(list(c.token_ids), logprobs, out.finished, reason,
                                   c.stop_reason if isinstance(c.stop_reason, int) else None,
                                   max(0, out.num_cached_tokens or 0))
                if out.prompt_logprobs is not None and not prompt_scored:  # once, as Duet's engine sends them
                    prompt_scored = True
                    delta.prompt_logprobs, delta.prompt_token_ranks = prompt_logprobs_of(prompt, out.prompt_logprobs)
                self.on_output(Tokens(request_id, delta))
                if out.finished:
                    return
        except asyncio.CancelledError:
            self.on_output(Tokens(request_id, TokenDelta(finished=True, finish_reason=FinishReason.ABORT)))
        except ValueError as e:  # rejected by vLLM's input validation
            self.on_output(Tokens(request_id, TokenDelta.failure(str(e), 400)))
        except Exception as e:
            logger.exception("request %s failed in vLLM", request_id)
            self.on_output(Tokens(request_id, TokenDelta.failure(str(e), 503)))
        finally:
            self._tasks.pop(request_id, None)

    async def _stop(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        if self.llm is not None:
            self.llm.shutdown()
        self._loop.call_soon(self._loop.stop)
