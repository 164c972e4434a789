// KV block gather / scatter: the op schemas, the argument checks shared with CUDA, and the CPU kernels.
//
// gather packs the blocks `block_ids` of layers [layer_start, layer_end) of the paged pool into one
// contiguous staging slab, so a transfer posts one large write instead of one descriptor per block;
// scatter is its exact inverse on the receiving side. Both move raw bytes, so every dtype works and the
// result is bitwise identical to kernels.reference.gather_kv_blocks / scatter_kv_blocks.

// Python.h first: it sets feature macros that the standard headers below must see.
#include <Python.h>

#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace duet {

KvBlocksPlan check_kv_blocks_args(
    const char* op,
    const at::Tensor& kv_cache,   // [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    const at::Tensor& block_ids,  // [n] int32 or int64
    int64_t layer_start,
    int64_t layer_end,
    const at::Tensor& staging,    // [layer_end - layer_start, 2, n, block_size, num_kv_heads, head_dim]
    const char* staging_name) {
  TORCH_CHECK_VALUE(
      kv_cache.dim() == 6, op, ": kv_cache must be 6-D [num_layers, 2, num_blocks, block_size, num_kv_heads, ",
      "head_dim], got shape ", kv_cache.sizes());
  TORCH_CHECK_VALUE(
      kv_cache.size(1) == 2, op, ": kv_cache.size(1) must be 2 (key, value), got shape ", kv_cache.sizes());
  TORCH_CHECK_VALUE(
      kv_cache.is_contiguous(), op, ": kv_cache must be contiguous, got strides ", kv_cache.strides());

  TORCH_CHECK_VALUE(block_ids.dim() == 1, op, ": block_ids must be 1-D, got shape ", block_ids.sizes());
  TORCH_CHECK_TYPE(
      block_ids.scalar_type() == at::kLong || block_ids.scalar_type() == at::kInt, op,
      ": block_ids must be int32 or int64, got ", block_ids.scalar_type());
  TORCH_CHECK_VALUE(
      block_ids.device() == kv_cache.device(), op, ": block_ids must be on kv_cache's device ",
      kv_cache.device(), ", got ", block_ids.device());

  const int64_t num_layers = kv_cache.size(0);
  TORCH_CHECK_VALUE(
      0 <= layer_start && layer_start <= layer_end && layer_end <= num_layers, op,
      ": layer range [layer_start, layer_end) = [", layer_start, ", ", layer_end,
      ") must satisfy 0 <= layer_start <= layer_end <= num_layers = ", num_layers);

  const int64_t num_ids = block_ids.numel();
  std::vector<int64_t> expected = kv_cache.sizes().vec();
  expected[0] = layer_end - layer_start;
  expected[2] = num_ids;
  TORCH_CHECK_VALUE(
      staging.sizes() == at::IntArrayRef(expected), op, ": ", staging_name, " must have shape ",
      at::IntArrayRef(expected), " = [layer_end - layer_start, 2, len(block_ids), block_size, num_kv_heads, ",
      "head_dim], got ", staging.sizes());
  TORCH_CHECK_TYPE(
      staging.scalar_type() == kv_cache.scalar_type(), op, ": ", staging_name, " must have kv_cache's dtype ",
      kv_cache.scalar_type(), ", got ", staging.scalar_type());
  TORCH_CHECK_VALUE(
      staging.device() == kv_cache.device(), op, ": ", staging_name, " must be on kv_cache's device ",
      kv_cache.device(), ", got ", staging.device());
  TORCH_CHECK_VALUE(
      staging.is_contiguous(), op, ": ", staging_name, " must be contiguous, got strides ", staging.strides());

  const at::MemOverlapStatus overlap = at::get_overlap_status(kv_cache, staging);
  TORCH_CHECK_VALUE(
      overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op, ": ",
      staging_name, " must not share memory with kv_cache");

  KvBlocksPlan plan;
  plan.num_blocks = kv_cache.size(2);
  plan.num_ids = num_ids;
  plan.first_plane = layer_start * 2;
  plan.num_chunks = (layer_end - layer_start) * 2 * num_ids;
  plan.block_bytes = kv_cache.size(3) * kv_cache.size(4) * kv_cache.size(5) * kv_cache.element_size();
  return plan;
}

