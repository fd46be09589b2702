#include "kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/quant_dot.h"
#include "kernels/dequantize.h"

namespace quantkv::kernels {
namespace {

// Pointer to token t of kv head h in the K (or V) pool, and its element storage.
inline const uint8_t* TokenRow(const uint8_t* base, int64_t block_bytes, const int32_t* table,
                               int64_t block_tokens, int64_t head_dim, int64_t elem_bytes,
                               int64_t h, int64_t t) {
  const int64_t block = table[t / block_tokens];
  const int64_t in_block = t % block_tokens;
  return base + block * block_bytes + ((h * block_tokens + in_block) * head_dim) * elem_bytes;
}

inline void LoadRow(KvStorage s, const uint8_t* p, float* out, int64_t n) {
  if (s == KvStorage::kF32) {
    std::copy_n(reinterpret_cast<const float*>(p), n, out);
  } else {
    Fp16ToFp32Row(reinterpret_cast<const uint16_t*>(p), out, n);
  }
}

}  // namespace

int64_t KvStorageBytes(KvStorage s) { return s == KvStorage::kF32 ? 4 : 2; }

void PagedAttention(const AttentionQuery& query, const PagedKvLayerView& kv, float* out,
                    ThreadPool* pool) {
  const int64_t d = kv.head_dim;
  const int64_t group = query.n_heads / kv.n_kv_heads;
  const int64_t kb = KvStorageBytes(kv.k_storage);
  const int64_t vb = KvStorageBytes(kv.v_storage);
  // One task per (query row, kv head): every K/V row it reads serves the whole head group.
  const int64_t n_tasks = query.n_q * kv.n_kv_heads;
  auto run = [&](int64_t t0, int64_t t1, int) {
    std::vector<float> scores;
    std::vector<float> row(static_cast<size_t>(d));
    std::vector<float> acc(static_cast<size_t>(group * d));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t i = task / kv.n_kv_heads;
      const int64_t g = task % kv.n_kv_heads;
      const int64_t n_ctx = std::min<int64_t>(query.positions[i] + 1, kv.n_tokens);
      scores.assign(static_cast<size_t>(group * n_ctx), 0.0f);
      const float* q0 = query.q + (i * query.n_heads + g * group) * d;
      for (int64_t t = 0; t < n_ctx; ++t) {
        LoadRow(kv.k_storage,
                TokenRow(kv.k_base, kv.k_block_bytes, kv.block_table, kv.block_tokens, d, kb, g, t),
                row.data(), d);
        for (int64_t j = 0; j < group; ++j) {
          scores[j * n_ctx + t] = internal::DotF32(q0 + j * d, row.data(), d) * query.scale;
        }
      }
      for (int64_t j = 0; j < group; ++j) {
        float* s = scores.data() + j * n_ctx;
        const float mx = *std::max_element(s, s + n_ctx);
        double sum = 0.0;
        for (int64_t t = 0; t < n_ctx; ++t) {
          s[t] = std::exp(s[t] - mx);
          sum += s[t];
        }
        const float inv = static_cast<float>(1.0 / sum);
        for (int64_t t = 0; t < n_ctx; ++t) s[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t t = 0; t < n_ctx; ++t) {
        LoadRow(kv.v_storage,
                TokenRow(kv.v_base, kv.v_block_bytes, kv.block_table, kv.block_tokens, d, vb, g, t),
                row.data(), d);
        for (int64_t j = 0; j < group; ++j) {
          const float p = scores[j * n_ctx + t];
          float* a = acc.data() + j * d;
          for (int64_t e = 0; e < d; ++e) a[e] += p * row[e];
        }
      }
      for (int64_t j = 0; j < group; ++j) {
        std::copy_n(acc.data() + j * d, d, out + (i * query.n_heads + g * group + j) * d);
      }
    }
  };
  if (pool == nullptr) {
    run(0, n_tasks, 0);
  } else {
    pool->ParallelFor(n_tasks, run);
  }
}

}  // namespace quantkv::kernels
