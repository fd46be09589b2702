// Internal to kernels/cpu: the batched int8 MatMul over PackedWeights (kernels/matmul.h).
#pragma once

#include <cstdint>

#include "kernels/cpu/quant_dot.h"
#include "kernels/matmul.h"
#include "kernels/thread_pool.h"

namespace quantkv::kernels::internal {

// p must be packed for int8 activations (Q4_0/Q4_1).
// y[i * y_stride + r] = dot(row r of p, a[i]) for i < m and every row r of p; pool may be
// null. Each row's result is bit-identical whatever m is (the same operations run per
// activation row; rows are only batched to share the weight unpacking and scaling).
void PackedMatMulInt8(const PackedWeights& p, const ActQ8Row* a, int64_t m, float* y,
                      int64_t y_stride, ThreadPool* pool);

// The same for Q8_0 packed for int16 activations: a holds m rows of cols/32 blocks.
void PackedMatMulInt16(const PackedWeights& p, const ActQ16Block* a, int64_t m, float* y,
                       int64_t y_stride, ThreadPool* pool);

}  // namespace quantkv::kernels::internal
