// CPU paged attention kernels, compiled once per instruction set: CMakeLists.txt builds this file with
// -DCPU_CAPABILITY=DEFAULT, AVX2 or AVX512 (and that capability's compiler flags), so at::vec::Vectorized
// is 8 or 16 floats wide and every function lands in its own duet::cpu_attention::<capability> namespace.
// The front end (paged_attention.cpp) validates the arguments and calls one of them.
//
// Both kernels read K and V in place through the block table (no gather, no padding to the longest
// sequence) and keep scores, softmax state and accumulators in float32 whatever the cache dtype.
//
// Decode (one query token per sequence). A work item is (sequence, context partition) and owns every query
// head; it walks the sequence's cache blocks in order, prefetching the next one (blocks are scattered: the
// hardware prefetcher cannot guess it). Within a block, each KV head's group of query heads runs together:
// its K rows are read once for the whole group (head_dim is the vector dimension, a score is a dot product
// and one horizontal sum), then its V rows once, with the group's output accumulators held in registers
// across the block's rows. Online softmax runs per cache block (max, rescale, exp, sum). When the batch is
// too small to keep every thread busy, long contexts are split into partitions of whole blocks; each writes
// an un-normalised (max, sum, acc) that a second pass merges.
//
// Prefill (flash attention over the paged cache). A work item is (sequence, KV head, query tile): up to
// 4 vectors' worth of rows, a row being one (query token, query head of the group). Rows are the vector
// dimension: queries are held transposed (qt[d][row]), so S^T = K Q^T and O^T += V^T P^T are both
// "broadcast one scalar, multiply a row of vectors" products with no horizontal sums and no transposed
// copy of K, and the softmax (max, exp, sum, rescale) runs on whole vectors of rows. Key tiles are cache
// blocks; only tiles that reach past the tile's first query position are masked (causal), and keys past
// the last query position are never read. Cached prefixes (prefix hits, earlier chunks) are simply the
// keys before the first new token. The score tile is [block_size, rows]: the full score matrix never exists.
//
// Items are handed to torch's intra-op threads one at a time, longest first, so causal tiles of uneven
// cost balance.

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
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Row vectors per prefill tile and rows of the broadcast product's register block: 4 x 4 accumulators
// + 4 operands fit the 32 AVX-512 registers, 2 x 4 + 4 the 16 AVX2 ones.
constexpr int64_t kTileVectors = 4;
constexpr int kRowBlock = kVec >= 16 ? 4 : 2;
// Decode asks for this many cache blocks ahead of the one it computes (blocks are scattered in memory), into
// L2 rather than L1: a block's K and V rows are as big as L1, and would evict the rows being computed.
constexpr int64_t kPrefetchBlocks = 1;
// A decode partition is at least this many tokens: shorter ones cost more in the merge than they gain.
constexpr int64_t kMinSplitTokens = 256;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Horizontal sum / max of one vector (hot: one per decode score).
float reduce_sum(const Vec& v) {
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

float reduce_max(const Vec& v) {
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
void to_float(const T* src, float* dst, int64_t n) {
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
void run_items(int64_t num_items, const MakeWorker& make) {
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

// ---- decode -------------------------------------------------------------------------------------------

struct DecodeItem {
  int64_t seq;
  int64_t row;          // query / out row
  int64_t token_begin;  // context range [token_begin, token_end) of this partition
  int64_t token_end;
  int64_t part_slot;    // -1: write out directly; else index of this partition's partial (see DecodeParts)
};

// Partials of split sequences: per (slot, query head) a max, a sum and an accumulator.
struct DecodeParts {
  float* max = nullptr;  // [num_slots, num_heads]
  float* sum = nullptr;  // [num_slots, num_heads]
  float* acc = nullptr;  // [num_slots, num_heads, padded_head_dim]
};

// acc += p * x over num_vectors vectors.
void axpy(float* acc, float p, const float* x, int64_t num_vectors) {
  const Vec vp(p);
  for (int64_t v = 0; v < num_vectors; ++v) {
    at::vec::fmadd(vp, Vec::loadu(x + v * kVec), Vec::loadu(acc + v * kVec)).store(acc + v * kVec);
  }
}

void scale_in_place(float* x, float s, int64_t num_vectors) {
  const Vec vs(s);
  for (int64_t v = 0; v < num_vectors; ++v) {
    (Vec::loadu(x + v * kVec) * vs).store(x + v * kVec);
  }
}

// x[i] = exp(x[i] - max) for i < n; returns the sum of the new values.
float exp_sum(float* x, int64_t n, float max) {
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

float max_of(const float* x, int64_t n) {
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

// Asks for the cache lines of rows [t0, t1) x all KV heads of one block (a cache block's rows of a layer are
// next to each other, but blocks are scattered: the hardware prefetcher cannot guess the next one).
template <typename T>
void prefetch_rows(const T* block, int64_t t0, int64_t t1, int64_t num_kv_heads, int64_t stride_token,
                   int64_t stride_head, int64_t head_dim) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      const T* row = block + t * stride_token + h * stride_head;
      for (int64_t d = 0; d < head_dim; d += kLine) {
        __builtin_prefetch(row + d, 0, 2);  // prefetcht1: to L2
      }
    }
  }
}

// Query heads one decode pass keeps in registers (a pass covers up to this many heads of a KV head's group).
constexpr int kHeadBlock = 4;
// Vectors of a row one V pass keeps in registers per head: kHeadBlock x kRowChunk accumulators + kRowChunk
// operands fit the 32 AVX-512 registers at 4, the 16 AVX2 ones at 2.
constexpr int64_t kRowChunk = kVec >= 16 ? 4 : 2;

// s[h * s_stride + t] = q_h . k_t for NH heads (q rows dp apart) and n key rows (k_stride apart), nv vectors
// each. A key vector is loaded once for all NH heads; one horizontal sum per score.
template <int NH>
void score_rows(const float* q, int64_t dp, int64_t nv, const float* k, int64_t k_stride, int64_t n, float* s,
                int64_t s_stride) {
  for (int64_t t = 0; t < n; ++t) {
    const float* kt = k + t * k_stride;
    Vec acc[NH];
    for (int h = 0; h < NH; ++h) {
      acc[h] = Vec(0.f);
    }
    for (int64_t v = 0; v < nv; ++v) {
      const Vec kv = Vec::loadu(kt + v * kVec);
      for (int h = 0; h < NH; ++h) {
        acc[h] = at::vec::fmadd(Vec::loadu(q + h * dp + v * kVec), kv, acc[h]);
      }
    }
    for (int h = 0; h < NH; ++h) {
      s[h * s_stride + t] = reduce_sum(acc[h]);
    }
  }
}

// acc_h[0:NC vectors] = acc_h * alpha_h + sum_t p[h * p_stride + t] * v_t[0:NC vectors] for NH heads (acc rows dp
// apart), the accumulators held in registers over all n value rows (v_stride apart).
template <int NH, int NC>
void accumulate_rows(float* acc, int64_t dp, const float* alpha, const float* p, int64_t p_stride, const float* v,
                     int64_t v_stride, int64_t n) {
  Vec o[NH][NC];
  for (int h = 0; h < NH; ++h) {
    const Vec a(alpha[h]);
    for (int j = 0; j < NC; ++j) {
      o[h][j] = Vec::loadu(acc + h * dp + j * kVec) * a;
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    Vec vv[NC];
    for (int j = 0; j < NC; ++j) {
      vv[j] = Vec::loadu(v + t * v_stride + j * kVec);
    }
    for (int h = 0; h < NH; ++h) {
      const Vec ph(p[h * p_stride + t]);
      for (int j = 0; j < NC; ++j) {
        o[h][j] = at::vec::fmadd(ph, vv[j], o[h][j]);
      }
    }
  }
  for (int h = 0; h < NH; ++h) {
    for (int j = 0; j < NC; ++j) {
      o[h][j].store(acc + h * dp + j * kVec);
    }
  }
}

// One pass of NH heads over n rows of one KV head: scores, online softmax, value accumulation.
template <int NH>
void attend_rows(const float* q, float* acc, int64_t dp, int64_t nv, const float* k, int64_t k_stride, const float* v,
                 int64_t v_stride, int64_t n, float* s, int64_t s_stride, float* max, float* sum) {
  score_rows<NH>(q, dp, nv, k, k_stride, n, s, s_stride);
  float alpha[NH];
  for (int h = 0; h < NH; ++h) {  // online softmax over this block's n scores
    float* sh = s + h * s_stride;
    const float m_new = std::max(max[h], max_of(sh, n));
    alpha[h] = std::exp(max[h] - m_new);  // 0 on the first block (max was -inf)
    sum[h] = sum[h] * alpha[h] + exp_sum(sh, n, m_new);
    max[h] = m_new;
  }
  int64_t j = 0;
  for (; j + kRowChunk <= nv; j += kRowChunk) {
    accumulate_rows<NH, kRowChunk>(acc + j * kVec, dp, alpha, s, s_stride, v + j * kVec, v_stride, n);
  }
  for (; j < nv; ++j) {
    accumulate_rows<NH, 1>(acc + j * kVec, dp, alpha, s, s_stride, v + j * kVec, v_stride, n);
  }
}

// All `group` heads of one KV head over n rows, in passes of kHeadBlock heads (then 2, then 1).
void attend_group(int64_t group, const float* q, float* acc, int64_t dp, int64_t nv, const float* k, int64_t k_stride,
                  const float* v, int64_t v_stride, int64_t n, float* s, int64_t s_stride, float* max, float* sum) {
  int64_t h = 0;
  for (; h + kHeadBlock <= group; h += kHeadBlock) {
    attend_rows<kHeadBlock>(q + h * dp, acc + h * dp, dp, nv, k, k_stride, v, v_stride, n, s + h * s_stride, s_stride,
                            max + h, sum + h);
  }
  for (; h + 2 <= group; h += 2) {
    attend_rows<2>(q + h * dp, acc + h * dp, dp, nv, k, k_stride, v, v_stride, n, s + h * s_stride, s_stride, max + h,
                   sum + h);
  }
  for (; h < group; ++h) {
    attend_rows<1>(q + h * dp, acc + h * dp, dp, nv, k, k_stride, v, v_stride, n, s + h * s_stride, s_stride, max + h,
                   sum + h);
  }
}

// One item: every query head of one sequence over one context partition, one cache block at a time (the next
// kPrefetchBlocks blocks prefetched while it is computed). Within a block, each KV head's `group` query heads
// run together: its K rows are read once for all of them (q in L1, one horizontal sum per score), then its V
// rows once, the heads' accumulators held in registers across the block's rows.
template <typename T>
class DecodeWorker {
 public:
  DecodeWorker(const AttentionArgs& a, const std::vector<DecodeItem>& items, const DecodeParts& parts)
      : a_(a), items_(items), parts_(parts), group_(a.num_heads / a.num_kv_heads),
        dp_(round_up(a.head_dim, kVec)), nv_(dp_ / kVec),
        q_(a.num_heads * dp_, 0.f), acc_(a.num_heads * dp_),
        kbuf_(a.block_size * dp_, 0.f), vbuf_(a.block_size * dp_, 0.f),
        scores_(a.num_heads * a.block_size), max_(a.num_heads), sum_(a.num_heads) {}

  void operator()(int64_t index) {
    const DecodeItem& it = items_[index];
    const AttentionArgs& a = a_;
    const int64_t G = group_, H = a.num_heads, KVH = a.num_kv_heads, D = a.head_dim, bs = a.block_size;
    const T* query = static_cast<const T*>(a.query) + it.row * a.q_stride_token;
    for (int64_t h = 0; h < H; ++h) {
      to_float(query + h * a.q_stride_head, q_.data() + h * dp_, D);  // padding stays 0
      scale_in_place(q_.data() + h * dp_, a.scale, nv_);
    }
    std::fill(acc_.begin(), acc_.end(), 0.f);
    std::fill(max_.begin(), max_.end(), kNegInf);
    std::fill(sum_.begin(), sum_.end(), 0.f);

    const int32_t* table = a.block_tables + it.seq * a.bt_stride;
    const T* k_cache = static_cast<const T*>(a.k_cache);
    const T* v_cache = static_cast<const T*>(a.v_cache);
    const int64_t b_begin = it.token_begin / bs, b_end = (it.token_end + bs - 1) / bs;
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t t0 = std::max<int64_t>(it.token_begin - b * bs, 0);
      const int64_t t1 = std::min<int64_t>(it.token_end - b * bs, bs);
      const int64_t n = t1 - t0;
      const T* kb = k_cache + table[b] * a.k_stride_block + t0 * a.k_stride_token;
      const T* vb = v_cache + table[b] * a.v_stride_block + t0 * a.v_stride_token;
      // Keep the next kPrefetchBlocks blocks coming (all of them at the first block, then one more per block).
      for (int64_t p = b == b_begin ? b + 1 : b + kPrefetchBlocks; p <= b + kPrefetchBlocks && p < b_end; ++p) {
        const int64_t p_t1 = std::min<int64_t>(it.token_end - p * bs, bs);
        prefetch_rows(k_cache + table[p] * a.k_stride_block, 0, p_t1, KVH, a.k_stride_token, a.k_stride_head, D);
        prefetch_rows(v_cache + table[p] * a.v_stride_block, 0, p_t1, KVH, a.v_stride_token, a.v_stride_head, D);
      }
      for (int64_t kvh = 0; kvh < KVH; ++kvh) {
        int64_t k_stride = a.k_stride_token, v_stride = a.v_stride_token;
        const float* k = rows(kb + kvh * a.k_stride_head, n, k_stride, kbuf_.data());
        const float* v = rows(vb + kvh * a.v_stride_head, n, v_stride, vbuf_.data());
        const int64_t h0 = kvh * G;
        attend_group(G, q_.data() + h0 * dp_, acc_.data() + h0 * dp_, dp_, nv_, k, k_stride, v, v_stride, n,
                     scores_.data() + h0 * bs, bs, max_.data() + h0, sum_.data() + h0);
      }
    }

    if (it.part_slot >= 0) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t p = it.part_slot * H + h;
        parts_.max[p] = max_[h];
        parts_.sum[p] = sum_[h];
        std::memcpy(parts_.acc + p * dp_, acc_.data() + h * dp_, dp_ * sizeof(float));
      }
      return;
    }
    T* out = static_cast<T*>(a.out) + it.row * a.o_stride_token;
    for (int64_t h = 0; h < H; ++h) {
      const float inv = sum_[h] > 0.f ? 1.f / sum_[h] : 0.f;  // an empty context gives zeros
      for (int64_t d = 0; d < D; ++d) {
        out[h * a.o_stride_head + d] = static_cast<T>(acc_[h * dp_ + d] * inv);
      }
    }
  }

 private:
  // n K or V rows (stride elements apart) as padded float32 rows: in place for float rows of whole vectors
  // (stride unchanged), else converted into buf (stride becomes dp).
  const float* rows(const T* src, int64_t n, int64_t& stride, float* buf) const {
    if constexpr (std::is_same_v<T, float>) {
      if (dp_ == a_.head_dim) {
        return src;
      }
    }
    for (int64_t t = 0; t < n; ++t) {
      to_float(src + t * stride, buf + t * dp_, a_.head_dim);  // padding stays 0
    }
    stride = dp_;
    return buf;
  }

  const AttentionArgs& a_;
  const std::vector<DecodeItem>& items_;
  const DecodeParts& parts_;
  const int64_t group_, dp_, nv_;
  std::vector<float> q_, acc_, kbuf_, vbuf_, scores_, max_, sum_;
};

// Longest first, so the dynamic hand-out ends with short items.
void sort_longest_first(std::vector<DecodeItem>& items) {
  std::stable_sort(items.begin(), items.end(), [](const DecodeItem& x, const DecodeItem& y) {
    return x.token_end - x.token_begin > y.token_end - y.token_begin;
  });
}

template <typename T>
void run_decode_items(const AttentionArgs& a, const std::vector<DecodeItem>& items, const DecodeParts& parts) {
  run_items(static_cast<int64_t>(items.size()), [&] { return DecodeWorker<T>(a, items, parts); });
}

// Merges the partitions of split sequences: out = sum_p exp(m_p - M) acc_p / sum_p exp(m_p - M) l_p.
template <typename T>
void merge_parts(const AttentionArgs& a, const std::vector<int64_t>& first_slot, const std::vector<int64_t>& num_parts,
                 const DecodeParts& parts) {
  const int64_t H = a.num_heads, D = a.head_dim, dp = round_up(D, kVec);
  at::parallel_for(0, a.num_seqs * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(dp);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t s = pair / H, h = pair % H;
      if (num_parts[s] <= 1) {
        continue;  // written directly by its single item
      }
      float m = kNegInf;
      for (int64_t p = 0; p < num_parts[s]; ++p) {
        m = std::max(m, parts.max[(first_slot[s] + p) * H + h]);
      }
      float l = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = 0; p < num_parts[s]; ++p) {
        const int64_t i = (first_slot[s] + p) * H + h;
        const float w = std::exp(parts.max[i] - m);
        l += w * parts.sum[i];
        axpy(acc.data(), w, parts.acc + i * dp, dp / kVec);
      }
      const float inv = l > 0.f ? 1.f / l : 0.f;
      T* out = static_cast<T*>(a.out) + s * a.o_stride_token + h * a.o_stride_head;
      for (int64_t d = 0; d < D; ++d) {
        out[d] = static_cast<T>(acc[d] * inv);
      }
    }
  });
}

