#include "kernels/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "absl/strings/str_format.h"
#include "kernels/cpu/matmul_packed.h"
#include "kernels/cpu/quant_dot.h"
#include "kernels/dequantize.h"

namespace quantkv::kernels {
namespace {

constexpr int64_t kGemmTileRows = 32;

// Our threads split the work; OpenBLAS must not start its own pool on top.
void SingleThreadedBlas() {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
}

absl::Status CheckShapes(const WeightMatrix& w, int64_t m) {
  if (w.data == nullptr || w.rows <= 0 || w.cols <= 0 || m < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("MatMul: bad shapes (rows %d, cols %d, m %d)", w.rows, w.cols, m));
  }
  const GgmlTypeInfo& info = GgmlTypeInfoOf(w.type);
  if (w.cols % info.block_size != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "MatMul: %d columns are not a multiple of the %s block size", w.cols, info.name));
  }
  if (w.packed != nullptr &&
      (w.packed->type() != w.type || w.packed->rows() != w.rows || w.packed->cols() != w.cols)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "MatMul: packed weights (%s, %d x %d) do not match the matrix (%s, %d x %d)",
        GgmlTypeInfoOf(w.packed->type()).name, w.packed->rows(), w.packed->cols(), info.name,
        w.rows, w.cols));
  }
  if (!info.dequantizable) {
    return absl::UnimplementedError(
        absl::StrFormat("MatMul: weight type %s is not supported", info.name));
  }
  return absl::OkStatus();
}

void ParallelRows(ThreadPool* pool, int64_t rows, int64_t grain,
                  const std::function<void(int64_t, int64_t, int)>& fn) {
  if (pool == nullptr) {
    fn(0, rows, 0);
  } else {
    pool->ParallelFor(rows, fn, grain);
  }
}

// Int8 activations against Q4_0/Q4_1/Q8_0 weight rows.
void MatMulInt8(const WeightMatrix& w, const float* x, int64_t m, float* y, ThreadPool* pool,
                internal::QuantDotFn dot, int64_t row_bytes) {
  const int64_t nb = w.cols / internal::kQ8Block;
  // Per thread, so concurrent MatMuls (none today) would not share it; reused across calls.
  thread_local internal::ActQ8Buffer act;
  const bool use_packed =
      w.packed != nullptr && w.packed->activations() == ActivationPrecision::kInt8;
  act.Quantize(x, m, w.cols, pool, /*with_pairs=*/!use_packed);
  std::vector<internal::ActQ8Row> rows(m);
  for (int64_t i = 0; i < m; ++i) rows[i] = act.row(i);
  if (use_packed) {
    internal::PackedMatMulInt8(*w.packed, rows.data(), m, y, w.rows, pool);
    return;
  }
  // Several activation rows (batched decode): unpack each weight row once for all of them.
  const internal::QuantDotMultiFn multi = m > 1 ? internal::GetQuantDotMulti(w.type) : nullptr;
  ParallelRows(pool, w.rows, 16, [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = w.data + r * row_bytes;
      if (multi != nullptr) {
        multi(row, rows.data(), m, nb, y + r, w.rows);
        continue;
      }
      for (int64_t i = 0; i < m; ++i) y[i * w.rows + r] = dot(row, rows[i], nb);
    }
  });
}

// Int16 activations against Q8_0 rows.
void MatMulInt16(const WeightMatrix& w, const float* x, int64_t m, float* y, ThreadPool* pool,
                 internal::Int16DotFn dot, int64_t row_bytes) {
  const int64_t nb = w.cols / internal::kQ8Block;
  std::vector<internal::ActQ16Block> act(static_cast<size_t>(nb * m));
  for (int64_t i = 0; i < m; ++i) {
    internal::QuantizeActivationsQ16(x + i * w.cols, w.cols, act.data() + i * nb);
  }
  if (w.packed != nullptr && w.packed->activations() == ActivationPrecision::kInt16) {
    internal::PackedMatMulInt16(*w.packed, act.data(), m, y, w.rows, pool);
    return;
  }
  ParallelRows(pool, w.rows, 16, [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = w.data + r * row_bytes;
      for (int64_t i = 0; i < m; ++i) y[i * w.rows + r] = dot(row, act.data() + i * nb, nb);
    }
  });
}

// fp32 activations, few rows: dequantize each weight row once and dot with every x row.
void MatMulFloatRows(const WeightMatrix& w, const float* x, int64_t m, float* y, ThreadPool* pool,
                     int64_t row_bytes) {
  if (internal::FloatDotFn dot = internal::GetFloatDot(w.type)) {
    const int64_t nb = w.cols / GgmlTypeInfoOf(w.type).block_size;
    ParallelRows(pool, w.rows, 16, [&](int64_t r0, int64_t r1, int) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t i = 0; i < m; ++i) {
          y[i * w.rows + r] = dot(w.data + r * row_bytes, x + i * w.cols, nb);
        }
      }
    });
    return;
  }
  ParallelRows(pool, w.rows, 16, [&](int64_t r0, int64_t r1, int) {
    std::vector<float> buf(static_cast<size_t>(w.cols));
    for (int64_t r = r0; r < r1; ++r) {
      const float* wr;
      if (w.type == GgmlType::kF32) {
        wr = reinterpret_cast<const float*>(w.data + r * row_bytes);
      } else {
        // Type and shape were validated up front, so this cannot fail.
        (void)DequantizeRow(w.type, w.data + r * row_bytes, buf.data(), w.cols);
        wr = buf.data();
      }
      for (int64_t i = 0; i < m; ++i) {
        y[i * w.rows + r] = internal::DotF32(wr, x + i * w.cols, w.cols);
      }
    }
  });
}

