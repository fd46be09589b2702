// Weight dequantization: GGML/GGUF storage blocks to float, bit-exact with ggml's reference
// dequantizers (the CPU version is the reference; the CUDA one is tested against it).
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/ggml_types.h"

namespace quantkv::kernels {

// Dequantizes one row of `n` elements stored as `type` blocks at `src` into `dst`.
// `n` must be a multiple of the type's block size; types without `dequantizable` in the type
// table (ggml_types.cc) are an error naming the type, as is a negative or misaligned `n`.
absl::Status DequantizeRow(GgmlType type, const void* src, float* dst, int64_t n);

// `rows` consecutive rows of `n` elements each (the source rows are packed back to back, as in a
// GGUF tensor); dst receives rows * n floats.
absl::Status DequantizeRows(GgmlType type, const void* src, float* dst, int64_t rows, int64_t n);

// Bulk IEEE half <-> float conversion, bit-identical to the scalar Fp16ToFp32 / Fp32ToFp16 in
// kernels/fp16.h (round to nearest even) for every non-NaN input; NaN stays NaN (its payload may
// differ). Uses F16C when the CPU has it.
void Fp16ToFp32Row(const uint16_t* src, float* dst, int64_t n);
void Fp32ToFp16Row(const float* src, uint16_t* dst, int64_t n);

namespace cuda {
// Device-side dequantization of `rows` x `n` elements of `type` at device pointer `src` into
// device pointer `dst`, which holds floats when `out_type` is kF32 or bfloat16 bit patterns
// (uint16_t, rounded to nearest even like Fp32ToBf16) when it is kBF16. `stream` is a
// cudaStream_t (nullptr: default stream); the call is asynchronous with respect to the host.
// Supports every type DequantizeRow supports, with bit-identical fp32 results.
absl::Status DequantizeRowsToBf16OrF32(GgmlType type, const void* src, int64_t rows, int64_t n,
                                       GgmlType out_type, void* dst, void* stream);
}  // namespace cuda

}  // namespace quantkv::kernels
