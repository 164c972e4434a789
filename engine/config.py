"""Engine configuration: one validated dataclass, shared by the library API and every server."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from duet.engine.model_config import parse_dtype


@dataclass
class EngineConfig:
    """Everything that shapes one engine instance. Invalid values raise ``ValueError`` naming the field."""

    model: str
    """Path to a Hugging Face model directory (config.json, safetensors, tokenizer)."""
    tokenizer: str | None = None
    """Directory of the tokenizer (tokenizer.json, tokenizer_config.json); None = the model directory."""
    generation_config: str = "auto"
    """Where sampling defaults and extra EOS ids come from: ``auto`` (the model directory's
    generation_config.json), ``vllm`` or ``none`` (nowhere: neutral defaults), or a directory holding one."""
    dtype: str = "auto"
    """``auto`` (the checkpoint's dtype; float16 becomes float32 on CPU), float32, bfloat16 or float16."""
    device: str = "auto"
    """``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda[:N]``."""
    block_size: int = 16
    """Tokens per KV block."""
    num_kv_blocks: int | None = None
    """KV pool size in blocks; None = derived from kv_cache_memory_bytes / gpu_memory_utilization."""
    kv_cache_memory_bytes: int | None = None
    """Bytes for the KV pool; None = 256 MiB on CPU, ``gpu_memory_utilization`` of free memory on CUDA."""
    gpu_memory_utilization: float = 0.85
    """Fraction of the GPU's total memory this engine may use (weights + KV), in (0, 1]."""
    max_num_batched_tokens: int = 2048
    """Token budget of one engine step (prefill chunks + decode tokens)."""
    max_num_seqs: int = 128
    """Most requests running at once."""
    max_model_len: int | None = None
    """Longest prompt + output; None = the model's max_position_embeddings (capped by a sliding window)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes across requests."""
    host_kv_cache_bytes: int = 0
    """Host memory for a KV tier under the prefix cache (``engine.kv_tier``): cached blocks are written through
    to it and loaded back instead of recomputed. 0 = off. Needs prefix caching and one process (no model
    parallelism)."""
    seed: int = 0
    """Seed of the engine-wide generator used by unseeded sampled requests."""
    attention_backend: str = "auto"
    """``auto`` (Triton on CUDA, torch on CPU), ``triton`` or ``torch``."""
    show_progress: bool = True
    """tqdm progress bar while weights load."""
    tensor_parallel_size: int = 1
    """Ranks each layer is split over (attention by heads, MLPs by columns); > 1 starts worker processes."""
    pipeline_parallel_size: int = 1
    """Stages the layers are split over, one after the other; > 1 starts worker processes."""
    expert_parallel: bool = False
    """MoE models: give each tensor-parallel rank whole experts instead of a slice of every expert."""
    distributed_timeout_s: float = 300.0
    """Deadline of the workers' start-up and of every collective between ranks, in seconds."""
    load_format: str = "auto"
    """``auto`` reads the checkpoint's safetensors; ``dummy`` fills the weights with random values on the
    device instead (benchmarks at real model shapes; only config.json and the tokenizer are read)."""
    cuda_graphs: bool = True
    """On CUDA, replay captured CUDA graphs for decode-only steps of up to ``cuda_graph_max_batch``
    sequences (single-process dense models; other steps run eagerly)."""
    cuda_graph_max_batch: int = 256
    """Largest decode batch captured as a CUDA graph (capped by ``max_num_seqs``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty path")
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer):
            raise ValueError(f"tokenizer must be a non-empty path or None, got {self.tokenizer!r}")
        if not isinstance(self.generation_config, str) or not self.generation_config:
            raise ValueError(f"generation_config must be auto, vllm, none or a directory, "
                             f"got {self.generation_config!r}")
        if self.generation_config not in ("auto", "vllm", "none") and not os.path.isdir(self.generation_config):
            raise ValueError(f"generation_config: {self.generation_config!r} is not a directory (nor auto, vllm, none)")
        if self.dtype != "auto":
            parse_dtype(self.dtype, "dtype")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"device: {e}") from e
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError(f"kv_cache_memory_bytes must be >= 1, got {self.kv_cache_memory_bytes}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.expert_parallel, bool):
            raise ValueError(f"expert_parallel must be a bool, got {self.expert_parallel!r}")
        if isinstance(self.host_kv_cache_bytes, bool) or not isinstance(self.host_kv_cache_bytes, int) \
                or self.host_kv_cache_bytes < 0:
            raise ValueError(f"host_kv_cache_bytes must be an integer >= 0, got {self.host_kv_cache_bytes!r}")
        if self.host_kv_cache_bytes and (not self.enable_prefix_caching or self.world_size > 1):
            raise ValueError("host_kv_cache_bytes: the host KV tier needs prefix caching and a single-process engine "
                             "(tensor_parallel_size = pipeline_parallel_size = 1)")
        if not self.distributed_timeout_s > 0:
            raise ValueError(f"distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")
        if self.attention_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"attention_backend must be auto, triton or torch, got {self.attention_backend!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be a bool, got {self.cuda_graphs!r}")
        if isinstance(self.cuda_graph_max_batch, bool) or not isinstance(self.cuda_graph_max_batch, int) \
                or self.cuda_graph_max_batch < 1:
            raise ValueError(f"cuda_graph_max_batch must be an integer >= 1, got {self.cuda_graph_max_batch!r}")

    @property
    def world_size(self) -> int:
        """Processes one engine runs on: tensor_parallel_size x pipeline_parallel_size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: torch.dtype) -> torch.dtype:
        if self.dtype != "auto":
            return parse_dtype(self.dtype)
        if checkpoint_dtype == torch.float16 and self.torch_device().type == "cpu":
            return torch.float32
        return checkpoint_dtype
