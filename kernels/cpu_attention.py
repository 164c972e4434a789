"""Paged attention on the CPU: the compiled ops ``torch.ops.duet.paged_{decode,prefill}_attention``.

Same contract as ``kernels.reference.paged_decode_attention`` / ``paged_attention`` (and the Triton
kernels on CUDA): causal attention of each sequence's new tokens over its whole paged context, softmax in
float32, output in the query's dtype. The ops (csrc/paged_attention*.cpp) read K and V in place through the
block table and never build a padded context or a full score matrix; decode splits long contexts across
threads when the batch is small, prefill is tiled flash attention (cached prefixes and earlier chunks are
the keys before the first new token). They check every argument, values of the index tensors included.

When the extension is missing or disabled these wrappers run torch instead (decode:
``reference.batched_paged_decode_attention``, prefill: ``reference.paged_attention``) and log one warning
per process. CUDA tensors are not for these ops: the engine uses the Triton kernels there.
"""
from __future__ import annotations

import torch

from duet.kernels import extension, reference

_OPS = ("paged_decode_attention", "paged_prefill_attention")


def extension_available() -> bool:
    """True when the compiled CPU attention ops are loaded (and not disabled)."""
    return extension.load_error() is None and extension.ops_defined(_OPS)


def isa() -> str:
    """Instruction set the compiled kernels run with (``AVX512``, ``AVX2``, ``DEFAULT``), or ``torch``."""
    return torch.ops.duet.cpu_attention_isa() if extension_available() else "torch"


def parallel_threads() -> int:
    """Threads one parallel region of the compiled kernels runs on now (``torch.get_num_threads()`` when the
    extension was built with OpenMP, as CMakeLists.txt does), or 1 without the extension."""
    return torch.ops.duet.cpu_parallel_threads() if extension_available() else 1


def _use_extension(device: torch.device) -> bool:
    return extension.use(_OPS, device, "CPU attention ops")


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, the new token included; 0 gives a zero row
    scale: float,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim], query's dtype
    num_splits: int = 0,
) -> torch.Tensor:  # out
    """One new token per sequence over its paged context. ``num_splits`` caps the context partitions per
    sequence (0: chosen from the batch size and torch's thread count)."""
    if _use_extension(query.device):
        if out is None:
            out = torch.empty_like(query)
        torch.ops.duet.paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale, num_splits,
                                              out)
        return out
    result = reference.batched_paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale)
    return result if out is None else out.copy_(result)


def paged_prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], sequences packed back to back
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: cached + new tokens of each sequence
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim], query's dtype
) -> torch.Tensor:  # out
    """Causal attention of each sequence's new tokens (any mix of prefills, chunks and single tokens)."""
    if _use_extension(query.device):
        if out is None:
            out = torch.empty_like(query)
        torch.ops.duet.paged_prefill_attention(query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                               out)
        return out
    result = reference.paged_attention(query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale)
    return result if out is None else out.copy_(result)


def _check_fake_args(query, k_cache, v_cache, block_tables, seq_lens, out) -> None:
    """What the C++ checks say about shapes and dtypes, for tracing (index values are unknown)."""
    torch._check(query.dim() == 3 and k_cache.dim() == 4, lambda: "query must be 3-D and k_cache 4-D")
    torch._check(tuple(v_cache.shape) == tuple(k_cache.shape), lambda: "v_cache must have k_cache's shape")
    torch._check(k_cache.shape[3] == query.shape[2], lambda: "k_cache head_dim must equal query's")
    torch._check(query.shape[1] % k_cache.shape[2] == 0, lambda: "num_heads must be a multiple of num_kv_heads")
    torch._check(block_tables.dim() == 2 and block_tables.dtype == torch.int32, lambda: "block_tables: int32 2-D")
    torch._check(seq_lens.shape == (block_tables.shape[0],), lambda: "seq_lens must be [num_seqs]")
    torch._check(tuple(out.shape) == tuple(query.shape) and out.dtype == query.dtype, lambda: "out must match query")


def _decode_fake(query, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, out) -> None:
    _check_fake_args(query, k_cache, v_cache, block_tables, seq_lens, out)


def _prefill_fake(query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, out) -> None:
    _check_fake_args(query, k_cache, v_cache, block_tables, seq_lens, out)


# Registered at import whenever the ops are (kernels.extension imports this module for torch).
if extension.ops_defined(_OPS):
    extension.register_fakes({"paged_decode_attention": _decode_fake, "paged_prefill_attention": _prefill_fake})