// Partitions per sequence: none when the batch alone gives every thread a few sequences; otherwise enough
// for about four items per thread, each at least kMinSplitTokens long. An explicit num_splits only sets
// the count.
int64_t choose_num_splits(const AttentionArgs& a) {
  if (a.num_splits > 0) {
    return a.num_splits;
  }
  const int64_t target = 4 * static_cast<int64_t>(at::get_num_threads());
  return a.num_seqs >= target / 2 ? 1 : (target + a.num_seqs - 1) / a.num_seqs;
}

template <typename T>
void decode(const AttentionArgs& a) {
  const int64_t bs = a.block_size;
  const int64_t splits = choose_num_splits(a);
  const int64_t min_blocks = a.num_splits > 0 ? 1 : (kMinSplitTokens + bs - 1) / bs;
  std::vector<DecodeItem> items;
  std::vector<int64_t> first_slot(a.num_seqs, 0), num_parts(a.num_seqs, 1);
  int64_t num_slots = 0;
  items.reserve(a.num_seqs);
  for (int64_t s = 0; s < a.num_seqs; ++s) {
    const int64_t len = a.seq_lens[s];
    const int64_t blocks = (len + bs - 1) / bs;
    const int64_t per_part = std::max<int64_t>((blocks + splits - 1) / splits, min_blocks);
    const int64_t parts = blocks == 0 ? 1 : (blocks + per_part - 1) / per_part;
    num_parts[s] = parts;
    first_slot[s] = num_slots;
    for (int64_t p = 0; p < parts; ++p) {
      const int64_t begin = std::min(p * per_part * bs, len), end = std::min((p + 1) * per_part * bs, len);
      items.push_back({s, s, begin, end, parts > 1 ? num_slots + p : -1});
    }
    if (parts > 1) {
      num_slots += parts;
    }
  }
  sort_longest_first(items);
  const int64_t H = a.num_heads, dp = round_up(a.head_dim, kVec);
  std::vector<float> part_buf(num_slots * H * (2 + dp));
  DecodeParts parts;
  if (num_slots > 0) {
    parts = {part_buf.data(), part_buf.data() + num_slots * H, part_buf.data() + 2 * num_slots * H};
  }
  run_decode_items<T>(a, items, parts);
  if (num_slots > 0) {
    merge_parts<T>(a, first_slot, num_parts, parts);
  }
}

