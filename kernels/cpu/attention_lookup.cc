#include "kernels/cpu/attention_lookup.h"

#include <vector>

#include "kernels/hadamard.h"

namespace quantkv::kernels::attention_internal {

bool KeyLookup::Usable(const KvLayerView& kv, int64_t h) {
  return kv.k_pre_rope == nullptr && !kv.has_floor &&
         KvVectorLayoutOf(*kv.k.codecs[h]).centroids != nullptr;
}

KeyLookup::KeyLookup(const KvLayerView& kv, int64_t h)
    : kv_(kv), h_(h), layout_(KvVectorLayoutOf(*kv.k.codecs[h])) {}

void KeyLookup::Build(const float* q, float* table) const {
  const int64_t d = kv_.head_dim, m = layout_.dims, n = int64_t{1} << layout_.bits;
  // Stored keys are M k (M the orthonormal rotation); q . k = (M q) . (M k).
  thread_local std::vector<float> qr;
  qr.assign(q, q + d);
  if (kv_.k_rotation != nullptr) HadamardRotate(qr.data(), 1, d, kv_.k_rotation, false);
  for (int64_t j = 0; j < layout_.subs; ++j) {
    const float* qj = qr.data() + j * m;
    float* tj = table + j * n;
    for (int64_t c = 0; c < n; ++c) {
      const float* ce = layout_.centroids + c * m;
      float s = 0;
      for (int64_t i = 0; i < m; ++i) s += qj[i] * ce[i];
      tj[c] = s;
    }
  }
}

}  // namespace quantkv::kernels::attention_internal
