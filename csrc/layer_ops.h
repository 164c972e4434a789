// CPU layer ops: what the op front end (layer_ops.cpp) hands to the kernels (layer_kernels.cpp, compiled once
// per instruction set like paged_decode_kernel.cpp). Each replaces a chain of small torch ops of one layer
// (engine/models/layers.py) whose per-op overhead dominated the CPU decode step at small batches.
//
// Rows are strided (tokens, or (token, head) pairs), the last dimension is contiguous. Arithmetic follows the
// torch layers: float32 math, rounding to the tensor dtype where torch rounds.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace duet::layer_ops {

// A [num_rows, dim] view: row r starts at data + (r / rows_per_group) * stride_group + (r % rows_per_group) *
// stride_row, i.e. a [groups, rows_per_group, dim] tensor flattened over its first two dims.
struct Rows {
  void* data;
  int64_t num_groups, rows_per_group, dim;
  int64_t stride_group, stride_row;

  int64_t num_rows() const { return num_groups * rows_per_group; }
  int64_t offset(int64_t r) const { return (r / rows_per_group) * stride_group + (r % rows_per_group) * stride_row; }
};

struct Kernels {
  // out = weight * round(x * rsqrt(mean(x^2) + eps))   (out may be x)
  void (*rms_norm)(c10::ScalarType dtype, const Rows& x, const void* weight, double eps, const Rows& out);
  // residual = round(x + residual); out = rms_norm(residual)   (the pre-norm residual stream of a layer)
  void (*add_rms_norm)(c10::ScalarType dtype, const Rows& x, const Rows& residual, const void* weight, double eps,
                       const Rows& out);
  // Neox rotary, in place: x[:half], x[half:] = x1 cos - x2 sin, x2 cos + x1 sin at each token's position.
  void (*rotary)(c10::ScalarType dtype, const int64_t* positions, const Rows& q, const Rows& k, const float* cos,
                 const float* sin);
  // out = round(silu(x[:, :width])) * x[:, width:]
  void (*silu_and_mul)(c10::ScalarType dtype, const Rows& x, const Rows& out);
};

#define DUET_DECLARE_LAYER_KERNELS(cap) \
  namespace cap {                       \
  const Kernels& kernels();             \
  }

DUET_DECLARE_LAYER_KERNELS(DEFAULT)
#if defined(DUET_HAVE_AVX2)
DUET_DECLARE_LAYER_KERNELS(AVX2)
#endif
#if defined(DUET_HAVE_AVX512)
DUET_DECLARE_LAYER_KERNELS(AVX512)
#endif
#undef DUET_DECLARE_LAYER_KERNELS

}  // namespace duet::layer_ops
