#include "kernels/hadamard.h"

#include <cmath>
#include <random>

namespace quantkv::kernels {

std::vector<float> HadamardSigns(int64_t d, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<float> s(static_cast<size_t>(d));
  for (float& v : s) v = (rng() >> 63) ? -1.0f : 1.0f;
  return s;
}

void HadamardRotate(float* x, int64_t n, int64_t d, const float* signs, bool inverse) {
  const float norm = 1.0f / std::sqrt(static_cast<float>(d));
  for (int64_t r = 0; r < n; ++r) {
    float* v = x + r * d;
    if (!inverse) {
      for (int64_t i = 0; i < d; ++i) v[i] *= signs[i];
    }
    // In-place fast Walsh-Hadamard transform (butterflies; the compiler vectorizes the
    // inner loop for h >= 8).
    for (int64_t h = 1; h < d; h *= 2) {
      for (int64_t i = 0; i < d; i += 2 * h) {
        for (int64_t j = i; j < i + h; ++j) {
          const float a = v[j], b = v[j + h];
          v[j] = a + b;
          v[j + h] = a - b;
        }
      }
    }
    for (int64_t i = 0; i < d; ++i) v[i] *= inverse ? norm * signs[i] : norm;
  }
}

}  // namespace quantkv::kernels
