// Internal to kernels/cpu: the inner loop of the tiled attention path (attention.cc), which
// serves prefill chunks and every call that must not take the decode kernels. One call
// updates the online-softmax state of one query's GQA rows over one tile of tokens.
//
// Each row is computed on its own, with the same operations whatever else is in the call
// (other rows, other queries of the query tile), so a row's result depends only on the
// tile boundaries along the sequence: batching stays bit-invariant.
#pragma once

#include <cstdint>

namespace quantkv::kernels::attention_internal {

constexpr int64_t kTileTokens = 64;

// Bits [b, e) of a mask over a tile's tokens (0 <= b, e <= 64).
inline uint64_t TileBits(int64_t b, int64_t e) {
  if (e <= b) return 0;
  const uint64_t hi = e >= 64 ? ~uint64_t{0} : (uint64_t{1} << e) - 1;
  const uint64_t lo = b >= 64 ? ~uint64_t{0} : (uint64_t{1} << b) - 1;
  return hi & ~lo;
}

// The vectorized tile kernel runs for head_dim a multiple of 16 (up to 256) on a CPU with
// AVX-512 F/BW/VL/DQ (QUANTKV_ISA=avx2|scalar turns it off); otherwise attention.cc keeps
// its scalar loop.
constexpr int64_t kTileMaxHeadDim = 256;
bool TileKernelUsable(int64_t head_dim);
// Tests compare the vectorized kernel with the scalar loop: false turns it off until reset.
void SetTileKernelEnabledForTesting(bool enabled);

// Rows [t0, t1) of `rows` ([kTileTokens][d]) become columns t0..t1-1 of `out`
// ([d][kTileTokens]); other columns are left as they are.
void TransposeTile(const float* rows, int64_t t0, int64_t t1, int64_t d, float* out);

// A tile's keys (transposed, [d][kTileTokens]) and values ([kTileTokens][d]) in the two forms
// a query may read: decoded from encoded blocks and from the protected (exact) copy. Every
// element of all four must be finite (buffers start zeroed).
struct TileForms {
  const float* k_encoded_t = nullptr;
  const float* k_exact_t = nullptr;
  const float* v_encoded = nullptr;
  const float* v_exact = nullptr;
};

// Which tokens of the tile one query reads, and from where: tokens [0, n) (n <= kTileTokens),
// the encoded form for enc_begin <= t < enc_end and the exact one otherwise; bit t of `skip`
// set: token t is not attended (page selection).
struct TileSpan {
  int64_t n = 0;
  int64_t enc_begin = 0, enc_end = 0;
  uint64_t skip = 0;
};

// Online-softmax update of n_rows query rows q ([n_rows][d], scores scale * q.k) over the
// span: m, l are [n_rows], acc [n_rows][d], carrying the earlier tiles (-inf, 0, 0 at first).
void TileUpdate(const float* q, int64_t n_rows, int64_t d, const TileForms& tile,
                const TileSpan& span, float scale, float* m, float* l, float* acc);

}  // namespace quantkv::kernels::attention_internal
