// CPU layer kernels (RMSNorm, residual add + RMSNorm, rotary, SiLU-and-mul), compiled once per instruction set
// (CMakeLists.txt: CPU_CAPABILITY=DEFAULT/AVX2/AVX512), like paged_decode_kernel.cpp. Float32 rows are
// vectorised with at::vec; bfloat16 / float16 rows take scalar loops that round exactly where the torch layers
// round (they are not what the CPU benchmarks run). Rows are independent and split across torch's threads
// only when there are enough of them: a decode step's few rows run inline, with no thread hand-off.

#include "layer_ops.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <type_traits>

namespace duet::layer_ops {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
// Below this many elements per thread, spreading rows over threads costs more than it saves.
constexpr int64_t kMinElementsPerTask = 32768;

template <typename F>
void for_rows(int64_t num_rows, int64_t dim, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(dim, 1));
  at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      f(r);
    }
  });
}

float sum_squares(const float* x, int64_t n) {
  Vec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + 2 * kVec <= n; i += 2 * kVec) {
    const Vec a = Vec::loadu(x + i), b = Vec::loadu(x + i + kVec);
    acc0 = at::vec::fmadd(a, a, acc0);
    acc1 = at::vec::fmadd(b, b, acc1);
  }
  for (; i + kVec <= n; i += kVec) {
    const Vec a = Vec::loadu(x + i);
    acc0 = at::vec::fmadd(a, a, acc0);
  }
  float lanes[kVec];
  (acc0 + acc1).store(lanes);
  float sum = 0.f;
  for (int64_t j = 0; j < kVec; ++j) {
    sum += lanes[j];
  }
  for (; i < n; ++i) {
    sum += x[i] * x[i];
  }
  return sum;
}

// One row: out = weight * round(x * inv_rms). Float rows are vectorised; others round like torch.
template <typename T>
void normalize_row(const T* x, const T* w, int64_t dim, double eps, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    const float inv = 1.f / std::sqrt(sum_squares(x, dim) / static_cast<float>(dim) + static_cast<float>(eps));
    const Vec vinv(inv);
    int64_t d = 0;
    for (; d + kVec <= dim; d += kVec) {
      (Vec::loadu(w + d) * (Vec::loadu(x + d) * vinv)).store(out + d);
    }
    for (; d < dim; ++d) {
      out[d] = w[d] * (x[d] * inv);
    }
  } else {
    float ss = 0.f;
    for (int64_t d = 0; d < dim; ++d) {
      const float v = static_cast<float>(x[d]);
      ss += v * v;
    }
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + static_cast<float>(eps));
    for (int64_t d = 0; d < dim; ++d) {
      const T normed = static_cast<T>(static_cast<float>(x[d]) * inv);
      out[d] = static_cast<T>(static_cast<float>(w[d]) * static_cast<float>(normed));
    }
  }
}

template <typename T>
void rms_norm_impl(const Rows& x, const void* weight, double eps, const Rows& out) {
  const T* w = static_cast<const T*>(weight);
  for_rows(x.num_rows(), x.dim, [&](int64_t r) {
    normalize_row(static_cast<const T*>(x.data) + x.offset(r), w, x.dim, eps, static_cast<T*>(out.data) + out.offset(r));
  });
}

template <typename T>
void add_rms_norm_impl(const Rows& x, const Rows& residual, const void* weight, double eps, const Rows& out) {
  const T* w = static_cast<const T*>(weight);
  for_rows(x.num_rows(), x.dim, [&](int64_t r) {
    const T* xr = static_cast<const T*>(x.data) + x.offset(r);
    T* res = static_cast<T*>(residual.data) + residual.offset(r);
    if constexpr (std::is_same_v<T, float>) {
      int64_t d = 0;
      for (; d + kVec <= x.dim; d += kVec) {
        (Vec::loadu(xr + d) + Vec::loadu(res + d)).store(res + d);
      }
      for (; d < x.dim; ++d) {
        res[d] = xr[d] + res[d];
      }
    } else {
      for (int64_t d = 0; d < x.dim; ++d) {
        res[d] = static_cast<T>(static_cast<float>(xr[d]) + static_cast<float>(res[d]));
      }
    }
    normalize_row(res, w, x.dim, eps, static_cast<T*>(out.data) + out.offset(r));
  });
}

