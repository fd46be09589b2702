// MatMul against a float64 reference on the dequantized weights, for every path
// (int8 activations, fp32 rows, tiled SGEMM) and the SIMD dots against the scalar ones.
#include "kernels/matmul.h"

#include <cmath>

#include "gtest/gtest.h"
#include "kernels/cpu/quant_dot.h"
#include "kernels/dequantize.h"
#include "tests/engine/test_random.h"

namespace quantkv::kernels {
namespace {

using quantkv::testing::RandomFloats;
using quantkv::testing::RandomWeights;

std::vector<double> Reference(GgmlType type, const std::vector<uint8_t>& w, int64_t rows,
                              int64_t cols, const std::vector<float>& x, int64_t m) {
  std::vector<float> wf(rows * cols);
  EXPECT_TRUE(DequantizeRows(type, w.data(), wf.data(), rows, cols).ok());
  std::vector<double> y(m * rows);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t r = 0; r < rows; ++r) {
      double s = 0;
      for (int64_t c = 0; c < cols; ++c) s += double(wf[r * cols + c]) * x[i * cols + c];
      y[i * rows + r] = s;
    }
  }
  return y;
}

double RelL2(const std::vector<float>& got, const std::vector<double>& ref) {
  double e = 0, n = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    e += (got[i] - ref[i]) * (got[i] - ref[i]);
    n += ref[i] * ref[i];
  }
  return std::sqrt(e / n);
}

struct Case {
  GgmlType type;
  int64_t m;
  ActivationPrecision act;
  double tol;
};

class MatMulTest : public ::testing::TestWithParam<Case> {};

