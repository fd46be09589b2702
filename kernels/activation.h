// Element-wise activations and softmax.
#pragma once

#include <cstdint>

#include "absl/status/status.h"

namespace quantkv::kernels {

// out[i] = silu(gate[i]) * up[i]  (LLaMA's SwiGLU MLP). out may alias gate.
void SwiGlu(const float* gate, const float* up, float* out, int64_t n);

// In-place numerically stable softmax over n values.
void Softmax(float* x, int64_t n);

// log(sum(exp(x))) computed stably in double.
double LogSumExp(const float* x, int64_t n);

namespace cuda {
// Device pointers; `stream` a cudaStream_t (nullptr: default stream).
// SwiGlu as above (out may alias gate).
absl::Status SwiGlu(const float* gate, const float* up, float* out, int64_t n, void* stream);
// x[r][i] += bias[i] for rows r < rows (the q/k/v/o biases of Qwen2-style models).
absl::Status AddRowBias(float* x, const float* bias, int64_t rows, int64_t n, void* stream);
}  // namespace cuda

}  // namespace quantkv::kernels
