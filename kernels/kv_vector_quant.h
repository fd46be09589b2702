// Product (vector) quantization of KV rows (KvCodecType::kVector, spec "pqMxB"): each
// token's head row is divided by its RMS (one fp16 scale per token), cut into head_dim / M
// sub-vectors of M channels, and each sub-vector stored as the B-bit index of its nearest
// centroid in one codebook of 2^B centroids shared by the sub-vectors of a layer's K (or V).
// Sharing one codebook across sub-spaces works because the cache can Hadamard-rotate rows
// first (rotate=k|v|kv), which makes the sub-spaces statistically alike. The codebook is
// fitted by k-means on calibration rows (`quantkv calibrate`), normalised exactly as the
// encoder normalises them.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/fp16.h"
#include "kernels/kv_codec.h"

namespace quantkv::kernels {

// The normalised sub-vectors ([n][M], appended to `out`) the encoder would quantize for rows
// x ([n_rows][row_width], row_width a multiple of head_dim: several heads side by side).
void KvVectorNormalize(const KvCodecSpec& spec, const float* x, int64_t n_rows, int64_t row_width,
                       int64_t head_dim, std::vector<float>& out);

// k-means (Lloyd's algorithm from a k-means++ start, fixed seed, so fits are reproducible)
// of 2^bits centroids of vector_dims values over sub-vectors [n][vector_dims]; at most
// max_samples of them (an even stride through the data) are used.
absl::StatusOr<std::vector<float>> FitKvVectorCodebook(const KvCodecSpec& spec,
                                                       const std::vector<float>& subvectors,
                                                       int iters = 16, int64_t max_samples = 65536);

// Read access to a pqMxB codec's centroids and slab layout (block_tokens fp16 row scales,
// then `bits`-bit codes in [token][sub-vector] order, LSB-first), so attention can score keys
// from per-query lookup tables instead of decoding them.
struct KvVectorLayout {
  const float* centroids = nullptr;  // [2^bits][dims]; nullptr: not a pqMxB codec
  int64_t dims = 0, bits = 0, subs = 0, block_tokens = 0;
};
KvVectorLayout KvVectorLayoutOf(const KvCodec& codec);

inline float KvVectorRowScale(const uint8_t* slab, int64_t t) {
  uint16_t h;
  std::memcpy(&h, slab + 2 * t, 2);
  return Fp16ToFp32(h);
}

// Code of sub-vector j of token t (a code spans at most three bytes: bits <= 12).
inline uint32_t KvVectorCode(const KvVectorLayout& l, const uint8_t* slab, int64_t t, int64_t j) {
  const uint8_t* codes = slab + 2 * l.block_tokens;
  const int64_t bit = (t * l.subs + j) * l.bits;
  uint32_t v = 0;
  for (int64_t b = 0; b < 3 && (bit & 7) + l.bits > 8 * b; ++b) {
    v |= static_cast<uint32_t>(codes[(bit >> 3) + b]) << (8 * b);
  }
  return (v >> (bit & 7)) & ((1u << l.bits) - 1);
}

}  // namespace quantkv::kernels
