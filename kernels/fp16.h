// Scalar IEEE half and bfloat16 conversions (round-to-nearest-even), usable on host and in
// reference code. SIMD paths convert with F16C inside the kernels that need it.
#pragma once

#include <cstdint>
#include <cstring>

namespace quantkv::kernels {

inline float Fp32FromBits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint32_t BitsFromFp32(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

inline float Fp16ToFp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return Fp32FromBits(sign);
    // Subnormal: normalise.
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    mant &= 0x3ffu;
    return Fp32FromBits(sign | ((127 - 15 - e) << 23) | (mant << 13));
  }
  if (exp == 0x1f) return Fp32FromBits(sign | 0x7f800000u | (mant << 13));
  return Fp32FromBits(sign | ((exp + 127 - 15) << 23) | (mant << 13));
}

inline uint16_t Fp32ToFp16(float f) {
  const uint32_t x = BitsFromFp32(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // Inf or NaN
    return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  }
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> Inf
  if (abs < 0x38800000u) {  // subnormal or zero in half
    // Add as float to let the FPU round to nearest even at the subnormal step.
    const float magic = Fp32FromBits(0x3f000000u);  // 0.5: shifts mantissa into place
    const float v = Fp32FromBits(abs) + magic;
    return static_cast<uint16_t>(sign | (BitsFromFp32(v) - BitsFromFp32(magic)));
  }
  const uint32_t mant_odd = (abs >> 13) & 1u;
  uint32_t r = abs + 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
  return static_cast<uint16_t>(sign | (r >> 13));
}

inline float Bf16ToFp32(uint16_t b) { return Fp32FromBits(static_cast<uint32_t>(b) << 16); }

inline uint16_t Fp32ToBf16(float f) {
  const uint32_t x = BitsFromFp32(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // NaN
  const uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>((x + rounding) >> 16);
}

}  // namespace quantkv::kernels
