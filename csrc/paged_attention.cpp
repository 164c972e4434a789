// CPU paged attention ops: schemas, argument checks, and the choice of kernel by instruction set.
//
//   duet::paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, out)
//   duet::paged_prefill_attention(query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, out)
//   duet::cpu_attention_isa() -> str   the instruction set the kernels run with (AVX512, AVX2 or DEFAULT)
//   duet::cpu_parallel_threads() -> int   threads one parallel region of those kernels runs on
//
// Same contract as kernels.reference.paged_decode_attention / paged_attention (layouts in
// paged_attention.h); the kernels are in paged_{decode,prefill}_kernel.cpp. Every argument is checked here,
// values of the index tensors included (block ids, lengths, offsets), so a bad call raises a c10 error
// naming the argument instead of reading out of bounds.

#include "paged_attention.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <string>

namespace duet::cpu_attention {
namespace {

struct Kernels {
  void (*decode)(const AttentionArgs&);
  void (*prefill)(const AttentionArgs&);
  int64_t (*parallel_threads)();
  const char* isa;
};

// Torch's own choice (ATEN_CPU_CAPABILITY can lower it), limited to what this build compiled.
const Kernels& kernels() {
  static const Kernels chosen = [] {
    const std::string cap = at::get_cpu_capability();
#if defined(DUET_HAVE_AVX512)
    if (cap == "AVX512") {
      return Kernels{&AVX512::paged_decode_attention, &AVX512::paged_prefill_attention, &AVX512::parallel_threads, "AVX512"};
    }
#endif
#if defined(DUET_HAVE_AVX2)
    if (cap == "AVX512" || cap == "AVX2") {
      return Kernels{&AVX2::paged_decode_attention, &AVX2::paged_prefill_attention, &AVX2::parallel_threads, "AVX2"};
    }
#endif
    return Kernels{&DEFAULT::paged_decode_attention, &DEFAULT::paged_prefill_attention, &DEFAULT::parallel_threads, "DEFAULT"};
  }();
  return chosen;
}

void check_cpu(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
}

void check_index(const char* op, const at::Tensor& t, const char* name, int64_t numel, const char* shape) {
  check_cpu(op, t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(
      t.dim() == 1 && t.size(0) == numel, op, ": ", name, " must have shape ", shape, " = [", numel, "], got ",
      t.sizes());
}

// Checks shapes, dtypes, devices and layouts shared by both ops; fills everything but the index pointers.
AttentionArgs check_common(
    const char* op,
    const at::Tensor& query,         // [num_tokens, num_heads, head_dim]
    const at::Tensor& k_cache,       // [num_blocks, block_size, num_kv_heads, head_dim]
    const at::Tensor& v_cache,       // [num_blocks, block_size, num_kv_heads, head_dim]
    const at::Tensor& block_tables,  // [num_seqs, max_blocks_per_seq] int32
    double scale,
    const at::Tensor& out) {         // [num_tokens, num_heads, head_dim]
  TORCH_CHECK_VALUE(
      query.dim() == 3, op, ": query must be 3-D [num_tokens, num_heads, head_dim], got shape ", query.sizes());
  TORCH_CHECK_VALUE(
      k_cache.dim() == 4, op, ": k_cache must be 4-D [num_blocks, block_size, num_kv_heads, head_dim], got shape ",
      k_cache.sizes());
  TORCH_CHECK_VALUE(
      v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's shape ", k_cache.sizes(), ", got ",
      v_cache.sizes());
  for (const auto& [t, name] : {std::pair{&query, "query"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"},
                                {&out, "out"}}) {
    check_cpu(op, *t, name);
    TORCH_CHECK_VALUE(
        t->dim() == 0 || t->stride(-1) == 1 || t->size(-1) == 1, op, ": ", name,
        " must be contiguous in its last dimension, got strides ", t->strides());
  }
  const auto dtype = query.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
      ": query must be float32, bfloat16 or float16, got ", dtype);
  for (const auto& [t, name] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&out, "out"}}) {
    TORCH_CHECK_TYPE(
        t->scalar_type() == dtype, op, ": ", name, " must have query's dtype ", dtype, ", got ", t->scalar_type());
  }
  const int64_t num_heads = query.size(1), head_dim = query.size(2), num_kv_heads = k_cache.size(2);
  TORCH_CHECK_VALUE(
      k_cache.size(3) == head_dim, op, ": k_cache head_dim ", k_cache.size(3), " must equal query's head_dim ",
      head_dim);
  TORCH_CHECK_VALUE(
      num_kv_heads > 0 && num_heads % num_kv_heads == 0, op, ": num_heads ", num_heads,
      " must be a multiple of num_kv_heads ", num_kv_heads);
  TORCH_CHECK_VALUE(k_cache.size(1) > 0, op, ": block_size (k_cache.size(1)) must be > 0");
  TORCH_CHECK_VALUE(
      out.sizes() == query.sizes(), op, ": out must have query's shape ", query.sizes(), ", got ", out.sizes());
  for (const auto* cache : {&k_cache, &v_cache}) {
    const auto overlap = at::get_overlap_status(out, *cache);
    TORCH_CHECK_VALUE(
        overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op,
        ": out must not share memory with the caches");
  }
  check_cpu(op, block_tables, "block_tables");
  TORCH_CHECK_TYPE(
      block_tables.scalar_type() == at::kInt, op, ": block_tables must be int32, got ", block_tables.scalar_type());
  TORCH_CHECK_VALUE(
      block_tables.dim() == 2, op, ": block_tables must be 2-D [num_seqs, max_blocks_per_seq], got shape ",
      block_tables.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);

