// CPU paged prefill attention, one copy per instruction set (see cpu_attention_common.h).
//
// Prefill (flash attention over the paged cache). A work item is (sequence, KV head, query tile): up to
// 4 vectors' worth of rows, a row being one (query token, query head of the group). Rows are the vector
// dimension: queries are held transposed (qt[d][row]), so S^T = K Q^T and O^T += V^T P^T are both
// "broadcast one scalar, multiply a row of vectors" products with no horizontal sums and no transposed
// copy of K, and the softmax (max, exp, sum, rescale) runs on whole vectors of rows. Key tiles are cache
// blocks; only tiles that reach past the tile's first query position are masked (causal), and keys past
// the last query position are never read. Cached prefixes (prefix hits, earlier chunks) are simply the
// keys before the first new token. The score tile is [block_size, rows]: the full score matrix never exists.

#include "cpu_attention_common.h"

namespace duet::cpu_attention {
namespace CPU_CAPABILITY {
namespace {

// Row vectors per prefill tile and rows of the broadcast product's register block: 4 x 4 accumulators
// + 4 operands fit the 32 AVX-512 registers, 2 x 4 + 4 the 16 AVX2 ones.
constexpr int64_t kTileVectors = 4;
constexpr int kRowBlock = kVec >= 16 ? 4 : 2;

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
  run_unsplit_decode(a, single);
}

}  // namespace

void paged_prefill_attention(const AttentionArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) { prefill<decltype(tag)>(a); });
}

}  // namespace CPU_CAPABILITY
}  // namespace duet::cpu_attention
