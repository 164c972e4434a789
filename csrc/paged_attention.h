// CPU paged attention: what the op front end (paged_attention.cpp) hands to the kernels
// (paged_decode_kernel.cpp, paged_prefill_kernel.cpp), compiled once per instruction set.
//
// Layouts (kernels/__init__.py):
//   query, out      // [num_tokens, num_heads, head_dim]   last dim contiguous
//   k_cache, v_cache// [num_blocks, block_size, num_kv_heads, head_dim]   last dim contiguous
//   block_tables    // [num_seqs, max_blocks_per_seq] int32
//   seq_lens        // [num_seqs] int32: cached + new tokens of each sequence
//   cu_seqlens_q    // [num_seqs + 1] int32: new tokens of sequence s are rows cu[s]:cu[s+1] (prefill only)
// The new tokens of sequence s are its last q_len positions; query token i of s attends to cache positions
// 0 .. seq_len - q_len + i (causal, prefix-cache hits and earlier chunks included). Decode is q_len == 1.
// Scores, softmax and accumulators are float32 whatever the cache dtype.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace duet::cpu_attention {

// Everything a kernel needs, validated by the front end: raw pointers (CPU memory), strides in elements.
struct AttentionArgs {
  c10::ScalarType dtype;         // of query, caches and out (all equal): float, bfloat16 or half
  const void* query;
  int64_t q_stride_token, q_stride_head;
  const void* k_cache;
  int64_t k_stride_block, k_stride_token, k_stride_head;
  const void* v_cache;
  int64_t v_stride_block, v_stride_token, v_stride_head;
  void* out;
  int64_t o_stride_token, o_stride_head;
  const int32_t* block_tables;
  int64_t bt_stride;             // elements between two sequences' rows of block_tables
  const int32_t* seq_lens;
  const int32_t* cu_seqlens_q;   // nullptr for decode: sequence s owns query row s
  int64_t num_seqs;
  int64_t num_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
  int64_t block_size;
  float scale;
  // Decode only: most context partitions one sequence is split into (0 = chosen from the batch and the
  // thread count). Partitions are runs of whole blocks, merged by a second pass.
  int64_t num_splits;
};

// One implementation per instruction set, each in its own namespace (the kernel file is compiled once per
// capability with -DCPU_CAPABILITY=<name>). The front end picks one with torch's own CPU capability
// (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY).
// parallel_threads(): how many threads one of that copy's at::parallel_for regions runs on (torch's thread
// count, or 1 if the copy were built without OpenMP, which compiles the parallel region out).
#define DUET_DECLARE_ATTENTION_KERNELS(cap)             \
  namespace cap {                                       \
  void paged_decode_attention(const AttentionArgs& a);  \
  void paged_prefill_attention(const AttentionArgs& a); \
  int64_t parallel_threads();                           \
  }

DUET_DECLARE_ATTENTION_KERNELS(DEFAULT)
#if defined(DUET_HAVE_AVX2)
DUET_DECLARE_ATTENTION_KERNELS(AVX2)
#endif
#if defined(DUET_HAVE_AVX512)
DUET_DECLARE_ATTENTION_KERNELS(AVX512)
#endif
#undef DUET_DECLARE_ATTENTION_KERNELS

}  // namespace duet::cpu_attention