  AttentionArgs a{};
  a.dtype = dtype;
  a.query = query.const_data_ptr();
  a.q_stride_token = query.stride(0);
  a.q_stride_head = query.stride(1);
  a.k_cache = k_cache.const_data_ptr();
  a.k_stride_block = k_cache.stride(0);
  a.k_stride_token = k_cache.stride(1);
  a.k_stride_head = k_cache.stride(2);
  a.v_cache = v_cache.const_data_ptr();
  a.v_stride_block = v_cache.stride(0);
  a.v_stride_token = v_cache.stride(1);
  a.v_stride_head = v_cache.stride(2);
  a.out = out.data_ptr();
  a.o_stride_token = out.stride(0);
  a.o_stride_head = out.stride(1);
  a.num_seqs = block_tables.size(0);
  a.num_heads = num_heads;
  a.num_kv_heads = num_kv_heads;
  a.head_dim = head_dim;
  a.block_size = k_cache.size(1);
  a.scale = static_cast<float>(scale);
  return a;
}

// Every block id a sequence uses must be in the pool, and every length within its table row.
void check_lengths_and_blocks(const char* op, const AttentionArgs& a, int64_t num_blocks, int64_t max_blocks) {
  for (int64_t s = 0; s < a.num_seqs; ++s) {
    const int64_t len = a.seq_lens[s];
    TORCH_CHECK_VALUE(
        0 <= len && len <= max_blocks * a.block_size, op, ": seq_lens[", s, "] = ", len, " must be in [0, ",
        max_blocks * a.block_size, "] (block_tables width ", max_blocks, " x block_size ", a.block_size, ")");
    const int32_t* row = a.block_tables + s * a.bt_stride;
    for (int64_t b = 0; b * a.block_size < len; ++b) {
      TORCH_CHECK_INDEX(
          0 <= row[b] && row[b] < num_blocks, op, ": block_tables[", s, ", ", b, "] = ", row[b],
          " is out of range for a cache of num_blocks = ", num_blocks);
    }
  }
}

void paged_decode_attention_cpu(
    const at::Tensor& query,         // [num_seqs, num_heads, head_dim]
    const at::Tensor& k_cache,       // [num_blocks, block_size, num_kv_heads, head_dim]
    const at::Tensor& v_cache,       // [num_blocks, block_size, num_kv_heads, head_dim]
    const at::Tensor& block_tables,  // [num_seqs, max_blocks_per_seq] int32
    const at::Tensor& seq_lens,      // [num_seqs] int32
    double scale,
    int64_t num_splits,
    const at::Tensor& out) {         // [num_seqs, num_heads, head_dim]
  constexpr const char* op = "duet::paged_decode_attention";
  AttentionArgs a = check_common(op, query, k_cache, v_cache, block_tables, scale, out);
  TORCH_CHECK_VALUE(
      query.size(0) == a.num_seqs, op, ": query must have one row per sequence (block_tables.size(0) = ",
      a.num_seqs, "), got ", query.size(0));
  TORCH_CHECK_VALUE(num_splits >= 0, op, ": num_splits must be >= 0 (0 = automatic), got ", num_splits);
  check_index(op, seq_lens, "seq_lens", a.num_seqs, "[num_seqs]");
  const at::Tensor tables = block_tables.stride(1) == 1 ? block_tables : block_tables.contiguous();
  const at::Tensor lens = seq_lens.contiguous();
  a.block_tables = tables.const_data_ptr<int32_t>();
  a.bt_stride = tables.stride(0);
  a.seq_lens = lens.const_data_ptr<int32_t>();
  a.cu_seqlens_q = nullptr;
  a.num_splits = num_splits;
  check_lengths_and_blocks(op, a, k_cache.size(0), tables.size(1));
  if (a.num_seqs > 0) {
    kernels().decode(a);
  }
}

void paged_prefill_attention_cpu(
    const at::Tensor& query,         // [num_tokens, num_heads, head_dim]
    const at::Tensor& k_cache,       // [num_blocks, block_size, num_kv_heads, head_dim]
    const at::Tensor& v_cache,       // [num_blocks, block_size, num_kv_heads, head_dim]
    const at::Tensor& block_tables,  // [num_seqs, max_blocks_per_seq] int32
    const at::Tensor& cu_seqlens_q,  // [num_seqs + 1] int32
    const at::Tensor& seq_lens,      // [num_seqs] int32
    double scale,
    const at::Tensor& out) {         // [num_tokens, num_heads, head_dim]
  constexpr const char* op = "duet::paged_prefill_attention";
  AttentionArgs a = check_common(op, query, k_cache, v_cache, block_tables, scale, out);
  check_index(op, seq_lens, "seq_lens", a.num_seqs, "[num_seqs]");
  check_index(op, cu_seqlens_q, "cu_seqlens_q", a.num_seqs + 1, "[num_seqs + 1]");
  const at::Tensor tables = block_tables.stride(1) == 1 ? block_tables : block_tables.contiguous();
  const at::Tensor lens = seq_lens.contiguous();
  const at::Tensor cu = cu_seqlens_q.contiguous();
  a.block_tables = tables.const_data_ptr<int32_t>();
  a.bt_stride = tables.stride(0);
  a.seq_lens = lens.const_data_ptr<int32_t>();
  a.cu_seqlens_q = cu.const_data_ptr<int32_t>();
  a.num_splits = 0;
  const int32_t* c = a.cu_seqlens_q;
  TORCH_CHECK_VALUE(c[0] == 0, op, ": cu_seqlens_q[0] must be 0, got ", c[0]);
  for (int64_t s = 0; s < a.num_seqs; ++s) {
    const int64_t q_len = int64_t{c[s + 1]} - c[s];
    TORCH_CHECK_VALUE(
        q_len >= 0, op, ": cu_seqlens_q must be non-decreasing, got cu_seqlens_q[", s, "] = ", c[s],
        " > cu_seqlens_q[", s + 1, "] = ", c[s + 1]);
    TORCH_CHECK_VALUE(
        q_len <= a.seq_lens[s], op, ": sequence ", s, " has ", q_len, " new tokens but seq_lens[", s, "] = ",
        a.seq_lens[s], " (new tokens are part of seq_lens)");
  }
  TORCH_CHECK_VALUE(
      c[a.num_seqs] == query.size(0), op, ": cu_seqlens_q[-1] = ", c[a.num_seqs],
      " must equal the number of query rows ", query.size(0));
  check_lengths_and_blocks(op, a, k_cache.size(0), tables.size(1));
  if (query.size(0) > 0) {
    kernels().prefill(a);
  }
}

std::string cpu_attention_isa() { return kernels().isa; }

int64_t cpu_parallel_threads() { return kernels().parallel_threads(); }

}  // namespace
}  // namespace duet::cpu_attention

TORCH_LIBRARY_FRAGMENT(duet, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor seq_lens, float scale, int num_splits, Tensor(a!) out) -> ()");
  m.def(
      "paged_prefill_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor cu_seqlens_q, Tensor seq_lens, float scale, Tensor(a!) out) -> ()");
  m.def("cpu_attention_isa() -> str", &duet::cpu_attention::cpu_attention_isa);
  m.def("cpu_parallel_threads() -> int", &duet::cpu_attention::cpu_parallel_threads);
}

TORCH_LIBRARY_IMPL(duet, CPU, m) {
  m.impl("paged_decode_attention", &duet::cpu_attention::paged_decode_attention_cpu);
  m.impl("paged_prefill_attention", &duet::cpu_attention::paged_prefill_attention_cpu);
}