// Many rows: dequantize a tile of weight rows and let SGEMM do m x tile x cols.
void MatMulGemm(const WeightMatrix& w, const float* x, int64_t m, float* y, ThreadPool* pool,
                int64_t row_bytes) {
  SingleThreadedBlas();
  const int64_t n_tiles = (w.rows + kGemmTileRows - 1) / kGemmTileRows;
  ParallelRows(pool, n_tiles, 1, [&](int64_t t0, int64_t t1, int) {
    std::vector<float> tile(static_cast<size_t>(kGemmTileRows * w.cols));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kGemmTileRows;
      const int64_t nr = std::min(kGemmTileRows, w.rows - r0);
      const float* wt;
      if (w.type == GgmlType::kF32) {
        wt = reinterpret_cast<const float*>(w.data + r0 * row_bytes);
      } else {
        (void)DequantizeRows(w.type, w.data + r0 * row_bytes, tile.data(), nr, w.cols);
        wt = tile.data();
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m),
                  static_cast<int>(nr), static_cast<int>(w.cols), 1.0f, x, static_cast<int>(w.cols),
                  wt, static_cast<int>(w.cols), 0.0f, y + r0, static_cast<int>(w.rows));
    }
  });
}

}  // namespace

absl::Status MatMul(const WeightMatrix& w, const float* x, int64_t m, float* y, ThreadPool* pool,
                    const MatMulOptions& options) {
  if (absl::Status s = CheckShapes(w, m); !s.ok()) return s;
  if (m == 0) return absl::OkStatus();
  const int64_t row_bytes = *GgmlRowBytes(w.type, w.cols);
  if (m >= options.gemm_min_rows) {
    MatMulGemm(w, x, m, y, pool, row_bytes);
    return absl::OkStatus();
  }
  if (options.activations == ActivationPrecision::kInt16) {
    if (internal::Int16DotFn dot = internal::GetInt16Dot(w.type)) {
      MatMulInt16(w, x, m, y, pool, dot, row_bytes);
      return absl::OkStatus();
    }
  }
  if (options.activations == ActivationPrecision::kInt8) {
    if (internal::QuantDotFn dot = internal::GetQuantDot(w.type)) {
      MatMulInt8(w, x, m, y, pool, dot, row_bytes);
      return absl::OkStatus();
    }
  }
  MatMulFloatRows(w, x, m, y, pool, row_bytes);
  return absl::OkStatus();
}

const char* MatMulIsa() { return internal::QuantDotIsa(); }

absl::StatusOr<WeightMatrix> SliceRows(const WeightMatrix& w, int64_t row_begin, int64_t n_rows) {
  if (row_begin < 0 || n_rows < 0 || row_begin + n_rows > w.rows) {
    return absl::OutOfRangeError(absl::StrFormat("SliceRows: rows [%d, %d) outside a %d-row matrix",
                                                 row_begin, row_begin + n_rows, w.rows));
  }
  absl::StatusOr<int64_t> row_bytes = GgmlRowBytes(w.type, w.cols);
  if (!row_bytes.ok()) return row_bytes.status();
  WeightMatrix s = w;
  s.packed = nullptr;  // packed for the whole matrix
  s.data = w.data + row_begin * *row_bytes;
  s.rows = n_rows;
  return s;
}

absl::StatusOr<WeightMatrix> SliceColumns(const WeightMatrix& w, int64_t col_begin, int64_t n_cols,
                                          std::vector<uint8_t>* storage) {
  if (col_begin < 0 || n_cols < 0 || col_begin + n_cols > w.cols) {
    return absl::OutOfRangeError(
        absl::StrFormat("SliceColumns: columns [%d, %d) outside a %d-column matrix", col_begin,
                        col_begin + n_cols, w.cols));
  }
  if (col_begin == 0 && n_cols == w.cols) return w;
  const GgmlTypeInfo& info = GgmlTypeInfoOf(w.type);
  if (col_begin % info.block_size != 0 || n_cols % info.block_size != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("SliceColumns: columns [%d, %d) are not on whole %d-element %s blocks",
                        col_begin, col_begin + n_cols, info.block_size, info.name));
  }
  absl::StatusOr<int64_t> row_bytes = GgmlRowBytes(w.type, w.cols);
  if (!row_bytes.ok()) return row_bytes.status();
  const int64_t skip = col_begin / info.block_size * info.type_size;
  const int64_t keep = n_cols / info.block_size * info.type_size;
  storage->resize(static_cast<size_t>(w.rows * keep));
  for (int64_t r = 0; r < w.rows; ++r) {
    std::copy_n(w.data + r * *row_bytes + skip, keep, storage->data() + r * keep);
  }
  WeightMatrix s = w;
  s.packed = nullptr;
  s.data = storage->data();
  s.cols = n_cols;
  return s;
}

}  // namespace quantkv::kernels
