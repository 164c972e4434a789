// CPU paged decode attention, one copy per instruction set (see cpu_attention_common.h).
//
// Decode (one query token per sequence). A work item is (sequence, context partition) and owns every query
// head; it walks the sequence's cache blocks in order, prefetching the next one (blocks are scattered: the
// hardware prefetcher cannot guess it). Within a block, each KV head's group of query heads runs together:
// its K rows are read once for the whole group (head_dim is the vector dimension, a score is a dot product
// and one horizontal sum), then its V rows once, with the group's output accumulators held in registers
// across the block's rows. Online softmax runs per cache block (max, rescale, exp, sum). When the batch is
// too small to keep every thread busy, long contexts are split into partitions of whole blocks; each writes
// an un-normalised (max, sum, acc) that a second pass merges.

#include "cpu_attention_common.h"

namespace duet::cpu_attention {
namespace CPU_CAPABILITY {
namespace {

// Decode asks for this many cache blocks ahead of the one it computes (blocks are scattered in memory), into
// L2 rather than L1: a block's K and V rows are as big as L1, and would evict the rows being computed.
constexpr int64_t kPrefetchBlocks = 1;
// A decode partition is at least this many tokens: shorter ones cost more in the merge than they gain.
constexpr int64_t kMinSplitTokens = 256;

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

}  // namespace

void run_unsplit_decode(const AttentionArgs& a, std::vector<DecodeItem>& items) {
  sort_longest_first(items);
  dispatch_dtype(a.dtype, [&](auto tag) { run_decode_items<decltype(tag)>(a, items, DecodeParts{}); });
}

void paged_decode_attention(const AttentionArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) { decode<decltype(tag)>(a); });
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