// ---- prefill ------------------------------------------------------------------------------------------

// C[x][0:R] (+)= sum_{y < ny} A[x * ax + y * ay] * B[y][0:R] for XB consecutive x, over NRV vectors of the
// R floats of each row of B and C (R = row stride). With accumulate, C is first multiplied by c_scale[0:R]
// (the online-softmax rescale); without, it starts at zero.
template <int XB, int NRV>
inline void bcast_product_block(const float* A, int64_t ax, int64_t ay, int64_t ny, const float* B, int64_t R,
                                float* C, bool accumulate, const float* c_scale) {
  Vec c[XB][NRV];
  for (int i = 0; i < XB; ++i) {
    for (int j = 0; j < NRV; ++j) {
      c[i][j] = accumulate ? Vec::loadu(C + i * R + j * kVec) * Vec::loadu(c_scale + j * kVec) : Vec(0.f);
    }
  }
  for (int64_t y = 0; y < ny; ++y) {
    Vec b[NRV];
    for (int j = 0; j < NRV; ++j) {
      b[j] = Vec::loadu(B + y * R + j * kVec);
    }
    for (int i = 0; i < XB; ++i) {
      const Vec av(A[i * ax + y * ay]);
      for (int j = 0; j < NRV; ++j) {
        c[i][j] = at::vec::fmadd(av, b[j], c[i][j]);
      }
    }
  }
  for (int i = 0; i < XB; ++i) {
    for (int j = 0; j < NRV; ++j) {
      c[i][j].store(C + i * R + j * kVec);
    }
  }
}

