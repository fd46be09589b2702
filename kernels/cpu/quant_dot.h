// Internal to kernels/cpu: int8-activation dot products against ggml weight blocks, with
// AVX-512 VNNI, AVX2 and scalar variants chosen once at run time.
#pragma once

#include <cstdint>

#include "kernels/ggml_types.h"

namespace quantkv::kernels::internal {

constexpr int kQ8Block = 32;

// One 32-element block of quantized activations: x ≈ d * q; `ds` = d * Σq, which folds the
// Q4_0 offset and the Q4_1 minimum into one multiply per block.
struct ActQ8Block {
  float d;
  float ds;
  int8_t q[kQ8Block];
};
static_assert(sizeof(ActQ8Block) == 40);

void QuantizeActivationsQ8(const float* x, int64_t n, ActQ8Block* out);

// Dot of one weight row (nb blocks of `type`) with nb activation blocks.
using QuantDotFn = float (*)(const uint8_t* w_row, const ActQ8Block* a, int64_t nb);

// nullptr when `type` has no int8 path.
QuantDotFn GetQuantDot(GgmlType type);
const char* QuantDotIsa();

// Scalar versions, the reference the SIMD ones are tested against.
QuantDotFn GetQuantDotScalar(GgmlType type);

// fp32 dot product (AVX2/FMA when available).
float DotF32(const float* a, const float* b, int64_t n);

}  // namespace quantkv::kernels::internal
