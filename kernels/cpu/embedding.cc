#include "kernels/embedding.h"

#include <cstring>

#include "kernels/fp16.h"

namespace quantkv::kernels {

void EmbeddingGather(const void* table, EmbeddingTable type, int64_t dim, const int32_t* tokens,
                     int64_t n, float* out) {
  if (dim <= 0) return;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t row = tokens[r];
    float* dst = out + r * dim;
    if (type == EmbeddingTable::kF32) {
      std::memcpy(dst, static_cast<const float*>(table) + row * dim, dim * sizeof(float));
    } else {
      const uint16_t* src = static_cast<const uint16_t*>(table) + row * dim;
      for (int64_t i = 0; i < dim; ++i) dst[i] = Bf16ToFp32(src[i]);
    }
  }
}

}  // namespace quantkv::kernels
