// The MoE FFN layer against a float64 reference written from the definitions (softmax
// router, top-k, weighted SwiGLU experts, sigmoid-gated shared expert), and the MoEfication
// identity: a dense MLP split into experts equals the dense MLP with k = n_experts and
// selection-only weights.
#include "runtime/engine/moe_ffn.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "gtest/gtest.h"
#include "kernels/dequantize.h"
#include "kernels/quantize.h"
#include "tests/engine/test_random.h"

namespace quantkv {
namespace {

using kernels::GgmlType;

struct OwnedMatrix {
  std::vector<uint8_t> bytes;
  kernels::WeightMatrix m;
};

OwnedMatrix MakeMatrix(const std::vector<float>& v, int64_t rows, int64_t cols, GgmlType type) {
  OwnedMatrix o;
  const int64_t rb = *kernels::GgmlRowBytes(type, cols);
  o.bytes.resize(static_cast<size_t>(rows * rb));
  for (int64_t r = 0; r < rows; ++r) {
    EXPECT_TRUE(
        kernels::QuantizeRow(type, v.data() + r * cols, o.bytes.data() + r * rb, cols).ok());
  }
  o.m = kernels::WeightMatrix{type, o.bytes.data(), rows, cols};
  return o;
}

// The values a matrix really holds (after quantization), for the reference.
std::vector<double> Values(const kernels::WeightMatrix& m) {
  std::vector<float> f(static_cast<size_t>(m.rows * m.cols));
  EXPECT_TRUE(kernels::DequantizeRows(m.type, m.data, f.data(), m.rows, m.cols).ok());
  return std::vector<double>(f.begin(), f.end());
}

std::vector<double> RefMlp(const ExpertMatrices& e, const std::vector<double>& x) {
  const std::vector<double> g = Values(e.gate), u = Values(e.up), d = Values(e.down);
  const int64_t I = e.gate.rows, H = e.gate.cols;
  std::vector<double> a(I), y(H, 0.0);
  for (int64_t i = 0; i < I; ++i) {
    double gi = 0, ui = 0;
    for (int64_t j = 0; j < H; ++j) {
      gi += g[i * H + j] * x[j];
      ui += u[i * H + j] * x[j];
    }
    a[i] = gi / (1 + std::exp(-gi)) * ui;
  }
  for (int64_t j = 0; j < H; ++j) {
    for (int64_t i = 0; i < I; ++i) y[j] += d[j * I + i] * a[i];
  }
  return y;
}

struct TestLayer {
  std::vector<OwnedMatrix> owned;
  MoeFfnWeights w;
};

TestLayer RandomLayer(std::mt19937_64& rng, int64_t H, int64_t E, int64_t I, int64_t S,
                      GgmlType type) {
  TestLayer t;
  t.owned.reserve(3 * E + 4);
  auto add = [&](int64_t rows, int64_t cols, float scale, GgmlType ty) {
    t.owned.push_back(MakeMatrix(testing::RandomFloats(rng, rows * cols, scale), rows, cols, ty));
    return t.owned.back().m;
  };
  t.w.router = add(E, H, 0.5f, GgmlType::kF32);
  for (int64_t e = 0; e < E; ++e) {
    t.w.experts.push_back({add(I, H, 0.2f, type), add(I, H, 0.2f, type), add(H, I, 0.2f, type)});
  }
  if (S > 0) {
    t.w.shared = {add(S, H, 0.2f, type), add(S, H, 0.2f, type), add(H, S, 0.2f, type)};
    t.w.shared_gate = testing::RandomFloats(rng, H, 0.3f);
  }
  return t;
}

std::vector<double> RefMoe(const TestLayer& t, const moe::RouterConfig& rc,
                           const std::vector<double>& x) {
  const int64_t H = t.w.router.cols, E = rc.n_experts;
  const std::vector<double> r = Values(t.w.router);
  std::vector<double> z(E), p(E);
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t j = 0; j < H; ++j) z[e] += r[e * H + j] * x[j];
  }
  const double zmax = *std::max_element(z.begin(), z.end());
  double sum = 0;
  for (int64_t e = 0; e < E; ++e) sum += p[e] = std::exp(z[e] - zmax);
  for (double& v : p) v /= sum;
  std::vector<int> order(E);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return z[a] > z[b]; });
  double kept = 0;
  for (int j = 0; j < rc.top_k; ++j) kept += p[order[j]];
  std::vector<double> y(H, 0.0);
  for (int j = 0; j < rc.top_k; ++j) {
    const int e = order[j];
    const double w = rc.weighting == moe::RouterWeighting::kOnes          ? 1.0
                     : rc.weighting == moe::RouterWeighting::kSoftmaxTopK ? p[e]
                                                                          : p[e] / kept;
    const std::vector<double> o = RefMlp(t.w.experts[e], x);
    for (int64_t i = 0; i < H; ++i) y[i] += w * o[i];
  }
  if (t.w.shared.present()) {
    double g = 0;
    for (int64_t j = 0; j < H; ++j) g += t.w.shared_gate[j] * x[j];
    g = 1 / (1 + std::exp(-g));
    const std::vector<double> o = RefMlp(t.w.shared, x);
    for (int64_t i = 0; i < H; ++i) y[i] += g * o[i];
  }
  return y;
}