template <int NRV>
void bcast_product_rows(const float* A, int64_t ax, int64_t ay, int64_t nx, int64_t ny, const float* B, int64_t R,
                        float* C, bool accumulate, const float* c_scale) {
  int64_t x = 0;
  for (; x + kRowBlock <= nx; x += kRowBlock) {
    bcast_product_block<kRowBlock, NRV>(A + x * ax, ax, ay, ny, B, R, C + x * R, accumulate, c_scale);
  }
  for (; x < nx; ++x) {
    bcast_product_block<1, NRV>(A + x * ax, ax, ay, ny, B, R, C + x * R, accumulate, c_scale);
  }
}

// The whole product for x < nx over all R = num_vectors * kVec columns, in register blocks of 4 vectors.
void bcast_product(const float* A, int64_t ax, int64_t ay, int64_t nx, int64_t ny, const float* B, int64_t R,
                   float* C, bool accumulate, const float* c_scale) {
  for (int64_t j0 = 0; j0 < R / kVec; j0 += 4) {
    const int64_t off = j0 * kVec;
    const float* cs = c_scale == nullptr ? nullptr : c_scale + off;
    switch (std::min<int64_t>(4, R / kVec - j0)) {
      case 4: bcast_product_rows<4>(A, ax, ay, nx, ny, B + off, R, C + off, accumulate, cs); break;
      case 3: bcast_product_rows<3>(A, ax, ay, nx, ny, B + off, R, C + off, accumulate, cs); break;
      case 2: bcast_product_rows<2>(A, ax, ay, nx, ny, B + off, R, C + off, accumulate, cs); break;
      default: bcast_product_rows<1>(A, ax, ay, nx, ny, B + off, R, C + off, accumulate, cs); break;
    }
  }
}

