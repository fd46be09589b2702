// AttentionQuery::lse and AddAttentionMass (kernels/attention_mass.h) against float64, on a
// real KvCache (fp16 blocks, sinks, window): the log-sum-exp every attention path reports
// (tiled for many queries, the fused decode kernel for one, split over threads or not), and
// the probability mass the queries give the tokens still held exactly.
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "kernels/attention_mass.h"
#include "kernels/dequantize.h"
#include "runtime/kv/kv_cache.h"
#include "tests/engine/test_cache.h"
#include "tests/testutil/test_seed.h"

namespace quantkv {
namespace {

constexpr int64_t kKvHeads = 3, kHeads = 9, kDim = 64, kCtx = 300;

std::vector<float> Fp16Rounded(std::vector<float> x) {
  std::vector<uint16_t> h(x.size());
  kernels::Fp32ToFp16Row(x.data(), h.data(), static_cast<int64_t>(x.size()));
  kernels::Fp16ToFp32Row(h.data(), x.data(), static_cast<int64_t>(x.size()));
  return x;
}

struct Case {
  int64_t n_q;
  int threads;
};

TEST(AttentionMassTest, LseAndMassMatchFloat64) {
  std::mt19937 rng(testing::TestSeed());
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t row = kKvHeads * kDim;
  std::vector<float> k(kCtx * row), v(kCtx * row), q(64 * kHeads * kDim);
  for (float& x : k) x = 2.0f * nd(rng);  // peaked enough that the mass is uneven
  for (float& x : v) x = nd(rng);
  for (float& x : q) x = nd(rng);
  // fp16 everywhere (blocks and protected rows), so float64 on the rounded inputs is the
  // exact answer.
  k = Fp16Rounded(k);
  v = Fp16Rounded(v);

  auto policy = ParseKvPolicy("fp16,sink=4,window=8,block=32");
  ASSERT_TRUE(policy.ok()) << policy.status();
  KvCacheConfig cfg;
  cfg.n_layers = 1;
  cfg.n_kv_heads = kKvHeads;
  cfg.head_dim = kDim;
  cfg.policy = *policy;
  cfg.max_bytes = 16 << 20;
  cfg.max_step_tokens = 64;
  auto cache = KvCache::Create(cfg);
  ASSERT_TRUE(cache.ok()) << cache.status();
  SequenceKv seq;
  testing::WriteInSteps(**cache, seq, k, v, row);
  const kernels::KvLayerView view = (*cache)->View(seq, 0, kCtx);
  const int64_t ring_first = std::max<int64_t>(0, kCtx - view.ring_tokens);
  ASSERT_LT(ring_first, kCtx - 40) << "the test wants 40 exact tokens at the end";
  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));

  kernels::ThreadPool pool(2);
  for (const Case c : {Case{1, 1}, Case{1, 2}, Case{40, 1}, Case{40, 2}}) {
    SCOPED_TRACE(::testing::Message() << c.n_q << " queries, " << c.threads << " threads");
    std::vector<int32_t> positions;
    for (int64_t i = 0; i < c.n_q; ++i) positions.push_back(static_cast<int32_t>(kCtx - c.n_q + i));
    std::vector<float> out(c.n_q * kHeads * kDim), lse(c.n_q * kHeads);
    kernels::AttentionQuery aq{q.data(), c.n_q, kHeads, positions.data(), scale};
    aq.lse = lse.data();
    kernels::Attention(aq, view, out.data(), c.threads > 1 ? &pool : nullptr);

    // float64: every token 0..p of every head, scores from the rounded keys.
    const int64_t t0 = kCtx - 60;  // sinks are far; 20 of these lie before ring_first or not
    std::vector<double> want_mass(kCtx - t0, 0.0);
    for (int64_t i = 0; i < c.n_q; ++i) {
      for (int64_t h = 0; h < kHeads; ++h) {
        const int64_t g = h / (kHeads / kKvHeads);
        const float* qi = q.data() + (i * kHeads + h) * kDim;
        std::vector<double> s(positions[i] + 1);
        double mx = -INFINITY;
        for (int64_t t = 0; t <= positions[i]; ++t) {
          double dot = 0;
          for (int64_t x = 0; x < kDim; ++x) dot += double(qi[x]) * k[t * row + g * kDim + x];
          s[t] = dot * scale;
          mx = std::max(mx, s[t]);
        }
        double sum = 0;
        for (double st : s) sum += std::exp(st - mx);
        const double want_lse = mx + std::log(sum);
        EXPECT_NEAR(lse[i * kHeads + h], want_lse, 2e-4) << "query " << i << " head " << h;
        for (int64_t t = std::max(t0, ring_first); t <= positions[i]; ++t) {
          want_mass[t - t0] += std::exp(s[t] - want_lse);
        }
      }
    }
    std::vector<float> mass(kCtx - t0, 0.0f);
    kernels::AddAttentionMass(aq, lse.data(), view, t0, kCtx, mass.data());
    double total = 0;
    for (int64_t t = t0; t < kCtx; ++t) {
      if (t < ring_first) {
        EXPECT_EQ(mass[t - t0], 0.0f) << "token " << t << " has no exact copy: left unchanged";
        continue;
      }
      EXPECT_NEAR(mass[t - t0], want_mass[t - t0], 1e-4 + 1e-3 * want_mass[t - t0])
          << "token " << t;
      total += mass[t - t0];
    }
    // Each query head's probabilities sum to 1 over all its tokens; the exact tail holds part.
    EXPECT_GT(total, 0.0);
    EXPECT_LE(total, static_cast<double>(c.n_q * kHeads) * (1 + 1e-4));
    // It adds: a second call doubles it.
    std::vector<float> twice = mass;
    kernels::AddAttentionMass(aq, lse.data(), view, t0, kCtx, twice.data());
    for (size_t t = 0; t < mass.size(); ++t) EXPECT_FLOAT_EQ(twice[t], 2 * mass[t]);
  }
}

}  // namespace
}  // namespace quantkv
