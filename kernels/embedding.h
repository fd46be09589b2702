// Embedding lookup: rows of a token embedding table gathered into activations.
#pragma once

#include <cstdint>

#include "absl/status/status.h"

namespace quantkv::kernels {

// Element types of a dequantized embedding table.
enum class EmbeddingTable { kF32, kBF16 };

// CPU (reference): out[i][:] = table[tokens[i]][:] as float; tokens must be < vocab (the
// caller checks ids).
void EmbeddingGather(const void* table, EmbeddingTable type, int64_t dim, const int32_t* tokens,
                     int64_t n, float* out);

namespace cuda {
// Device pointers; `stream` a cudaStream_t. Ids outside [0, vocab) give zero rows (callers
// check ids on the host first; the kernel never reads outside the table).
absl::Status EmbeddingGather(const void* table, EmbeddingTable type, int64_t vocab, int64_t dim,
                             const int32_t* tokens, int64_t n, float* out, void* stream);
}  // namespace cuda

}  // namespace quantkv::kernels
