// Fresh random inputs for kernel tests: a new seed each run (printed on failure through
// SCOPED_TRACE by the caller), or QUANTKV_TEST_SEED to replay one.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <random>
#include <vector>

#include "kernels/fp16.h"
#include "kernels/ggml_types.h"

namespace quantkv::testing {

inline uint64_t TestSeed() {
  if (const char* s = std::getenv("QUANTKV_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  return std::random_device{}();
}

inline std::vector<float> RandomFloats(std::mt19937_64& rng, int64_t n, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  return v;
}

// Random weight rows in a ggml block format: random payload bytes, sane fp16 scales.
inline std::vector<uint8_t> RandomWeights(std::mt19937_64& rng, kernels::GgmlType type,
                                          int64_t rows, int64_t cols) {
  const auto& info = kernels::GgmlTypeInfoOf(type);
  const int64_t nb = rows * cols / info.block_size;
  std::vector<uint8_t> data(static_cast<size_t>(nb * info.type_size));
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(0.001f, 0.05f);
  for (uint8_t& b : data) b = static_cast<uint8_t>(byte(rng));
  auto put16 = [&](uint8_t* p, float f) {
    const uint16_t h = kernels::Fp32ToFp16(f);
    p[0] = h & 0xff;
    p[1] = h >> 8;
  };
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* blk = data.data() + b * info.type_size;
    switch (type) {
      case kernels::GgmlType::kQ4_0:
      case kernels::GgmlType::kQ8_0:
        put16(blk, scale(rng));
        break;
      case kernels::GgmlType::kQ4_1:
        put16(blk, scale(rng));
        put16(blk + 2, -8 * scale(rng));
        break;
      case kernels::GgmlType::kF16: {
        std::normal_distribution<float> n(0.0f, 0.05f);
        put16(blk, n(rng));
        break;
      }
      case kernels::GgmlType::kF32: {
        std::normal_distribution<float> n(0.0f, 0.05f);
        const float f = n(rng);
        std::memcpy(blk, &f, 4);
        break;
      }
      default:
        break;
    }
  }
  return data;
}

}  // namespace quantkv::testing
