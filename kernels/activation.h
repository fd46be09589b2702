// Element-wise activations and softmax.
#pragma once

#include <cstdint>

namespace quantkv::kernels {

// out[i] = silu(gate[i]) * up[i]  (LLaMA's SwiGLU MLP). out may alias gate.
void SwiGlu(const float* gate, const float* up, float* out, int64_t n);

// In-place numerically stable softmax over n values.
void Softmax(float* x, int64_t n);

// log(sum(exp(x))) computed stably in double.
double LogSumExp(const float* x, int64_t n);

}  // namespace quantkv::kernels