struct PrefillItem {
  int64_t seq;
  int64_t kv_head;
  int64_t q_begin;  // query tile: new tokens [q_begin, q_end) of the sequence (0 = its first new token)
  int64_t q_end;
  int64_t cost;     // rows x keys read, for the longest-first order
};

// Query tokens per tile: up to kTileVectors vectors of rows (token x query head of the group).
int64_t tile_tokens(int64_t group) { return std::max<int64_t>(1, kTileVectors * kVec / group); }

template <typename T>
class PrefillWorker {
 public:
  PrefillWorker(const AttentionArgs& a, const std::vector<PrefillItem>& items)
      : a_(a), items_(items), group_(a.num_heads / a.num_kv_heads),
        max_rows_(round_up(tile_tokens(group_) * group_, kVec)),
        qt_(a.head_dim * max_rows_), ot_(a.head_dim * max_rows_), st_(a.block_size * max_rows_),
        kbuf_(std::is_same_v<T, float> ? 0 : a.block_size * a.head_dim),
        vbuf_(std::is_same_v<T, float> ? 0 : a.block_size * a.head_dim),
        max_(max_rows_), sum_(max_rows_), alpha_(max_rows_), qpos_(max_rows_) {}

  void operator()(int64_t index) {
    const PrefillItem& it = items_[index];
    const AttentionArgs& a = a_;
    const int64_t G = group_, D = a.head_dim, bs = a.block_size;
    const int64_t seq_len = a.seq_lens[it.seq];
    const int64_t q_row0 = a.cu_seqlens_q[it.seq];
    const int64_t q_len = a.cu_seqlens_q[it.seq + 1] - q_row0;
    const int64_t context = seq_len - q_len;  // cached tokens before the first new one
    const int64_t num_q = it.q_end - it.q_begin;
    const int64_t live_rows = num_q * G;
    const int64_t R = round_up(live_rows, kVec);
    const int64_t nrv = R / kVec;

    // qt[d][r] = scale * query[token of r][head of r][d]; padding rows are zero queries at the last
    // token's position, so they never see an all-masked tile.
    const T* query = static_cast<const T*>(a.query) + (q_row0 + it.q_begin) * a.q_stride_token
                     + it.kv_head * G * a.q_stride_head;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = std::min(r / G, num_q - 1);
      qpos_[r] = static_cast<float>(context + it.q_begin + i);
      if (r < live_rows) {
        const T* src = query + i * a.q_stride_token + (r % G) * a.q_stride_head;
        for (int64_t d = 0; d < D; ++d) {
          qt_[d * R + r] = static_cast<float>(src[d]) * a.scale;
        }
      } else {
        for (int64_t d = 0; d < D; ++d) {
          qt_[d * R + r] = 0.f;
        }
      }
    }
    std::fill(ot_.begin(), ot_.begin() + D * R, 0.f);
    std::fill(max_.begin(), max_.begin() + R, kNegInf);
    std::fill(sum_.begin(), sum_.begin() + R, 0.f);

