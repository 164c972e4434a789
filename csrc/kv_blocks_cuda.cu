// CUDA kernels of duet::gather_kv_blocks / duet::scatter_kv_blocks (schemas and checks: kv_blocks.cpp).
//
// One launch moves every (layer, K/V, block) chunk of the layer range. The work is cut into tiles of
// kUnroll * blockDim.x vectors of one chunk, and CTAs stride over the tiles, so both a 2 KiB chunk and a
// 512 KiB chunk keep every SM busy. Each thread issues kUnroll independent loads before its stores to keep
// several memory requests in flight: a copy kernel is bound by outstanding requests, not by arithmetic.

#include "ops.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace duet {
namespace {

constexpr int kUnroll = 4;
constexpr int kMaxThreads = 256;

// VecT is the widest of uint4 / uint2 / uint32_t / uint16_t / uint8_t that divides the chunk size and
// both base addresses, so every access is naturally aligned; uint4 (16 bytes) is the fast path.
template <typename VecT, typename index_t, bool kGather>
__global__ void copy_kv_blocks_kernel(
    VecT* __restrict__ pool,               // [num_planes, num_blocks, vecs_per_chunk] (kv_cache)
    VecT* __restrict__ staging,            // [num_chunks, vecs_per_chunk]
    const index_t* __restrict__ block_ids, // [num_ids]
    int64_t num_ids,
    int64_t num_blocks,
    int64_t first_plane,
    int64_t num_chunks,
    int64_t vecs_per_chunk,
    int64_t tiles_per_chunk) {
  const int64_t tile_vecs = static_cast<int64_t>(blockDim.x) * kUnroll;
  const int64_t num_tiles = num_chunks * tiles_per_chunk;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t c = tile / tiles_per_chunk;  // staging chunk
    const int64_t plane = c / num_ids;         // (layer - layer_start) * 2 + kv
    const int64_t j = c - plane * num_ids;
    const int64_t id = block_ids[j];
    // Same contract as index_select on CUDA: a bad id is a device-side assert, never a stray access.
    CUDA_KERNEL_ASSERT(id >= 0 && id < num_blocks && "duet: block id out of range");
    if (id < 0 || id >= num_blocks) {
      continue;  // only reachable where CUDA_KERNEL_ASSERT compiles to nothing
    }
    VecT* pool_chunk = pool + ((first_plane + plane) * num_blocks + id) * vecs_per_chunk;
    VecT* staging_chunk = staging + c * vecs_per_chunk;
    const VecT* src = kGather ? pool_chunk : staging_chunk;
    VecT* dst = kGather ? staging_chunk : pool_chunk;

    const int64_t first = (tile - c * tiles_per_chunk) * tile_vecs + threadIdx.x;
    VecT regs[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = first + static_cast<int64_t>(u) * blockDim.x;
      if (i < vecs_per_chunk) {
        regs[u] = src[i];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = first + static_cast<int64_t>(u) * blockDim.x;
      if (i < vecs_per_chunk) {
        dst[i] = regs[u];
      }
    }
  }
}

int multiprocessor_count() {
  int device = 0;
  int num_sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  return num_sms;
}

template <typename VecT, typename index_t, bool kGather>
void launch_copy(char* pool, char* staging, const index_t* block_ids, const KvBlocksPlan& plan) {
  const int64_t vecs_per_chunk = plan.block_bytes / static_cast<int64_t>(sizeof(VecT));
  // Small chunks get small CTAs rather than idle threads: one tile should cover a chunk when it can.
  const int64_t wanted = (vecs_per_chunk + kUnroll - 1) / kUnroll;
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (wanted + 31) / 32 * 32)));
  const int64_t tile_vecs = static_cast<int64_t>(threads) * kUnroll;
  const int64_t tiles_per_chunk = (vecs_per_chunk + tile_vecs - 1) / tile_vecs;
  const int64_t num_tiles = plan.num_chunks * tiles_per_chunk;

  // Enough CTAs for a few waves of full occupancy; the grid-stride loop covers the rest.
  const int64_t max_ctas = static_cast<int64_t>(multiprocessor_count()) * (2048 / threads) * 4;
  const unsigned int grid = static_cast<unsigned int>(std::min<int64_t>(num_tiles, max_ctas));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  copy_kv_blocks_kernel<VecT, index_t, kGather><<<grid, threads, 0, stream>>>(
      reinterpret_cast<VecT*>(pool), reinterpret_cast<VecT*>(staging), block_ids, plan.num_ids, plan.num_blocks,
      plan.first_plane, plan.num_chunks, vecs_per_chunk, tiles_per_chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename index_t, bool kGather>
void dispatch_vector_width(char* pool, char* staging, const index_t* block_ids, const KvBlocksPlan& plan) {
  // Chunk starts are multiples of block_bytes from the two bases, so these three decide every alignment.
  const uint64_t bits = reinterpret_cast<uintptr_t>(pool) | reinterpret_cast<uintptr_t>(staging) |
                        static_cast<uint64_t>(plan.block_bytes);
  if (bits % 16 == 0) {
    launch_copy<uint4, index_t, kGather>(pool, staging, block_ids, plan);
  } else if (bits % 8 == 0) {
    launch_copy<uint2, index_t, kGather>(pool, staging, block_ids, plan);
  } else if (bits % 4 == 0) {
    launch_copy<uint32_t, index_t, kGather>(pool, staging, block_ids, plan);
  } else if (bits % 2 == 0) {
    launch_copy<uint16_t, index_t, kGather>(pool, staging, block_ids, plan);
  } else {
    launch_copy<uint8_t, index_t, kGather>(pool, staging, block_ids, plan);
  }
}

template <bool kGather>
void copy_kv_blocks_cuda(
    const at::Tensor& kv_cache, const at::Tensor& block_ids, const at::Tensor& staging, const KvBlocksPlan& plan) {
  if (plan.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(kv_cache.device());
  const at::Tensor ids = block_ids.contiguous();  // [n]
  char* pool = static_cast<char*>(kv_cache.data_ptr());
  char* slab = static_cast<char*>(staging.data_ptr());
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "copy_kv_blocks_cuda", [&] {
    dispatch_vector_width<index_t, kGather>(pool, slab, ids.const_data_ptr<index_t>(), plan);
  });
}

void gather_kv_blocks_cuda(
    const at::Tensor& kv_cache,   // [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    const at::Tensor& block_ids,  // [n]
    int64_t layer_start,
    int64_t layer_end,
    const at::Tensor& out) {      // [layer_end - layer_start, 2, n, block_size, num_kv_heads, head_dim]
  const KvBlocksPlan plan =
      check_kv_blocks_args("duet::gather_kv_blocks", kv_cache, block_ids, layer_start, layer_end, out, "out");
  copy_kv_blocks_cuda</*kGather=*/true>(kv_cache, block_ids, out, plan);
}

void scatter_kv_blocks_cuda(
    const at::Tensor& staging,    // [layer_end - layer_start, 2, n, block_size, num_kv_heads, head_dim]
    const at::Tensor& block_ids,  // [n]
    int64_t layer_start,
    int64_t layer_end,
    const at::Tensor& kv_cache) { // [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
  const KvBlocksPlan plan = check_kv_blocks_args(
      "duet::scatter_kv_blocks", kv_cache, block_ids, layer_start, layer_end, staging, "staging");
  copy_kv_blocks_cuda</*kGather=*/false>(kv_cache, block_ids, staging, plan);
}

}  // namespace
}  // namespace duet

TORCH_LIBRARY_IMPL(duet, CUDA, m) {
  m.impl("gather_kv_blocks", &duet::gather_kv_blocks_cuda);
  m.impl("scatter_kv_blocks", &duet::scatter_kv_blocks_cuda);
}