namespace {

// Below this many bytes per task, spreading the memcpys over threads costs more than it saves.
constexpr int64_t kMinBytesPerTask = 256 * 1024;

// Host-side id checks (the CUDA side cannot afford the device sync and asserts in the kernel instead).
// Scatter also rejects duplicates: two threads would write the same block concurrently and could leave
// it torn between the two sources.
template <typename index_t>
void check_block_ids_cpu(const char* op, const index_t* ids, const KvBlocksPlan& plan, bool reject_duplicates) {
  std::vector<bool> seen(reject_duplicates ? plan.num_blocks : 0, false);
  for (int64_t j = 0; j < plan.num_ids; ++j) {
    const int64_t id = ids[j];
    TORCH_CHECK_INDEX(
        0 <= id && id < plan.num_blocks, op, ": block_ids[", j, "] = ", id,
        " is out of range for a pool of num_blocks = ", plan.num_blocks);
    if (reject_duplicates) {
      TORCH_CHECK_VALUE(
          !seen[id], op, ": block_ids must be distinct for a scatter, block ", id, " appears twice (again at ",
          "block_ids[", j, "])");
      seen[id] = true;
    }
  }
}

// One memcpy per chunk; chunks are independent, so they are split across threads.
template <typename index_t, bool kGather>
void copy_chunks_cpu(char* pool, char* staging, const index_t* ids, const KvBlocksPlan& plan) {
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerTask / plan.block_bytes);
  at::parallel_for(0, plan.num_chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t plane = c / plan.num_ids;  // (layer - layer_start) * 2 + kv
      const int64_t j = c - plane * plan.num_ids;
      char* pool_chunk = pool + ((plan.first_plane + plane) * plan.num_blocks + ids[j]) * plan.block_bytes;
      char* staging_chunk = staging + c * plan.block_bytes;
      if constexpr (kGather) {
        std::memcpy(staging_chunk, pool_chunk, plan.block_bytes);
      } else {
        std::memcpy(pool_chunk, staging_chunk, plan.block_bytes);
      }
    }
  });
}

template <bool kGather>
void copy_kv_blocks_cpu(
    const char* op, const at::Tensor& kv_cache, const at::Tensor& block_ids, const at::Tensor& staging,
    const KvBlocksPlan& plan) {
  const at::Tensor ids = block_ids.contiguous();  // [n]
  char* pool = static_cast<char*>(kv_cache.data_ptr());
  char* slab = static_cast<char*>(staging.data_ptr());
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "copy_kv_blocks_cpu", [&] {
    const index_t* id_ptr = ids.const_data_ptr<index_t>();
    check_block_ids_cpu(op, id_ptr, plan, /*reject_duplicates=*/!kGather);
    if (!plan.empty()) {
      copy_chunks_cpu<index_t, kGather>(pool, slab, id_ptr, plan);
    }
  });
}

void gather_kv_blocks_cpu(
    const at::Tensor& kv_cache,   // [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    const at::Tensor& block_ids,  // [n]
    int64_t layer_start,
    int64_t layer_end,
    const at::Tensor& out) {      // [layer_end - layer_start, 2, n, block_size, num_kv_heads, head_dim]
  constexpr const char* op = "duet::gather_kv_blocks";
  const KvBlocksPlan plan = check_kv_blocks_args(op, kv_cache, block_ids, layer_start, layer_end, out, "out");
  copy_kv_blocks_cpu</*kGather=*/true>(op, kv_cache, block_ids, out, plan);
}

void scatter_kv_blocks_cpu(
    const at::Tensor& staging,    // [layer_end - layer_start, 2, n, block_size, num_kv_heads, head_dim]
    const at::Tensor& block_ids,  // [n]
    int64_t layer_start,
    int64_t layer_end,
    const at::Tensor& kv_cache) { // [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
  constexpr const char* op = "duet::scatter_kv_blocks";
  const KvBlocksPlan plan =
      check_kv_blocks_args(op, kv_cache, block_ids, layer_start, layer_end, staging, "staging");
  copy_kv_blocks_cpu</*kGather=*/false>(op, kv_cache, block_ids, staging, plan);
}

}  // namespace
}  // namespace duet

TORCH_LIBRARY(duet, m) {
  // The fake (meta) implementations live in Python; torch imports this module when tracing needs them.
  m.set_python_module("duet.kernels.extension");
  m.def(
      "gather_kv_blocks(Tensor kv_cache, Tensor block_ids, int layer_start, int layer_end, Tensor(a!) out) "
      "-> ()");
  m.def(
      "scatter_kv_blocks(Tensor staging, Tensor block_ids, int layer_start, int layer_end, "
      "Tensor(a!) kv_cache) -> ()");
}

TORCH_LIBRARY_IMPL(duet, CPU, m) {
  m.impl("gather_kv_blocks", &duet::gather_kv_blocks_cpu);
  m.impl("scatter_kv_blocks", &duet::scatter_kv_blocks_cpu);
}

// `import kernels._C` loads this library, whose static initialisers above register the ops; the Python
// module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Duet's compiled ops, registered as torch.ops.duet.*",
      -1,       // m_size: no per-module state
      nullptr,  // m_methods
      nullptr,  // m_slots
      nullptr,  // m_traverse
      nullptr,  // m_clear
      nullptr,  // m_free
  };
  return PyModule_Create(&module_def);
}
