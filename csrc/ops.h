// Duet's torch ops: declarations shared by the CPU (kv_blocks.cpp) and CUDA (kv_blocks_cuda.cu) sides.
//
// KV pool layout (see kernels/__init__.py):
//   kv_cache  // [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], contiguous
// so one block of one layer's keys (or values) is one contiguous run of `block_bytes`, a "chunk".
// Staging layout of gather / scatter (kernels/reference.py):
//   staging   // [layer_end - layer_start, 2, n, block_size, num_kv_heads, head_dim], contiguous
// whose chunk c = (layer_idx * 2 + kv) * n + j holds block block_ids[j] of layer layer_start + layer_idx.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace duet {

// The sizes of one gather / scatter call, produced by check_kv_blocks_args after validation.
struct KvBlocksPlan {
  int64_t num_blocks;   // blocks in the pool (kv_cache.size(2)): valid ids are [0, num_blocks)
  int64_t num_ids;      // n = block_ids.numel()
  int64_t first_plane;  // layer_start * 2: index of the first (layer, K/V) plane of the pool touched
  int64_t num_chunks;   // (layer_end - layer_start) * 2 * n: chunks moved by the call
  int64_t block_bytes;  // block_size * num_kv_heads * head_dim * element size: bytes of one chunk

  bool empty() const { return num_chunks == 0 || block_bytes == 0; }
};

// Validates everything that can be checked without reading block_ids' values (ranks, sizes, dtypes,
// layouts, devices, layer range, aliasing) and raises a c10 error naming the offending argument.
// `op` prefixes the messages; `staging_name` is how the staging tensor is called in that op's schema.
KvBlocksPlan check_kv_blocks_args(
    const char* op,
    const at::Tensor& kv_cache,   // [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    const at::Tensor& block_ids,  // [n] int32 or int64
    int64_t layer_start,
    int64_t layer_end,
    const at::Tensor& staging,    // [layer_end - layer_start, 2, n, block_size, num_kv_heads, head_dim]
    const char* staging_name);

}  // namespace duet
