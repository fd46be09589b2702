// RMSNorm, SwiGLU and softmax against float64 on fresh random inputs.
#include <cmath>

#include "gtest/gtest.h"
#include "kernels/activation.h"
#include "kernels/rmsnorm.h"
#include "tests/engine/test_random.h"

namespace quantkv::kernels {
namespace {

TEST(RmsNormTest, MatchesFloat64AndFusedAdd) {
  std::mt19937_64 rng(quantkv::testing::TestSeed());
  const int64_t rows = 3, n = 576;
  std::vector<float> x = quantkv::testing::RandomFloats(rng, rows * n, 3.0f);
  std::vector<float> delta = quantkv::testing::RandomFloats(rng, rows * n);
  std::vector<float> w = quantkv::testing::RandomFloats(rng, n);
  std::vector<float> y(rows * n);
  RmsNorm(x.data(), w.data(), y.data(), rows, n, 1e-5f);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += double(x[r * n + i]) * x[r * n + i];
    const double inv = 1 / std::sqrt(ss / n + 1e-5);
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_NEAR(y[r * n + i], x[r * n + i] * inv * w[i], 1e-5 * (1 + std::fabs(y[r * n + i])));
    }
  }
  std::vector<float> res = x, y2(rows * n), sum(rows * n);
  for (int64_t i = 0; i < rows * n; ++i) sum[i] = x[i] + delta[i];
  AddRmsNorm(res.data(), delta.data(), w.data(), y2.data(), rows, n, 1e-5f);
  RmsNorm(sum.data(), w.data(), y.data(), rows, n, 1e-5f);
  for (int64_t i = 0; i < rows * n; ++i) {
    EXPECT_FLOAT_EQ(res[i], sum[i]);
    EXPECT_FLOAT_EQ(y2[i], y[i]);
  }
}

TEST(ActivationTest, SwiGluSoftmaxLogSumExp) {
  std::mt19937_64 rng(quantkv::testing::TestSeed());
  std::vector<float> g = quantkv::testing::RandomFloats(rng, 100, 4.0f);
  std::vector<float> u = quantkv::testing::RandomFloats(rng, 100);
  std::vector<float> o(100);
  SwiGlu(g.data(), u.data(), o.data(), 100);
  for (int i = 0; i < 100; ++i) {
    const double want = g[i] / (1 + std::exp(-double(g[i]))) * u[i];
    EXPECT_NEAR(o[i], want, 1e-5 * (1 + std::fabs(want)));
  }
  std::vector<float> x = quantkv::testing::RandomFloats(rng, 50, 30.0f);
  double mx = *std::max_element(x.begin(), x.end()), z = 0;
  for (float v : x) z += std::exp(double(v) - mx);
  EXPECT_NEAR(LogSumExp(x.data(), 50), mx + std::log(z), 1e-9);
  std::vector<float> p = x;
  Softmax(p.data(), 50);
  for (int i = 0; i < 50; ++i) EXPECT_NEAR(p[i], std::exp(double(x[i]) - mx) / z, 1e-6);
}

}  // namespace
}  // namespace quantkv::kernels