    const int32_t* table = a.block_tables + it.seq * a.bt_stride;
    const T* k_cache = static_cast<const T*>(a.k_cache) + it.kv_head * a.k_stride_head;
    const T* v_cache = static_cast<const T*>(a.v_cache) + it.kv_head * a.v_stride_head;
    const int64_t key_end = context + it.q_end;  // keys after the tile's last query are never read
    const int64_t first_masked = context + it.q_begin + 1;  // first key some row of the tile must not see
    for (int64_t b = 0; b * bs < key_end; ++b) {
      const int64_t k0 = b * bs;
      const int64_t n = std::min(bs, key_end - k0);
      const int64_t block = table[b];
      int64_t k_stride = 0, v_stride = 0;
      const float* k = rows(k_cache + block * a.k_stride_block, a.k_stride_token, n, kbuf_.data(), k_stride);
      // S^T[t][r] = sum_d K[t][d] * qt[d][r]
      bcast_product(k, k_stride, 1, n, D, qt_.data(), R, st_.data(), false, nullptr);
      if (k0 + n > first_masked) {
        for (int64_t t = std::max<int64_t>(first_masked - k0, 0); t < n; ++t) {
          const Vec kpos(static_cast<float>(k0 + t));
          for (int64_t j = 0; j < nrv; ++j) {
            float* s = st_.data() + t * R + j * kVec;
            Vec::blendv(Vec::loadu(s), Vec(kNegInf), Vec::loadu(qpos_.data() + j * kVec) < kpos).store(s);
          }
        }
      }
      for (int64_t j = 0; j < nrv; ++j) {  // online softmax, vectors of rows
        const int64_t off = j * kVec;
        Vec m = Vec::loadu(max_.data() + off);
        for (int64_t t = 0; t < n; ++t) {
          m = at::vec::maximum(m, Vec::loadu(st_.data() + t * R + off));
        }
        Vec sum(0.f);
        for (int64_t t = 0; t < n; ++t) {
          float* s = st_.data() + t * R + off;
          const Vec p = (Vec::loadu(s) - m).exp_u20();  // masked: exp(-inf) = 0
          p.store(s);
          sum = sum + p;
        }
        const Vec alpha = (Vec::loadu(max_.data() + off) - m).exp_u20();  // 0 on the first tile
        (Vec::loadu(sum_.data() + off) * alpha + sum).store(sum_.data() + off);
        m.store(max_.data() + off);
        alpha.store(alpha_.data() + off);
      }
      const float* v = rows(v_cache + block * a.v_stride_block, a.v_stride_token, n, vbuf_.data(), v_stride);
      // O^T[d][r] = alpha[r] * O^T[d][r] + sum_t V[t][d] * P^T[t][r]
      bcast_product(v, 1, v_stride, D, n, st_.data(), R, ot_.data(), true, alpha_.data());
    }