double MaxRelErr(const float* got, const std::vector<double>& want) {
  double err = 0, scale = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::fabs(got[i] - want[i]));
    scale = std::max(scale, std::fabs(want[i]));
  }
  return err / scale;
}

struct Case {
  moe::RouterWeighting weighting;
  int top_k;
  int64_t shared;
  GgmlType type;
  kernels::ActivationPrecision act;
  double tol;
};

TEST(MoeFfnTest, MatchesTheFloat64Definition) {
  const uint64_t seed = testing::TestSeed();
  SCOPED_TRACE(::testing::Message() << "QUANTKV_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  const int64_t H = 64, E = 6, I = 96, n = 13;
  const Case cases[] = {
      {moe::RouterWeighting::kSoftmaxTopKNormalized, 2, 0, GgmlType::kF32,
       kernels::ActivationPrecision::kFloat32, 1e-5},
      {moe::RouterWeighting::kSoftmaxTopK, 3, 128, GgmlType::kF32,
       kernels::ActivationPrecision::kFloat32, 1e-5},
      {moe::RouterWeighting::kOnes, 1, 0, GgmlType::kF32, kernels::ActivationPrecision::kFloat32,
       1e-5},
      // Quantized experts with int8 activations: the reference uses the same quantized
      // weights, so only activation rounding remains (llama.cpp's scheme, up to ~3%).
      {moe::RouterWeighting::kSoftmaxTopKNormalized, 2, 64, GgmlType::kQ8_0,
       kernels::ActivationPrecision::kInt8, 5e-2},
      {moe::RouterWeighting::kSoftmaxTopKNormalized, 2, 0, GgmlType::kQ4_0,
       kernels::ActivationPrecision::kInt8, 5e-2},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message()
                 << moe::RouterWeightingName(c.weighting) << " k=" << c.top_k
                 << " shared=" << c.shared << " type=" << kernels::GgmlTypeInfoOf(c.type).name);
    TestLayer t = RandomLayer(rng, H, E, I, c.shared, c.type);
    const moe::RouterConfig rc{.n_experts = E, .top_k = c.top_k, .weighting = c.weighting};
    const std::vector<float> x = testing::RandomFloats(rng, n * H, 1.0f);
    std::vector<float> y(n * H);
    MoeFfnScratch scratch;
    moe::Routing routing;
    kernels::MatMulOptions mm;
    mm.activations = c.act;
    mm.gemm_min_rows = 1 << 30;
    ASSERT_TRUE(MoeFfn(t.w, rc, x.data(), n, y.data(), nullptr, mm, scratch, routing).ok());
    ASSERT_EQ(routing.n_tokens, n);
    for (int64_t r = 0; r < n; ++r) {
      const std::vector<double> xr(x.begin() + r * H, x.begin() + (r + 1) * H);
      EXPECT_LT(MaxRelErr(y.data() + r * H, RefMoe(t, rc, xr)), c.tol) << "row " << r;
    }
    // Through SGEMM (many rows) the same within fp32 rounding.
    mm.gemm_min_rows = 1;
    std::vector<float> y2(n * H);
    ASSERT_TRUE(MoeFfn(t.w, rc, x.data(), n, y2.data(), nullptr, mm, scratch, routing).ok());
    if (c.act == kernels::ActivationPrecision::kFloat32) {
      for (int64_t i = 0; i < n * H; ++i) EXPECT_NEAR(y2[i], y[i], 1e-4 * (1 + std::fabs(y[i])));
    }
  }
}