// Rotates one head row in place with this position's cos / sin (half = head_dim / 2 each).
template <typename T>
void rotate_row(T* x, const float* c, const float* s, int64_t half) {
  if constexpr (std::is_same_v<T, float>) {
    int64_t i = 0;
    for (; i + kVec <= half; i += kVec) {
      const Vec x1 = Vec::loadu(x + i), x2 = Vec::loadu(x + half + i);
      const Vec vc = Vec::loadu(c + i), vs = Vec::loadu(s + i);
      (x1 * vc - x2 * vs).store(x + i);
      (x2 * vc + x1 * vs).store(x + half + i);
    }
    for (; i < half; ++i) {
      const float x1 = x[i], x2 = x[half + i];
      x[i] = x1 * c[i] - x2 * s[i];
      x[half + i] = x2 * c[i] + x1 * s[i];
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[half + i]);
      x[i] = static_cast<T>(x1 * c[i] - x2 * s[i]);
      x[half + i] = static_cast<T>(x2 * c[i] + x1 * s[i]);
    }
  }
}

template <typename T>
void rotary_impl(const int64_t* positions, const Rows& q, const Rows& k, const float* cos, const float* sin) {
  const int64_t half = q.dim / 2;
  const int64_t num_tokens = q.num_groups;
  const int64_t heads = q.rows_per_group + k.rows_per_group;
  for_rows(num_tokens, heads * q.dim, [&](int64_t t) {
    const float* c = cos + positions[t] * half;
    const float* s = sin + positions[t] * half;
    for (int64_t h = 0; h < q.rows_per_group; ++h) {
      rotate_row(static_cast<T*>(q.data) + q.offset(t * q.rows_per_group + h), c, s, half);
    }
    for (int64_t h = 0; h < k.rows_per_group; ++h) {
      rotate_row(static_cast<T*>(k.data) + k.offset(t * k.rows_per_group + h), c, s, half);
    }
  });
}

template <typename T>
void silu_and_mul_impl(const Rows& x, const Rows& out) {
  const int64_t width = out.dim;
  for_rows(x.num_rows(), width, [&](int64_t r) {
    const T* gate = static_cast<const T*>(x.data) + x.offset(r);
    const T* up = gate + width;
    T* o = static_cast<T*>(out.data) + out.offset(r);
    if constexpr (std::is_same_v<T, float>) {
      const Vec one(1.f);
      int64_t i = 0;
      for (; i + kVec <= width; i += kVec) {
        const Vec g = Vec::loadu(gate + i);
        ((g / (one + g.neg().exp())) * Vec::loadu(up + i)).store(o + i);
      }
      for (; i < width; ++i) {
        o[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
      }
    } else {
      for (int64_t i = 0; i < width; ++i) {
        const float g = static_cast<float>(gate[i]);
        const T silu = static_cast<T>(g / (1.f + std::exp(-g)));
        o[i] = static_cast<T>(static_cast<float>(silu) * static_cast<float>(up[i]));
      }
    }
  });
}

template <typename F>
void dispatch_dtype(c10::ScalarType dtype, const F& f) {
  switch (dtype) {
    case c10::ScalarType::Float: f(float{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "duet layer kernels: unsupported dtype ", dtype);  // checked by the front end
  }
}

void rms_norm(c10::ScalarType dtype, const Rows& x, const void* weight, double eps, const Rows& out) {
  dispatch_dtype(dtype, [&](auto tag) { rms_norm_impl<decltype(tag)>(x, weight, eps, out); });
}

void add_rms_norm(c10::ScalarType dtype, const Rows& x, const Rows& residual, const void* weight, double eps,
                  const Rows& out) {
  dispatch_dtype(dtype, [&](auto tag) { add_rms_norm_impl<decltype(tag)>(x, residual, weight, eps, out); });
}

void rotary(c10::ScalarType dtype, const int64_t* positions, const Rows& q, const Rows& k, const float* cos,
            const float* sin) {
  dispatch_dtype(dtype, [&](auto tag) { rotary_impl<decltype(tag)>(positions, q, k, cos, sin); });
}

void silu_and_mul(c10::ScalarType dtype, const Rows& x, const Rows& out) {
  dispatch_dtype(dtype, [&](auto tag) { silu_and_mul_impl<decltype(tag)>(x, out); });
}

}  // namespace

const Kernels& kernels() {
  static const Kernels k{&rms_norm, &add_rms_norm, &rotary, &silu_and_mul};
  return k;
}

}  // namespace CPU_CAPABILITY
}  // namespace duet::layer_ops