    T* out = static_cast<T*>(a.out) + (q_row0 + it.q_begin) * a.o_stride_token + it.kv_head * G * a.o_stride_head;
    for (int64_t r = 0; r < live_rows; ++r) {
      T* dst = out + (r / G) * a.o_stride_token + (r % G) * a.o_stride_head;
      const float inv = 1.f / sum_[r];  // > 0: key 0 is visible to every row
      for (int64_t d = 0; d < D; ++d) {
        dst[d] = static_cast<T>(ot_[d * R + r] * inv);
      }
    }
  }

 private:
  // n rows of one block as float32 with a row stride (set in `stride`): in place for float caches.
  const float* rows(const T* src, int64_t src_stride, int64_t n, float* buf, int64_t& stride) const {
    if constexpr (std::is_same_v<T, float>) {
      stride = src_stride;
      return src;
    } else {
      for (int64_t t = 0; t < n; ++t) {
        to_float(src + t * src_stride, buf + t * a_.head_dim, a_.head_dim);
      }
      stride = a_.head_dim;
      return buf;
    }
  }

  const AttentionArgs& a_;
  const std::vector<PrefillItem>& items_;
  const int64_t group_, max_rows_;
  std::vector<float> qt_, ot_, st_, kbuf_, vbuf_, max_, sum_, alpha_, qpos_;
};

