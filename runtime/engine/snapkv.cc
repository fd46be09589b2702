#include "runtime/engine/snapkv.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_format.h"
#include "kernels/dequantize.h"
#include "kernels/matmul.h"
#include "runtime/util/status_macros.h"

namespace quantkv {

absl::StatusOr<std::vector<float>> SnapKvScores(const KvCache& cache, const SequenceKv& seq,
                                                int64_t layer, int64_t n_tokens,
                                                const SnapKvQueries& queries, int pool_kernel,
                                                kernels::ThreadPool* pool) {
  const int64_t n_kv = cache.config().n_kv_heads, d = cache.config().head_dim;
  const int64_t n_heads = queries.n_heads;
  if (n_heads <= 0 || n_heads % n_kv != 0 || queries.n_q < 0 || n_tokens < 0 || pool_kernel < 1 ||
      pool_kernel % 2 == 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "SnapKV scores: %d query heads over %d KV heads, %d queries, %d tokens, pooling %d "
        "(want heads a multiple of the KV heads and an odd pooling width)",
        n_heads, n_kv, queries.n_q, n_tokens, pool_kernel));
  }
  for (int64_t i = 0; i < queries.n_q; ++i) {
    if (queries.positions[i] < 0 || queries.positions[i] >= n_tokens) {
      return absl::InvalidArgumentError(
          absl::StrFormat("SnapKV scores: query %d at position %d outside the %d tokens", i,
                          queries.positions[i], n_tokens));
    }
  }
  const int64_t group = n_heads / n_kv;
  std::vector<float> scores(static_cast<size_t>(n_tokens), 0.0f);
  if (queries.n_q == 0 || n_tokens == 0) return scores;
  // Per KV head: its exact keys [n_tokens][d] and the group's query rows, one GEMM for all
  // window queries, then a softmax per row (float64 sums) over the tokens it sees.
  std::vector<float> keys(static_cast<size_t>(n_tokens * d));
  std::vector<float> rows(static_cast<size_t>(queries.n_q * group * d));
  std::vector<float> logits(static_cast<size_t>(queries.n_q * group * n_tokens));
  for (int64_t g = 0; g < n_kv; ++g) {
    for (int64_t t = 0; t < n_tokens; ++t) {
      const uint8_t* r = cache.RetainedRow(seq, layer, 0, t);
      if (r == nullptr) {
        return absl::FailedPreconditionError(
            absl::StrFormat("SnapKV scores: layer %d token %d's key is not retained", layer, t));
      }
      float* out = keys.data() + t * d;
      if (cache.storage() == kernels::KvStorage::kF32) {
        std::copy_n(reinterpret_cast<const float*>(r) + g * d, d, out);
      } else {
        kernels::Fp16ToFp32Row(reinterpret_cast<const uint16_t*>(r) + g * d, out, d);
      }
    }
    for (int64_t i = 0; i < queries.n_q; ++i) {
      std::copy_n(queries.q + (i * n_heads + g * group) * d, group * d,
                  rows.data() + i * group * d);
    }
    const kernels::WeightMatrix w{kernels::GgmlType::kF32,
                                  reinterpret_cast<const uint8_t*>(keys.data()), n_tokens, d};
    QKV_RETURN_IF_ERROR(kernels::MatMul(w, rows.data(), queries.n_q * group, logits.data(), pool));
    for (int64_t i = 0; i < queries.n_q; ++i) {
      const int64_t seen = queries.positions[i] + 1;
      for (int64_t j = 0; j < group; ++j) {
        const float* s = logits.data() + (i * group + j) * n_tokens;
        double mx = -INFINITY, sum = 0;
        for (int64_t t = 0; t < seen; ++t) mx = std::max<double>(mx, queries.scale * s[t]);
        for (int64_t t = 0; t < seen; ++t) sum += std::exp(queries.scale * s[t] - mx);
        for (int64_t t = 0; t < seen; ++t) {
          scores[t] += static_cast<float>(std::exp(queries.scale * s[t] - mx) / sum);
        }
      }
    }
  }
  if (pool_kernel == 1) return scores;
  std::vector<float> pooled(scores.size());
  const int64_t half = pool_kernel / 2;
  for (int64_t t = 0; t < n_tokens; ++t) {
    float m = 0;
    for (int64_t u = std::max<int64_t>(0, t - half); u <= std::min(n_tokens - 1, t + half); ++u) {
      m = std::max(m, scores[u]);
    }
    pooled[t] = m;
  }
  return pooled;
}

}  // namespace quantkv
