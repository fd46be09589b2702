// Internal to kernels/cpu: scoring product-quantized keys (pqMxB) by table lookup. For one
// query row, table[j][c] = q_j . centroid_c over sub-vector j's channels; then
// q . k_t = scale_t * sum_j table[j][code_tj] — head_dim / M additions per key instead of
// decoding head_dim values and a dot product. Rotated keys (rotate=k|kv) are scored against
// the query rotated the same way (the rotation is orthonormal, so dot products agree).
// Pre-RoPE keys cannot be scored this way (the rotary embedding acts on the decoded key).
#pragma once

#include <cstdint>

#include "kernels/attention.h"
#include "kernels/kv_vector_quant.h"

namespace quantkv::kernels::attention_internal {

class KeyLookup {
 public:
  // True when head h's keys are pqMxB and not stored pre-RoPE.
  static bool Usable(const KvLayerView& kv, int64_t h);

  KeyLookup(const KvLayerView& kv, int64_t h);

  int64_t table_size() const { return layout_.subs << layout_.bits; }
  // table[table_size()] for query row q[head_dim].
  void Build(const float* q, float* table) const;
  // q . k_t for a token t stored in an encoded block.
  float Dot(const float* table, int64_t t) const {
    const int64_t b = t / kv_.block_tokens, tt = t - b * kv_.block_tokens;
    const uint8_t* slab = kv_.k.Slab(kv_.block_table[b], h_);
    float s = 0;
    const int64_t stride = int64_t{1} << layout_.bits;
    for (int64_t j = 0; j < layout_.subs; ++j) {
      s += table[j * stride + KvVectorCode(layout_, slab, tt, j)];
    }
    return KvVectorRowScale(slab, tt) * s;
  }

 private:
  const KvLayerView& kv_;
  int64_t h_;
  KvVectorLayout layout_;
};

}  // namespace quantkv::kernels::attention_internal