TEST_P(MatMulTest, MatchesFloat64Reference) {
  const Case c = GetParam();
  const uint64_t seed = quantkv::testing::TestSeed();
  SCOPED_TRACE(::testing::Message() << "QUANTKV_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  const int64_t rows = 75, cols = 576;  // odd row count exercises tile and thread tails
  const std::vector<uint8_t> w = RandomWeights(rng, c.type, rows, cols);
  const std::vector<float> x = RandomFloats(rng, c.m * cols);
  const std::vector<double> ref = Reference(c.type, w, rows, cols, x, c.m);
  ThreadPool pool(2);
  std::vector<float> y(c.m * rows, NAN);
  MatMulOptions opt;
  opt.activations = c.act;
  ASSERT_TRUE(MatMul({c.type, w.data(), rows, cols}, x.data(), c.m, y.data(), &pool, opt).ok());
  EXPECT_LE(RelL2(y, ref), c.tol);
}

INSTANTIATE_TEST_SUITE_P(
    AllPaths, MatMulTest,
    ::testing::Values(
        // int8 activations: error of 8-bit per-32 rounding of x (~0.4% relative L2).
        Case{GgmlType::kQ4_0, 1, ActivationPrecision::kInt8, 1e-2},
        Case{GgmlType::kQ4_1, 1, ActivationPrecision::kInt8, 1e-2},
        Case{GgmlType::kQ8_0, 1, ActivationPrecision::kInt8, 1e-2},
        Case{GgmlType::kQ4_1, 5, ActivationPrecision::kInt8, 1e-2},
        // fp32 activations and the SGEMM path: only float rounding.
        Case{GgmlType::kQ4_1, 1, ActivationPrecision::kFloat32, 1e-5},
        Case{GgmlType::kQ4_0, 2, ActivationPrecision::kFloat32, 1e-5},
        Case{GgmlType::kQ8_0, 1, ActivationPrecision::kFloat32, 1e-5},
        // int16 activations: 2^-15 rounding, well inside 1e-4.
        Case{GgmlType::kQ8_0, 1, ActivationPrecision::kInt16, 1e-4},
        Case{GgmlType::kQ8_0, 3, ActivationPrecision::kInt16, 1e-4},
        Case{GgmlType::kQ4_1, 1, ActivationPrecision::kInt16, 1e-5},  // falls back to fp32
        Case{GgmlType::kQ8_0, 3, ActivationPrecision::kFloat32, 1e-5},
        Case{GgmlType::kF16, 1, ActivationPrecision::kInt8, 1e-5},
        Case{GgmlType::kF32, 2, ActivationPrecision::kInt8, 1e-5},
        Case{GgmlType::kQ4_1, 40, ActivationPrecision::kInt8, 1e-5},
        Case{GgmlType::kQ8_0, 17, ActivationPrecision::kFloat32, 1e-5},
        Case{GgmlType::kF32, 9, ActivationPrecision::kFloat32, 1e-5}));

TEST(QuantDotTest, SimdMatchesScalar) {
  const uint64_t seed = quantkv::testing::TestSeed();
  SCOPED_TRACE(::testing::Message() << "QUANTKV_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  for (GgmlType type : {GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ8_0}) {
    for (int64_t cols : {32, 64, 96, 576, 1536, 1568}) {  // 16-block steps and every tail
      const std::vector<uint8_t> w = RandomWeights(rng, type, 1, cols);
      const std::vector<float> x = RandomFloats(rng, cols);
      internal::ActQ8Buffer a;
      a.Quantize(x.data(), 1, cols);
      const float simd = internal::GetQuantDot(type)(w.data(), a.row(0), cols / 32);
      const float scalar = internal::GetQuantDotScalar(type)(w.data(), a.row(0), cols / 32);
      EXPECT_NEAR(simd, scalar, 1e-4 * (1 + std::fabs(scalar)))
          << GgmlTypeInfoOf(type).name << " cols " << cols << " isa " << MatMulIsa();
    }
  }
}

TEST(QuantDotTest, ActivationQuantizationRoundTrips) {
  std::mt19937_64 rng(quantkv::testing::TestSeed());
  const std::vector<float> x = RandomFloats(rng, 256);
  std::vector<internal::ActQ8Block> a(8);
  internal::QuantizeActivationsQ8(x.data(), 256, a.data());
  for (int b = 0; b < 8; ++b) {
    int sum = 0;
    for (int j = 0; j < 32; ++j) {
      EXPECT_NEAR(a[b].d * a[b].q[j], x[b * 32 + j], a[b].d * 0.5f + 1e-7f);
      sum += a[b].q[j];
    }
    EXPECT_FLOAT_EQ(a[b].ds, a[b].d * sum);
  }
}

// Batch invariance: a row's result must not depend on which rows share its MatMul (the
// serving engine batches decodes from many requests and promises identical greedy output).
TEST(MatMulBatchTest, RowsAreBitIdenticalAloneAndBatched) {
  const uint64_t seed = quantkv::testing::TestSeed();
  SCOPED_TRACE(::testing::Message() << "QUANTKV_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  const int64_t rows = 37, cols = 576 + 64;  // a block count that is not a multiple of 16
  ThreadPool pool(2);
  for (GgmlType type : {GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ8_0}) {
    const std::vector<uint8_t> w = RandomWeights(rng, type, rows, cols);
    for (int64_t m : {2, 3, 4, 5, 9, 16}) {
      const std::vector<float> x = RandomFloats(rng, m * cols);
      std::vector<float> batched(m * rows), alone(rows);
      MatMulOptions opt;
      opt.activations = ActivationPrecision::kInt8;
      opt.gemm_min_rows = int64_t{1} << 40;
      ASSERT_TRUE(
          MatMul({type, w.data(), rows, cols}, x.data(), m, batched.data(), &pool, opt).ok());
      for (int64_t i = 0; i < m; ++i) {
        ASSERT_TRUE(
            MatMul({type, w.data(), rows, cols}, x.data() + i * cols, 1, alone.data(), &pool, opt)
                .ok());
        for (int64_t r = 0; r < rows; ++r) {
          ASSERT_EQ(batched[i * rows + r], alone[r])
              << "type " << static_cast<int>(type) << " m " << m << " row " << i << " out " << r;
        }
      }
    }
  }
}

TEST(MatMulErrors, RejectsBadShapes) {
  std::vector<uint8_t> w(64);
  float x[40] = {}, y[2] = {};
  EXPECT_FALSE(MatMul({GgmlType::kQ4_0, w.data(), 1, 40}, x, 1, y, nullptr).ok());
  EXPECT_FALSE(MatMul({GgmlType::kQ4_0, nullptr, 1, 32}, x, 1, y, nullptr).ok());
  EXPECT_FALSE(MatMul({GgmlType::kQ2_K, w.data(), 1, 256}, x, 1, y, nullptr).ok());
}

}  // namespace
}  // namespace quantkv::kernels
