#include "kernels/attention_mass.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/attention_internal.h"
#include "kernels/cpu/quant_dot.h"

namespace quantkv::kernels {

void AddAttentionMass(const AttentionQuery& query, const float* lse, const KvLayerView& kv,
                      int64_t t0, int64_t t1, float* mass) {
  const int64_t d = kv.head_dim;
  const int64_t group = query.n_heads / kv.n_kv_heads;
  t1 = std::min(t1, kv.n_tokens);
  const int64_t ring_first = std::max<int64_t>(0, kv.n_tokens - kv.ring_tokens);
  std::vector<float> keys;
  for (int64_t h = 0; h < kv.n_kv_heads; ++h) {
    const attention_internal::RowSource source(kv, 0, h);
    for (int64_t t = t0; t < t1; ++t) {
      if (t >= kv.sink_tokens && t < ring_first) continue;  // no exact copy left
      keys.resize(static_cast<size_t>(d));
      source.Exact(t, t + 1, keys.data());
      double sum = 0;
      for (int64_t i = 0; i < query.n_q; ++i) {
        const int64_t p = query.positions[i];
        if (p < t || SkipsToken(kv, h, p, t)) continue;
        for (int64_t j = 0; j < group; ++j) {
          const int64_t head = h * group + j;
          const float* q = query.q + (i * query.n_heads + head) * d;
          const float score = internal::DotF32(q, keys.data(), d) * query.scale;
          sum += std::exp(static_cast<double>(score) - lse[i * query.n_heads + head]);
        }
      }
      mass[t - t0] += static_cast<float>(sum);
    }
  }
}

}  // namespace quantkv::kernels
