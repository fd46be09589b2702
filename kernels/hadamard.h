// Randomized Hadamard rotation of head vectors (QuaRot / llama.cpp's KV rotation): an
// orthonormal map x -> H diag(signs) x / sqrt(d) that spreads a few large channels over
// all of them, so per-token scales fit the data far better. Applied to K/V rows before
// they are quantized and undone after decoding; orthonormality keeps q.k and p.V intact.
#pragma once

#include <cstdint>
#include <vector>

namespace quantkv::kernels {

// The seed of the KV cache's rotation: calibration must rotate exactly as the cache does.
inline constexpr uint64_t kKvRotationSeed = 0x9e3779b97f4a7c15ull;

// Random +-1 signs for head_dim d, fixed by the seed (the same for writer and reader).
std::vector<float> HadamardSigns(int64_t d, uint64_t seed);

// Rotates n rows of d values in place (d a power of two): forward y = H (s * x) / sqrt(d),
// inverse x = s * (H y) / sqrt(d).
void HadamardRotate(float* x, int64_t n, int64_t d, const float* signs, bool inverse);

}  // namespace quantkv::kernels
