// y = x · Wᵀ for weights stored in a ggml block format, used in place (no fp copy of the
// model). Decode (few rows) quantizes the activations to 8 bits per 32-block and runs
// integer dot products against the weight blocks, llama.cpp's scheme, so a token reads
// ~5 bits per Q4 weight. Many rows (prefill) dequantize weight tiles into an OpenBLAS SGEMM.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/ggml_types.h"
#include "kernels/thread_pool.h"

namespace quantkv::kernels {

// A row-major [rows x cols] weight matrix: `rows` output features, each row `cols` inputs
// in ggml blocks (GGUF dims are {cols, rows}).
struct WeightMatrix {
  GgmlType type = GgmlType::kF32;
  const uint8_t* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
};

// Rows [row_begin, row_begin + n_rows) of w: a view of the same blocks (rows are
// contiguous), no copy. For column-parallel (output-split) tensor-parallel layers.
absl::StatusOr<WeightMatrix> SliceRows(const WeightMatrix& w, int64_t row_begin, int64_t n_rows);

// Columns [col_begin, col_begin + n_cols) of every row, for row-parallel (input-split)
// layers. Blocks run along a row, so both bounds must be multiples of the type's block
// size; each row's sub-range of blocks is copied into *storage (resized; the result points
// into it, so it must outlive the result and not be resized). The whole width is returned
// as the same view, without a copy.
absl::StatusOr<WeightMatrix> SliceColumns(const WeightMatrix& w, int64_t col_begin, int64_t n_cols,
                                          std::vector<uint8_t>* storage);

enum class ActivationPrecision {
  kFloat32,  // activations stay fp32: weights are dequantized and dotted in fp32
  kInt8,     // activations quantized to int8 per 32 (Q8/Q4 weights only; others use fp32)
  kInt16,    // int16 per 32 (relative error ~2e-5: as good as fp32 for an argmax) against
             // Q8_0 weights at int8 speed; other weight types use fp32
};

struct MatMulOptions {
  ActivationPrecision activations = ActivationPrecision::kInt8;
  // From this many activation rows on, dequantize weight tiles and call SGEMM.
  int64_t gemm_min_rows = 8;
};

// x: [m x w.cols], y: [m x w.rows] (row stride w.rows). pool may be null (one thread).
absl::Status MatMul(const WeightMatrix& w, const float* x, int64_t m, float* y, ThreadPool* pool,
                    const MatMulOptions& options = {});

// Which SIMD level the int8 dot products use on this CPU ("avx512vnni", "avx2", "scalar").
const char* MatMulIsa();

}  // namespace quantkv::kernels
