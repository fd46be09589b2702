// Internal to kernels/cpu: int8-activation dot products against ggml weight blocks, with
// AVX-512 VNNI, AVX2 and scalar variants chosen once at run time.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/ggml_types.h"
#include "kernels/thread_pool.h"

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

// One quantized activation row in the forms the dot kernels read: the blocks, and for the
// AVX-512 Q4 kernels the same codes interleaved per block pair (64 bytes: block 2p's
// elements 0-15, block 2p+1's 0-15, block 2p's 16-31, block 2p+1's 16-31, the order the
// nibbles of two weight blocks unpack into) with the scales as contiguous arrays.
struct ActQ8Row {
  const ActQ8Block* blocks = nullptr;
  const uint8_t* pairs = nullptr;
  const float* d = nullptr;
  const float* ds = nullptr;
};

// Owns the storage of ActQ8Rows for m rows of n activations.
class ActQ8Buffer {
 public:
  // Rows are quantized independently (on `pool` when given). with_pairs = false skips the
  // interleaved copy that only the ggml-layout AVX-512 Q4 kernels read.
  void Quantize(const float* x, int64_t m, int64_t n, ThreadPool* pool = nullptr,
                bool with_pairs = true);
  ActQ8Row row(int64_t i) const;

 private:
  int64_t nb_ = 0;
  std::vector<ActQ8Block> blocks_;
  std::vector<uint8_t> pairs_;
  bool has_pairs_ = false;
  std::vector<float> d_, ds_;
};

// Dot of one weight row (nb blocks of `type`) with nb activation blocks.
using QuantDotFn = float (*)(const uint8_t* w_row, const ActQ8Row& a, int64_t nb);

// nullptr when `type` has no int8 path.
QuantDotFn GetQuantDot(GgmlType type);

// One weight row against m activation rows: out[i * out_stride] = dot(w_row, a[i]), each
// bit-identical to GetQuantDot's result for that row alone, with the weights unpacked once
// for several rows. nullptr when `type` has no such kernel on this CPU.
using QuantDotMultiFn = void (*)(const uint8_t* w_row, const ActQ8Row* a, int64_t m, int64_t nb,
                                 float* out, int64_t out_stride);
QuantDotMultiFn GetQuantDotMulti(GgmlType type);
const char* QuantDotIsa();

// Scalar versions, the reference the SIMD ones are tested against.
QuantDotFn GetQuantDotScalar(GgmlType type);

// Activations quantized to int16 per 32-block (x ≈ d * q).
struct ActQ16Block {
  float d;
  int16_t q[kQ8Block];
};
void QuantizeActivationsQ16(const float* x, int64_t n, ActQ16Block* out);
using Int16DotFn = float (*)(const uint8_t* w_row, const ActQ16Block* a, int64_t nb);
// nullptr when `type` has no int16 path (only Q8_0 has one).
Int16DotFn GetInt16Dot(GgmlType type);

// fp32 activations against a weight row, dequantizing in registers (nullptr when `type`
// has no fused path; callers then dequantize the row and use DotF32).
using FloatDotFn = float (*)(const uint8_t* w_row, const float* x, int64_t nb);
FloatDotFn GetFloatDot(GgmlType type);

// fp32 dot product (AVX2/FMA when available).
float DotF32(const float* a, const float* b, int64_t n);

}  // namespace quantkv::kernels::internal
