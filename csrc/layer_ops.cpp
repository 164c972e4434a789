// CPU layer ops: schemas, argument checks and the choice of kernel by instruction set (kernels in
// layer_kernels.cpp), plus the KV store, a plain row copy.
//
//   duet::rms_norm(x, weight, eps, out)                  out may be x
//   duet::add_rms_norm(x, residual, weight, eps, out)    residual += x (in place), out = rms_norm(residual)
//   duet::rotary_embedding(positions, q, k, cos, sin)    q and k rotated in place (neox, rotate halves)
//   duet::silu_and_mul(x, out)                           out = silu(x[:, :w]) * x[:, w:]
//   duet::store_kv(key, value, k_cache, v_cache, slot_mapping)
//
// Same results as the torch layers of engine/models/layers.py and kernels.reference.store_kv (up to float32
// rounding of the RMSNorm reduction). x, q, k, out: [rows, dim] or [tokens, heads, dim] with a contiguous
// last dimension and any row strides (q / k / v are usually slices of the fused QKV output).

#include "layer_ops.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>
#include <string>

namespace duet::layer_ops {
namespace {

const Kernels& kernels() {
  static const Kernels& chosen = []() -> const Kernels& {
    const std::string cap = at::get_cpu_capability();
#if defined(DUET_HAVE_AVX512)
    if (cap == "AVX512") {
      return AVX512::kernels();
    }
#endif
#if defined(DUET_HAVE_AVX2)
    if (cap == "AVX512" || cap == "AVX2") {
      return AVX2::kernels();
    }
#endif
    return DEFAULT::kernels();
  }();
  return chosen;
}

void check_float_tensor(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", name,
      " must be float32, bfloat16 or float16, got ", dtype);
}

// A 2-D [rows, dim] or 3-D [tokens, heads, dim] tensor with a contiguous last dimension, as Rows.
Rows rows_of(const char* op, const at::Tensor& t, const char* name) {
  check_float_tensor(op, t, name);
  TORCH_CHECK_VALUE(
      t.dim() == 2 || t.dim() == 3, op, ": ", name, " must be 2-D [rows, dim] or 3-D [tokens, heads, dim], got shape ",
      t.sizes());
  TORCH_CHECK_VALUE(
      t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name, " must be contiguous in its last dimension, got strides ",
      t.strides());
  if (t.dim() == 2) {
    return Rows{t.data_ptr(), t.size(0), 1, t.size(1), t.stride(0), 0};
  }
  return Rows{t.data_ptr(), t.size(0), t.size(1), t.size(2), t.stride(0), t.stride(1)};
}

void check_same(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_VALUE(
      a.sizes() == b.sizes(), op, ": ", b_name, " must have ", a_name, "'s shape ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK_TYPE(
      a.scalar_type() == b.scalar_type(), op, ": ", b_name, " must have ", a_name, "'s dtype ", a.scalar_type(),
      ", got ", b.scalar_type());
}

void check_weight(const char* op, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_float_tensor(op, weight, "weight");
  TORCH_CHECK_VALUE(
      weight.dim() == 1 && weight.size(0) == x.size(-1) && weight.is_contiguous(), op,
      ": weight must be contiguous [dim = ", x.size(-1), "], got shape ", weight.sizes());
  TORCH_CHECK_TYPE(
      weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ", x.scalar_type(), ", got ",
      weight.scalar_type());
  TORCH_CHECK_VALUE(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
}

void rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& out) {
  constexpr const char* op = "duet::rms_norm";
  const Rows xr = rows_of(op, x, "x");
  check_same(op, x, "x", out, "out");
  const Rows outr = rows_of(op, out, "out");
  check_weight(op, x, weight, eps);
  kernels().rms_norm(x.scalar_type(), xr, weight.const_data_ptr(), eps, outr);
}

void add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps,
                      const at::Tensor& out) {
  constexpr const char* op = "duet::add_rms_norm";
  const Rows xr = rows_of(op, x, "x");
  check_same(op, x, "x", residual, "residual");
  check_same(op, x, "x", out, "out");
  check_weight(op, x, weight, eps);
  kernels().add_rms_norm(x.scalar_type(), xr, rows_of(op, residual, "residual"), weight.const_data_ptr(), eps,
                         rows_of(op, out, "out"));
}

void rotary_embedding_cpu(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& cos, const at::Tensor& sin) {
  constexpr const char* op = "duet::rotary_embedding";
  TORCH_CHECK_VALUE(q.dim() == 3 && k.dim() == 3, op, ": q and k must be 3-D [tokens, heads, head_dim], got ",
                    q.sizes(), " and ", k.sizes());
  const Rows qr = rows_of(op, q, "q"), kr = rows_of(op, k, "k");
  TORCH_CHECK_VALUE(
      k.size(0) == q.size(0) && k.size(2) == q.size(2) && q.size(2) % 2 == 0, op,
      ": q and k must share tokens and an even head_dim, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op, ": k must have q's dtype ", q.scalar_type());
  for (const auto& [t, name] : {std::pair{&cos, "cos"}, {&sin, "sin"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(
        t->device().is_cpu() && t->is_contiguous() && t->dim() == 2 && t->size(1) == q.size(2) / 2, op, ": ", name,
        " must be a contiguous CPU tensor [max_positions, head_dim / 2 = ", q.size(2) / 2, "], got shape ", t->sizes());
  }
  TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), op, ": sin must have cos's shape ", cos.sizes());
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong, op, ": positions must be int64, got ", positions.scalar_type());
  TORCH_CHECK_VALUE(
      positions.device().is_cpu() && positions.dim() == 1 && positions.size(0) == q.size(0), op,
      ": positions must be a CPU tensor [tokens = ", q.size(0), "], got shape ", positions.sizes());
  const at::Tensor pos = positions.contiguous();
  const int64_t* p = pos.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < pos.numel(); ++t) {
    TORCH_CHECK_INDEX(
        0 <= p[t] && p[t] < cos.size(0), op, ": positions[", t, "] = ", p[t], " is outside the table of ",
        cos.size(0), " positions");
  }
  kernels().rotary(q.scalar_type(), p, qr, kr, cos.const_data_ptr<float>(), sin.const_data_ptr<float>());
}

