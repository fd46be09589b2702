// Internal to kernels/cpu: shared between attention.cc (the driver, the tiled path for
// prefill) and attention_decode.cc (the decode kernels that read codes directly).
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/attention.h"
#include "kernels/dequantize.h"
#include "kernels/hadamard.h"

namespace quantkv::kernels::attention_internal {

// Rows [t0, t1) x head_dim of head h of K (kv = 0) or V (kv = 1), in either form:
// Encoded() decodes them from their blocks, Exact() reads the protected copy (sinks for
// t < sink_tokens, the ring otherwise).
class RowSource {
 public:
  RowSource(const KvLayerView& v, int kv, int64_t h) : v_(v), kv_(kv), h_(h) {}

  // Tokens must lie in encoded blocks (t1 <= n_blocks * block_tokens).
  void Encoded(int64_t t0, int64_t t1, float* out) const {
    for (int64_t t = t0; t < t1;) {
      const int64_t b = t / v_.block_tokens;
      const int64_t end = std::min(t1, (b + 1) * v_.block_tokens);
      const KvSlabs& slabs = v_.SlabsOf(kv_, b);
      slabs.codecs[h_]->Decode(slabs.Slab(v_.block_table[b], h_), t - b * v_.block_tokens,
                               end - b * v_.block_tokens, out + (t - t0) * v_.head_dim);
      t = end;
    }
    const float* rotation = kv_ ? v_.v_rotation : v_.k_rotation;
    if (rotation != nullptr) {
      HadamardRotate(out, t1 - t0, v_.head_dim, rotation, /*inverse=*/true);
    }
    if (kv_ == 0 && v_.k_pre_rope != nullptr) {
      v_.k_pre_rope->RotateRows(out, t1 - t0, t0, /*inverse=*/false);
    }
  }

  void Exact(int64_t t0, int64_t t1, float* out) const {
    for (int64_t t = t0; t < t1; ++t) {
      const bool sink = t < v_.sink_tokens;
      const uint8_t* base = sink ? (kv_ ? v_.v_sinks : v_.k_sinks) : (kv_ ? v_.v_ring : v_.k_ring);
      const int64_t row = sink ? t : t % v_.ring_tokens;
      const int64_t off = (row * v_.n_kv_heads + h_) * v_.head_dim;
      float* o = out + (t - t0) * v_.head_dim;
      if (v_.storage == KvStorage::kF32) {
        std::copy_n(reinterpret_cast<const float*>(base) + off, v_.head_dim, o);
      } else {
        Fp16ToFp32Row(reinterpret_cast<const uint16_t*>(base) + off, o, v_.head_dim);
      }
    }
  }

 private:
  const KvLayerView& v_;
  int kv_;
  int64_t h_;
};

// Decode kernels: at most this many queries per call (each is processed on its own), head_dim
// a multiple of 16 up to kDecodeMaxHeadDim, and a CPU with AVX-512 F/BW/VL/VNNI (QUANTKV_ISA
// caps it like the other kernels). Otherwise Attention() uses its tiled path.
constexpr int64_t kDecodeMaxQueries = 4;
constexpr int64_t kDecodeMaxHeadDim = 256;
bool DecodeKernelsUsable(int64_t n_q, int64_t head_dim);

// Online-softmax state update of `n_rows` query heads (rows of q, [n_rows][head_dim], one
// query at position p, all reading KV head h) over tokens [t0, min(t1, p + 1)): m, l are
// [n_rows], acc is [n_rows][head_dim], all already initialised (-inf, 0, 0) or carrying
// earlier tokens. Scores are scale * q.k. Encoded uniform per-token-group blocks are read
// code by code (no decoded tile); every other form is decoded to a tile first.
void DecodeRange(const KvLayerView& kv, int64_t h, const float* q, int64_t n_rows, float scale,
                 int64_t p, int64_t t0, int64_t t1, float* m, float* l, float* acc);

}  // namespace quantkv::kernels::attention_internal