// Dense MLP split into experts by a random partition of its neurons: with every expert
// selected and weight 1 the output is the dense MLP's.
TEST(MoeFfnTest, ADenseMlpSplitIntoExpertsEqualsItWithAllExpertsSelected) {
  const uint64_t seed = testing::TestSeed();
  SCOPED_TRACE(::testing::Message() << "QUANTKV_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  const int64_t H = 32, E = 4, I = 64, n = 5, Ie = I / E;
  const std::vector<float> g = testing::RandomFloats(rng, I * H, 0.2f),
                           u = testing::RandomFloats(rng, I * H, 0.2f),
                           d = testing::RandomFloats(rng, H * I, 0.2f);
  std::vector<int> perm(I);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  TestLayer t;
  t.owned.reserve(3 * E + 1);
  auto add = [&](std::vector<float> v, int64_t rows, int64_t cols) {
    t.owned.push_back(MakeMatrix(v, rows, cols, GgmlType::kF32));
    return t.owned.back().m;
  };
  t.w.router = add(testing::RandomFloats(rng, E * H, 1.0f), E, H);
  for (int64_t e = 0; e < E; ++e) {
    std::vector<float> ge(Ie * H), ue(Ie * H), de(H * Ie);
    for (int64_t i = 0; i < Ie; ++i) {
      const int src = perm[e * Ie + i];
      std::copy(g.begin() + src * H, g.begin() + (src + 1) * H, ge.begin() + i * H);
      std::copy(u.begin() + src * H, u.begin() + (src + 1) * H, ue.begin() + i * H);
      for (int64_t j = 0; j < H; ++j) de[j * Ie + i] = d[j * I + src];
    }
    t.w.experts.push_back({add(ge, Ie, H), add(ue, Ie, H), add(de, H, Ie)});
  }
  OwnedMatrix dg = MakeMatrix(g, I, H, GgmlType::kF32), du = MakeMatrix(u, I, H, GgmlType::kF32),
              dd = MakeMatrix(d, H, I, GgmlType::kF32);
  const ExpertMatrices dense{dg.m, du.m, dd.m};
  const std::vector<float> x = testing::RandomFloats(rng, n * H, 1.0f);
  std::vector<float> y(n * H);
  MoeFfnScratch scratch;
  moe::Routing routing;
  kernels::MatMulOptions mm;
  mm.activations = kernels::ActivationPrecision::kFloat32;
  const moe::RouterConfig all{.n_experts = E, .top_k = E, .weighting = moe::RouterWeighting::kOnes};
  ASSERT_TRUE(MoeFfn(t.w, all, x.data(), n, y.data(), nullptr, mm, scratch, routing).ok());
  for (int64_t r = 0; r < n; ++r) {
    const std::vector<double> xr(x.begin() + r * H, x.begin() + (r + 1) * H);
    EXPECT_LT(MaxRelErr(y.data() + r * H, RefMlp(dense, xr)), 1e-5);
  }
  // With k < E it is no longer the dense MLP: the check above can fail.
  const moe::RouterConfig two{.n_experts = E, .top_k = 2, .weighting = moe::RouterWeighting::kOnes};
  ASSERT_TRUE(MoeFfn(t.w, two, x.data(), n, y.data(), nullptr, mm, scratch, routing).ok());
  const std::vector<double> x0(x.begin(), x.begin() + H);
  EXPECT_GT(MaxRelErr(y.data(), RefMlp(dense, x0)), 1e-3);
}

}  // namespace
}  // namespace quantkv
