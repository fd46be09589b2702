// The packed batched kernels (PackWeights: Q4_0/Q4_1 x int8, Q8_0 x int16 activations):
// against a float64 dot of the dequantized weights with the same quantized activations (so
// only float rounding may differ), for row counts that do not fill a 16-row group, every
// batch size the kernels specialise, and bit-identical rows alone and batched.
#include <cmath>

#include "gtest/gtest.h"
#include "kernels/cpu/quant_dot.h"
#include "kernels/dequantize.h"
#include "kernels/matmul.h"
#include "tests/engine/test_random.h"

namespace quantkv::kernels {
namespace {

using quantkv::testing::RandomFloats;
using quantkv::testing::RandomWeights;

struct Kind {
  GgmlType type;
  ActivationPrecision act;
};

MatMulOptions RowOptions(ActivationPrecision act) {
  return {.activations = act, .gemm_min_rows = int64_t{1} << 40};
}

// x as the kernels see it: quantized per 32-block to int8 or int16, dequantized.
std::vector<double> QuantizedActivations(ActivationPrecision act, const std::vector<float>& x) {
  const int64_t nb = static_cast<int64_t>(x.size()) / 32;
  std::vector<double> out(x.size());
  if (act == ActivationPrecision::kInt8) {
    std::vector<internal::ActQ8Block> a(nb);
    internal::QuantizeActivationsQ8(x.data(), static_cast<int64_t>(x.size()), a.data());
    for (size_t c = 0; c < x.size(); ++c) out[c] = double(a[c / 32].d) * a[c / 32].q[c % 32];
  } else {
    std::vector<internal::ActQ16Block> a(nb);
    internal::QuantizeActivationsQ16(x.data(), static_cast<int64_t>(x.size()), a.data());
    for (size_t c = 0; c < x.size(); ++c) out[c] = double(a[c / 32].d) * a[c / 32].q[c % 32];
  }
  return out;
}

// y = W_dequantized · x_quantized in float64, and the scale of the terms.
void Reference(Kind k, const std::vector<uint8_t>& w, int64_t rows, int64_t cols,
               const std::vector<float>& x, int64_t m, std::vector<double>* y,
               std::vector<double>* magnitude) {
  std::vector<float> wf(rows * cols);
  ASSERT_TRUE(DequantizeRows(k.type, w.data(), wf.data(), rows, cols).ok());
  y->assign(m * rows, 0);
  magnitude->assign(m * rows, 0);
  for (int64_t i = 0; i < m; ++i) {
    const std::vector<double> a = QuantizedActivations(
        k.act, std::vector<float>(x.begin() + i * cols, x.begin() + (i + 1) * cols));
    for (int64_t r = 0; r < rows; ++r) {
      double s = 0, mag = 0;
      for (int64_t c = 0; c < cols; ++c) {
        const double term = double(wf[r * cols + c]) * a[c];
        s += term;
        mag += std::fabs(term);
      }
      (*y)[i * rows + r] = s;
      (*magnitude)[i * rows + r] = mag;
    }
  }
}

class PackedMatMulTest : public ::testing::TestWithParam<Kind> {
 protected:
  void SetUp() override {
    if (!CanPackWeights(GetParam().type, GetParam().act))
      GTEST_SKIP() << "no packed kernel on this CPU (" << MatMulIsa() << ")";
  }
};

TEST_P(PackedMatMulTest, MatchesFloat64OnTheSameQuantizedActivations) {
  const Kind kind = GetParam();
  const GgmlType type = kind.type;
  const uint64_t seed = quantkv::testing::TestSeed();
  SCOPED_TRACE(::testing::Message() << "QUANTKV_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  ThreadPool pool(2);
  for (int64_t rows : {1, 16, 37, 64}) {
    for (int64_t cols : {32, 576, 608}) {
      const std::vector<uint8_t> w = RandomWeights(rng, type, rows, cols);
      auto packed = PackWeights({type, w.data(), rows, cols}, kind.act);
      ASSERT_TRUE(packed.ok()) << packed.status();
      const WeightMatrix matrix{type, w.data(), rows, cols, packed->get()};
      for (int64_t m : {1, 2, 3, 4, 5, 9}) {
        const std::vector<float> x = RandomFloats(rng, m * cols);
        std::vector<double> ref, mag;
        Reference(kind, w, rows, cols, x, m, &ref, &mag);
        std::vector<float> y(m * rows, NAN);
        ASSERT_TRUE(MatMul(matrix, x.data(), m, y.data(), &pool, RowOptions(kind.act)).ok());
        for (int64_t k = 0; k < m * rows; ++k) {
          // fp32 accumulation of at most 19 block terms: a few ulps of the term magnitude.
          ASSERT_NEAR(y[k], ref[k], 1e-5 * mag[k] + 1e-6)
              << "rows " << rows << " cols " << cols << " m " << m << " at " << k;
        }
      }
    }
  }
}

TEST_P(PackedMatMulTest, RowsAreBitIdenticalAloneAndBatched) {
  const Kind kind = GetParam();
  const GgmlType type = kind.type;
  const MatMulOptions opt = RowOptions(kind.act);
  const uint64_t seed = quantkv::testing::TestSeed();
  SCOPED_TRACE(::testing::Message() << "QUANTKV_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  const int64_t rows = 53, cols = 576 + 64;
  const std::vector<uint8_t> w = RandomWeights(rng, type, rows, cols);
  auto packed = PackWeights({type, w.data(), rows, cols}, kind.act);
  ASSERT_TRUE(packed.ok()) << packed.status();
  const WeightMatrix matrix{type, w.data(), rows, cols, packed->get()};
  ThreadPool pool(2);
  for (int64_t m : {2, 4, 7, 16}) {
    const std::vector<float> x = RandomFloats(rng, m * cols);
    std::vector<float> batched(m * rows), alone(rows);
    ASSERT_TRUE(MatMul(matrix, x.data(), m, batched.data(), &pool, opt).ok());
    for (int64_t i = 0; i < m; ++i) {
      ASSERT_TRUE(MatMul(matrix, x.data() + i * cols, 1, alone.data(), nullptr, opt).ok());
      for (int64_t r = 0; r < rows; ++r) {
        ASSERT_EQ(batched[i * rows + r], alone[r]) << "m " << m << " row " << i << " out " << r;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, PackedMatMulTest,
                         ::testing::Values(Kind{GgmlType::kQ4_0, ActivationPrecision::kInt8},
                                           Kind{GgmlType::kQ4_1, ActivationPrecision::kInt8},
                                           Kind{GgmlType::kQ8_0, ActivationPrecision::kInt16}),
                         [](const auto& info) {
                           return std::string(GgmlTypeInfoOf(info.param.type).name);
                         });

TEST(PackedMatMulErrors, RefusesWhatItCannotPack) {
  std::vector<uint8_t> w(34 * 4);
  auto q8 = PackWeights({GgmlType::kQ8_0, w.data(), 4, 32}, ActivationPrecision::kInt8);
  ASSERT_FALSE(q8.ok());
  EXPECT_EQ(q8.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(q8.status().message().find("Q8_0"), std::string::npos) << q8.status();
  if (!CanPackWeights(GgmlType::kQ4_1, ActivationPrecision::kInt8)) {
    GTEST_SKIP() << "no packed kernel on this CPU";
  }
  std::vector<uint8_t> q4(20 * 8);
  auto packed = PackWeights({GgmlType::kQ4_1, q4.data(), 4, 64}, ActivationPrecision::kInt8);
  ASSERT_TRUE(packed.ok());
  // A matrix that claims another shape than its packed copy is refused, not misread.
  float x[96] = {}, y[8] = {};
  const absl::Status s =
      MatMul({GgmlType::kQ4_1, q4.data(), 2, 64, packed->get()}, x, 1, y, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("packed"), std::string::npos) << s;
}

}  // namespace
}  // namespace quantkv::kernels
