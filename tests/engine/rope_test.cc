// RoPE against float64 formulas: the plain rotation, and the scaled frequency tables
// (linear, YaRN, llama3) against HF transformers' published formulas recomputed here.
#include "kernels/rope.h"

#include <cmath>
#include <numbers>

#include "gtest/gtest.h"
#include "tests/engine/test_random.h"

namespace quantkv::kernels {
namespace {

TEST(RopeTest, RotatesAdjacentPairsAndNeoxHalves) {
  std::mt19937_64 rng(quantkv::testing::TestSeed());
  for (bool neox : {false, true}) {
    RopeSpec spec;
    spec.head_dim = 64;
    spec.theta = 100000.0;
    spec.neox = neox;
    RopeTable table(spec);
    const int64_t n_tok = 3, n_heads = 2, d = 64;
    std::vector<float> x = quantkv::testing::RandomFloats(rng, n_tok * n_heads * d);
    std::vector<float> orig = x;
    const int32_t pos[3] = {0, 7, 4000};
    table.Apply(x.data(), n_tok, n_heads, pos);
    for (int64_t t = 0; t < n_tok; ++t) {
      for (int64_t h = 0; h < n_heads; ++h) {
        for (int64_t i = 0; i < d / 2; ++i) {
          const double f = std::pow(100000.0, -2.0 * i / d) * pos[t];
          const int64_t a = neox ? i : 2 * i, b = neox ? i + d / 2 : 2 * i + 1;
          const float* o = orig.data() + (t * n_heads + h) * d;
          const float* r = x.data() + (t * n_heads + h) * d;
          EXPECT_NEAR(r[a], o[a] * std::cos(f) - o[b] * std::sin(f), 1e-5);
          EXPECT_NEAR(r[b], o[a] * std::sin(f) + o[b] * std::cos(f), 1e-5);
        }
      }
    }
  }
}

TEST(RopeTest, LinearScalingDividesFrequencies) {
  RopeSpec spec;
  spec.scaling = RopeScaling::kLinear;
  spec.factor = 4.0;
  RopeTable table(spec);
  for (int64_t i = 0; i < 32; ++i) {
    EXPECT_NEAR(table.inv_freq()[i], std::pow(10000.0, -2.0 * i / 64) / 4.0, 1e-15);
  }
}

TEST(RopeTest, YarnMatchesTransformersFormula) {
  RopeSpec spec;
  spec.scaling = RopeScaling::kYarn;
  spec.factor = 4.0;
  spec.original_context = 2048;
  RopeTable table(spec);
  // transformers _compute_yarn_parameters, written out independently.
  const double dim = 64, base = 10000, ctx = 2048;
  auto corr = [&](double rot) {
    return dim * std::log(ctx / (rot * 2 * std::numbers::pi)) / (2 * std::log(base));
  };
  const double low = std::max(0.0, std::floor(corr(32))), high = std::min(63.0, std::ceil(corr(1)));
  for (int64_t i = 0; i < 32; ++i) {
    const double pf = std::pow(base, 2.0 * i / dim);
    const double lin = std::clamp((i - low) / (high - low), 0.0, 1.0);
    const double ext = 1 - lin;
    const double want = (1 / (4 * pf)) * (1 - ext) + (1 / pf) * ext;
    EXPECT_NEAR(table.inv_freq()[i], want, 1e-15) << i;
  }
  EXPECT_NEAR(table.magnitude(), 0.1 * std::log(4.0) + 1, 1e-12);
}

TEST(RopeTest, Llama3KeepsHighFrequenciesAndScalesLowOnes) {
  RopeSpec spec;
  spec.theta = 500000.0;
  spec.head_dim = 128;
  spec.scaling = RopeScaling::kLlama3;
  spec.factor = 8.0;
  spec.original_context = 8192;
  RopeTable table(spec);
  for (int64_t i = 0; i < 64; ++i) {
    const double f = std::pow(500000.0, -2.0 * i / 128);
    const double wavelen = 2 * std::numbers::pi / f;
    double want = f;
    if (wavelen > 8192.0 / 1.0) {
      want = f / 8.0;
    } else if (wavelen >= 8192.0 / 4.0) {
      const double s = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
      want = (1 - s) * f / 8.0 + s * f;
    }
    EXPECT_NEAR(table.inv_freq()[i], want, 1e-15) << i;
  }
}

}  // namespace
}  // namespace quantkv::kernels