template <typename T>
void prefill(const AttentionArgs& a) {
  const int64_t G = a.num_heads / a.num_kv_heads;
  const int64_t tile = tile_tokens(G);
  std::vector<PrefillItem> items;
  std::vector<DecodeItem> single;  // sequences with one new token take the decode path (no padded rows)
  for (int64_t s = 0; s < a.num_seqs; ++s) {
    const int64_t q_len = a.cu_seqlens_q[s + 1] - a.cu_seqlens_q[s];
    const int64_t context = a.seq_lens[s] - q_len;
    if (q_len == 1) {
      single.push_back({s, a.cu_seqlens_q[s], 0, a.seq_lens[s], -1});
      continue;
    }
    for (int64_t q0 = 0; q0 < q_len; q0 += tile) {
      const int64_t q1 = std::min(q0 + tile, q_len);
      for (int64_t kvh = 0; kvh < a.num_kv_heads; ++kvh) {
        items.push_back({s, kvh, q0, q1, (q1 - q0) * (context + q1)});
      }
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const PrefillItem& x, const PrefillItem& y) {
    return x.cost > y.cost;
  });
  run_items(static_cast<int64_t>(items.size()), [&] { return PrefillWorker<T>(a, items); });
  sort_longest_first(single);
  run_decode_items<T>(a, single, DecodeParts{});
}

template <typename F>
void dispatch_dtype(c10::ScalarType dtype, const F& f) {
  switch (dtype) {
    case c10::ScalarType::Float: f(float{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "duet attention kernels: unsupported dtype ", dtype);  // checked earlier
  }
}

}  // namespace

void paged_decode_attention(const AttentionArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) { decode<decltype(tag)>(a); });
}

void paged_prefill_attention(const AttentionArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) { prefill<decltype(tag)>(a); });
}

int64_t parallel_threads() {
  std::atomic<int64_t> threads{1};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num() + 1;
    for (int64_t seen = threads.load(); seen < tid && !threads.compare_exchange_weak(seen, tid);) {
    }
  });
  return threads.load();
}

}  // namespace CPU_CAPABILITY
}  // namespace duet::cpu_attention
