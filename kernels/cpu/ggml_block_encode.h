// ggml's reference block quantizers (quantize_row_*_ref: the same scale choice and
// rounding), one 32-value block at a time, shared by the weight quantizer
// (kernels/quantize.h) and the ggml-format KV codecs, so both write ggml's exact bytes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cpu/unaligned.h"
#include "kernels/fp16.h"

namespace quantkv::kernels::ggml_encode {

constexpr int kQK = 32;

inline void EncodeQ8_0(const float* x, uint8_t* b) {
  float amax = 0;
  for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  internal::StoreU16(b, Fp32ToFp16(d));
  for (int j = 0; j < kQK; ++j)
    b[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::round(x[j] * id)));
}

inline void EncodeQ4_0(const float* x, uint8_t* b) {
  // The value of largest magnitude, with its sign, maps to code 0 (-8 * d).
  float amax = 0, max = 0;
  for (int j = 0; j < kQK; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  internal::StoreU16(b, Fp32ToFp16(d));
  for (int j = 0; j < kQK / 2; ++j) {
    const int q0 = std::min(15, static_cast<int>(static_cast<int8_t>(x[j] * id + 8.5f)));
    const int q1 = std::min(15, static_cast<int>(static_cast<int8_t>(x[j + kQK / 2] * id + 8.5f)));
    b[2 + j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

inline void EncodeQ4_1(const float* x, uint8_t* b) {
  float lo = INFINITY, hi = -INFINITY;
  for (int j = 0; j < kQK; ++j) {
    lo = std::min(lo, x[j]);
    hi = std::max(hi, x[j]);
  }
  const float d = (hi - lo) / 15.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  internal::StoreU16(b, Fp32ToFp16(d));
  internal::StoreU16(b + 2, Fp32ToFp16(lo));
  for (int j = 0; j < kQK / 2; ++j) {
    const int q0 = std::min(15, static_cast<int>(static_cast<int8_t>((x[j] - lo) * id + 0.5f)));
    const int q1 =
        std::min(15, static_cast<int>(static_cast<int8_t>((x[j + kQK / 2] - lo) * id + 0.5f)));
    b[4 + j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

}  // namespace quantkv::kernels::ggml_encode
