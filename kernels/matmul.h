// y = x · Wᵀ for weights stored in a ggml block format, used in place (no fp copy of the
// model). Decode (few rows) quantizes the activations to 8 bits per 32-block and runs
// integer dot products against the weight blocks, llama.cpp's scheme, so a token reads
// ~5 bits per Q4 weight. Many rows (prefill) dequantize weight tiles into an OpenBLAS SGEMM.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/ggml_types.h"
#include "kernels/thread_pool.h"

namespace quantkv::kernels {

enum class ActivationPrecision {
  kFloat32,  // activations stay fp32: weights are dequantized and dotted in fp32
  kInt8,     // activations quantized to int8 per 32 (Q8/Q4 weights only; others use fp32)
  kInt16,    // int16 per 32 (relative error ~2e-5: as good as fp32 for an argmax) against
             // Q8_0 weights at int8 speed; other weight types use fp32
};

class PackedWeights;

// A row-major [rows x cols] weight matrix: `rows` output features, each row `cols` inputs
// in ggml blocks (GGUF dims are {cols, rows}).
struct WeightMatrix {
  GgmlType type = GgmlType::kF32;
  const uint8_t* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  // The same weights repacked for the batched kernels (see PackWeights), or null. Not
  // owned. When set, MatMuls with its activation precision below gemm_min_rows use it for
  // every row count, so a row's result does not depend on how many rows share the call.
  const PackedWeights* packed = nullptr;
};

// Weights re-laid out for AVX-512 VNNI batched dot products: per group of 16 output rows
// and per 32-column block, the 16 rows' codes interleaved by 4-byte words (one vector
// holds a few columns of all 16 rows) followed by the 16 fp16 scales (and minimums). A
// broadcast activation word then feeds 16 rows per instruction and the per-block scaling
// is paid once per 16 rows instead of once per row, which makes batched decode
// compute-efficient. Same size as the ggml blocks. Two kinds: Q4_0/Q4_1 for int8
// activations (the layers), Q8_0 for int16 activations (the lm_head).
class PackedWeights {
 public:
  GgmlType type() const { return type_; }
  ActivationPrecision activations() const { return activations_; }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t groups() const { return (rows_ + 15) / 16; }
  const uint8_t* group(int64_t g) const { return bytes_.data() + g * group_bytes_; }

 private:
  friend absl::StatusOr<std::unique_ptr<PackedWeights>> PackWeights(const WeightMatrix& w,
                                                                    ActivationPrecision act);
  GgmlType type_ = GgmlType::kQ4_0;
  ActivationPrecision activations_ = ActivationPrecision::kInt8;
  int64_t rows_ = 0, cols_ = 0, group_bytes_ = 0;
  std::vector<uint8_t> bytes_;
};

// True when this CPU has a packed kernel for `type` weights and `act` activations
// (AVX-512 VNNI; Q4_0/Q4_1 with kInt8, Q8_0 with kInt16).
bool CanPackWeights(GgmlType type, ActivationPrecision act);

// The packed copy of w for MatMuls with `act` activations (others ignore it). UNIMPLEMENTED
// when !CanPackWeights; rows that do not fill the last group of 16 are zero-padded.
absl::StatusOr<std::unique_ptr<PackedWeights>> PackWeights(const WeightMatrix& w,
                                                           ActivationPrecision act);

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

// Bytes of w's blocks (rows x the row size of its type); 0 for an empty matrix.
inline int64_t WeightBytes(const WeightMatrix& w) {
  return w.rows == 0 ? 0 : w.rows * GgmlRowBytes(w.type, w.cols).value_or(0);
}

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

namespace cuda {
// Weight element types of the CUDA GEMM (weights are dequantized to one of them at load).
enum class GemmWeights { kF32, kBF16 };

// A cuBLAS handle (a cublasHandle_t) bound to `stream` (a cudaStream_t; nullptr: default).
absl::StatusOr<void*> CreateCublasHandle(void* stream);
void DestroyCublasHandle(void* handle);

// Scratch bytes Gemm needs for n rows of k inputs: bf16 weights take bf16 activations
// (converted from x in the scratch), fp32 weights none.
int64_t GemmScratchBytes(GemmWeights weights, int64_t n, int64_t k);

// Device pointers. y[n][m] = x[n][k] . w[m][k]^T, plus y's previous contents when
// `accumulate` (the residual add fused into o_proj / down_proj). fp32 accumulation; kF32
// weights run full fp32 (no TF32), so the result is the CPU reference's within summation
// order. All row-major. Asynchronous on the handle's stream.
absl::Status Gemm(void* cublas, const float* x, const void* w, GemmWeights weights, float* y,
                  int64_t n, int64_t k, int64_t m, bool accumulate, void* scratch,
                  int64_t scratch_bytes);
}  // namespace cuda

}  // namespace quantkv::kernels
