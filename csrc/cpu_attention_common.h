// Shared by the CPU paged attention kernels (paged_decode_kernel.cpp, paged_prefill_kernel.cpp), which
// CMakeLists.txt compiles once per instruction set: -DCPU_CAPABILITY=DEFAULT, AVX2 or AVX512 (and that
// capability's compiler flags), so at::vec::Vectorized is 8 or 16 floats wide and everything here lands in
// that capability's duet::cpu_attention::<capability> namespace (inline: the two files of one capability
// share one copy; copies of different capabilities never meet). The front end (paged_attention.cpp)
// validates the arguments and calls one capability's kernels.
//
// Both kernels read K and V in place through the block table (no gather, no padding to the longest
// sequence) and keep scores, softmax state and accumulators in float32 whatever the cache dtype. Work items
// are handed to torch's intra-op threads one at a time, longest first (run_items), so items of uneven cost
// balance.
#pragma once

#include "paged_attention.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace duet::cpu_attention {
namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Horizontal sum / max of one vector (hot: one per decode score).
inline float reduce_sum(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 x = v;
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
#else
  float lanes[kVec];
  v.store(lanes);
  float sum = 0.f;
  for (int64_t i = 0; i < kVec; ++i) {
    sum += lanes[i];
  }
  return sum;
#endif
}

inline float reduce_max(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_max_ps(v);
#else
  float lanes[kVec];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t i = 1; i < kVec; ++i) {
    m = std::max(m, lanes[i]);
  }
  return m;
#endif
}

// n elements of src as float into dst.
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    int64_t i = 0;
    for (; i + kVec <= n; i += kVec) {
      Vec v;
      at::vec::load_to_float(src + i, v);
      v.store(dst + i);
    }
    for (; i < n; ++i) {
      dst[i] = static_cast<float>(src[i]);
    }
  }
}

// Hands items [0, num_items) to at most num_threads workers, one item at a time in index order. `make`
// builds one worker (its scratch buffers) per thread; the worker's operator()(item) does the work.
template <typename MakeWorker>
inline void run_items(int64_t num_items, const MakeWorker& make) {
  if (num_items == 0) {
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t num_workers = std::min<int64_t>(at::get_num_threads(), num_items);
  at::parallel_for(0, num_workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {  // one per thread, unless called inside a parallel region
      auto worker = make();
      for (int64_t i = next.fetch_add(1); i < num_items; i = next.fetch_add(1)) {
        worker(i);
      }
    }
  });
}

inline void scale_in_place(float* x, float s, int64_t num_vectors) {
  const Vec vs(s);
  for (int64_t v = 0; v < num_vectors; ++v) {
    (Vec::loadu(x + v * kVec) * vs).store(x + v * kVec);
  }
}

// x[i] = exp(x[i] - max) for i < n; returns the sum of the new values.
inline float exp_sum(float* x, int64_t n, float max) {
  const Vec vmax(max);
  Vec vsum(0.f);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) {
    const Vec e = (Vec::loadu(x + i) - vmax).exp_u20();
    e.store(x + i);
    vsum = vsum + e;
  }
  float sum = reduce_sum(vsum);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  return sum;
}

inline float max_of(const float* x, int64_t n) {
  float m = kNegInf;
  int64_t i = 0;
  if (n >= kVec) {
    Vec vm = Vec::loadu(x);
    for (i = kVec; i + kVec <= n; i += kVec) {
      vm = at::vec::maximum(vm, Vec::loadu(x + i));
    }
    m = reduce_max(vm);
  }
  for (; i < n; ++i) {
    m = std::max(m, x[i]);
  }
  return m;
}

template <typename F>
inline void dispatch_dtype(c10::ScalarType dtype, const F& f) {
  switch (dtype) {
    case c10::ScalarType::Float: f(float{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "duet attention kernels: unsupported dtype ", dtype);  // checked earlier
  }
}

struct DecodeItem {
  int64_t seq;
  int64_t row;          // query / out row
  int64_t token_begin;  // context range [token_begin, token_end) of this partition
  int64_t token_end;
  int64_t part_slot;    // -1: write out directly; else index of this partition's partial (see DecodeParts)
};

// Runs decode items that cover whole sequences (part_slot -1), for the prefill kernel's one-token sequences.
void run_unsplit_decode(const AttentionArgs& a, std::vector<DecodeItem>& items);

}  // namespace CPU_CAPABILITY
}  // namespace duet::cpu_attention