void silu_and_mul_cpu(const at::Tensor& x, const at::Tensor& out) {
  constexpr const char* op = "duet::silu_and_mul";
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) % 2 == 0, op, ": x must be [tokens, 2 * width], got ", x.sizes());
  const Rows xr = rows_of(op, x, "x");
  const Rows outr = rows_of(op, out, "out");
  TORCH_CHECK_VALUE(
      out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == x.size(1) / 2, op, ": out must be [",
      x.size(0), ", ", x.size(1) / 2, "], got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == x.scalar_type(), op, ": out must have x's dtype ", x.scalar_type());
  kernels().silu_and_mul(x.scalar_type(), xr, outr);
}

// ---- KV store: one row copy per token and K / V (no arithmetic, so not compiled per instruction set) ----

void store_kv_cpu(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& slot_mapping) {
  constexpr const char* op = "duet::store_kv";
  for (const auto& [t, name] : {std::pair{&key, "key"}, {&value, "value"}, {&k_cache, "k_cache"},
                                {&v_cache, "v_cache"}}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t->device());
    TORCH_CHECK_TYPE(
        t->scalar_type() == k_cache.scalar_type(), op, ": ", name, " must have k_cache's dtype ",
        k_cache.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() >= 1 && t->stride(-1) == 1, op, ": ", name, " must be contiguous in its last dimension");
  }
  TORCH_CHECK_VALUE(
      k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), op,
      ": k_cache and v_cache must be [num_blocks, block_size, num_kv_heads, head_dim] of one shape, got ",
      k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK_VALUE(
      key.dim() == 3 && key.sizes() == value.sizes() && key.size(1) == k_cache.size(2) && key.size(2) == k_cache.size(3),
      op, ": key and value must be [num_tokens, num_kv_heads = ", k_cache.size(2), ", head_dim = ", k_cache.size(3),
      "], got ", key.sizes(), " and ", value.sizes());
  TORCH_CHECK_TYPE(
      slot_mapping.scalar_type() == at::kLong, op, ": slot_mapping must be int64, got ", slot_mapping.scalar_type());
  TORCH_CHECK_VALUE(
      slot_mapping.device().is_cpu() && slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0), op,
      ": slot_mapping must be a CPU tensor [num_tokens = ", key.size(0), "], got shape ", slot_mapping.sizes());
  const int64_t block_size = k_cache.size(1), num_slots = k_cache.size(0) * block_size;
  const int64_t heads = key.size(1), head_bytes = key.size(2) * key.element_size();
  const at::Tensor slots_t = slot_mapping.contiguous();
  const int64_t* slots = slots_t.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < key.size(0); ++t) {
    TORCH_CHECK_INDEX(
        -1 <= slots[t] && slots[t] < num_slots, op, ": slot_mapping[", t, "] = ", slots[t], " is outside [-1, ",
        num_slots, ")");
  }
  const int64_t elem = key.element_size();
  auto copy_rows = [&](const at::Tensor& src, const at::Tensor& cache) {
    const char* s = static_cast<const char*>(src.const_data_ptr());
    char* c = static_cast<char*>(cache.data_ptr());
    const int64_t grain = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(heads * head_bytes, 1));  // 256 KiB
    at::parallel_for(0, key.size(0), grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t slot = slots[t];
        if (slot < 0) {
          continue;  // padding
        }
        char* dst = c + ((slot / block_size) * cache.stride(0) + (slot % block_size) * cache.stride(1)) * elem;
        for (int64_t h = 0; h < heads; ++h) {
          std::memcpy(dst + h * cache.stride(2) * elem, s + (t * src.stride(0) + h * src.stride(1)) * elem, head_bytes);
        }
      }
    });
  };
  copy_rows(key, k_cache);
  copy_rows(value, v_cache);
}

}  // namespace
}  // namespace duet::layer_ops

TORCH_LIBRARY_FRAGMENT(duet, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps, Tensor(b!) out) -> ()");
  m.def("rotary_embedding(Tensor positions, Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
  m.def("silu_and_mul(Tensor x, Tensor(a!) out) -> ()");
  m.def("store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(duet, CPU, m) {
  m.impl("rms_norm", &duet::layer_ops::rms_norm_cpu);
  m.impl("add_rms_norm", &duet::layer_ops::add_rms_norm_cpu);
  m.impl("rotary_embedding", &duet::layer_ops::rotary_embedding_cpu);
  m.impl("silu_and_mul", &duet::layer_ops::silu_and_mul_cpu);
  m.impl("store_kv", &duet::layer_ops::store_kv_cpu);
}
