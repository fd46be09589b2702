// Weight quantization: float rows to ggml storage blocks, the inverse of DequantizeRow. Used
// where QuantKV makes weights itself: expert weights held at a second precision for the
// router-aware elastic policy (runtime/engine/expert_store.h), experts split out of a dense
// MLP. Encoders are ggml's reference quantizers, so the bytes are what llama.cpp would write.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/ggml_types.h"

namespace quantkv::kernels {

// True for the types QuantizeRow writes: F32, F16, Q8_0, Q4_0, Q4_1.
bool CanQuantizeTo(GgmlType type);

// Quantizes `n` floats into one row of `type` blocks at `dst` (GgmlRowBytes(type, n) bytes).
// NaN inputs are stored as 0 so that one cannot poison a block's scale. Errors: a type
// CanQuantizeTo rejects (named), n negative or not a multiple of the block size.
absl::Status QuantizeRow(GgmlType type, const float* src, void* dst, int64_t n);

}  // namespace quantkv::kernels
