// SnapKV's observation-window scores against a float64 softmax over the exact keys, the
// retained rows they come from, and promotion from retained rows long after they left the
// ring (the prompt's end).
#include "runtime/engine/snapkv.h"

#include <algorithm>
#include <cmath>

#include "gtest/gtest.h"
#include "kernels/fp16.h"
#include "runtime/kv/kv_cache.h"
#include "tests/engine/test_random.h"

namespace quantkv {
namespace {

float Fp16(float x) { return kernels::Fp16ToFp32(kernels::Fp32ToFp16(x)); }

struct Fixture {
  std::unique_ptr<KvCache> cache;
  SequenceKv seq;
  std::vector<float> k, v;
};

Fixture Make(std::mt19937_64& rng, const std::string& spec, int64_t n_kv, int64_t d, int64_t n,
             bool retain) {
  Fixture f;
  KvCacheConfig kc;
  kc.n_layers = 2;
  kc.n_kv_heads = n_kv;
  kc.head_dim = d;
  kc.max_bytes = 8 << 20;
  kc.max_step_tokens = 64;
  auto policy = ParseKvPolicy(spec, 2, n_kv);
  EXPECT_TRUE(policy.ok()) << policy.status();
  kc.policy = *policy;
  auto cache = KvCache::Create(kc);
  EXPECT_TRUE(cache.ok()) << cache.status();
  f.cache = std::move(*cache);
  f.cache->RetainRows(f.seq, retain);
  f.k = testing::RandomFloats(rng, n * n_kv * d);
  f.v = testing::RandomFloats(rng, n * n_kv * d);
  for (int64_t pos = 0; pos < n; pos += 64) {  // in steps, as prefill chunks arrive
    const int64_t m = std::min<int64_t>(64, n - pos);
    EXPECT_TRUE(f.cache->Reserve(f.seq, pos + m).ok());
    for (int64_t l = 0; l < 2; ++l) {
      f.cache->Write(f.seq, l, pos, m, f.k.data() + pos * n_kv * d, f.v.data() + pos * n_kv * d);
    }
    f.seq.length = pos + m;
  }
  return f;
}

TEST(SnapKvTest, ScoresMatchFloat64SoftmaxMassPooled) {
  const uint64_t seed = testing::TestSeed();
  SCOPED_TRACE(::testing::Message() << "QUANTKV_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  const int64_t n_kv = 2, d = 64, n_heads = 6, n = 300, w = 16;
  Fixture f = Make(rng, "int2-comp", n_kv, d, n, /*retain=*/true);
  const std::vector<float> q = testing::RandomFloats(rng, w * n_heads * d);
  std::vector<int32_t> pos(w);
  for (int64_t i = 0; i < w; ++i) pos[i] = static_cast<int32_t>(n - w + i);
  const SnapKvQueries sq{q.data(), pos.data(), w, n_heads, 0.125f};
  for (int pool_kernel : {1, 7}) {
    auto got = SnapKvScores(*f.cache, f.seq, 1, n, sq, pool_kernel, nullptr);
    ASSERT_TRUE(got.ok()) << got.status();
    std::vector<double> want(n, 0.0);
    for (int64_t i = 0; i < w; ++i) {
      for (int64_t h = 0; h < n_heads; ++h) {
        const int64_t g = h / (n_heads / n_kv);
        std::vector<double> s(pos[i] + 1);
        double mx = -INFINITY, sum = 0;
        for (int64_t t = 0; t <= pos[i]; ++t) {
          double dot = 0;
          for (int64_t c = 0; c < d; ++c) {
            dot += static_cast<double>(q[(i * n_heads + h) * d + c]) *
                   Fp16(f.k[(t * n_kv + g) * d + c]);
          }
          s[t] = 0.125 * dot;
          mx = std::max(mx, s[t]);
        }
        for (double x : s) sum += std::exp(x - mx);
        for (int64_t t = 0; t <= pos[i]; ++t) want[t] += std::exp(s[t] - mx) / sum;
      }
    }
    double total = 0;
    for (int64_t t = 0; t < n; ++t) {
      double expect = want[t];
      for (int64_t u = std::max<int64_t>(0, t - pool_kernel / 2);
           u <= std::min<int64_t>(n - 1, t + pool_kernel / 2); ++u) {
        expect = std::max(expect, want[u]);
      }
      EXPECT_NEAR((*got)[t], expect, 1e-5 + 1e-4 * expect) << "token " << t;
      total += want[t];
    }
    EXPECT_NEAR(total, static_cast<double>(w * n_heads), 1e-6 * w * n_heads)
        << "each query head's probabilities sum to one";
  }
  // A bad pooling width and a query past the tokens are refused by name.
  auto even = SnapKvScores(*f.cache, f.seq, 1, n, sq, 4, nullptr);
  EXPECT_FALSE(even.ok());
  auto short_seq = SnapKvScores(*f.cache, f.seq, 1, n - w, sq, 1, nullptr);
  ASSERT_FALSE(short_seq.ok());
  EXPECT_NE(short_seq.status().message().find("position"), std::string::npos);
}

TEST(SnapKvTest, RetainedRowsArePromotedAfterLeavingTheRing) {
  const uint64_t seed = testing::TestSeed();
  SCOPED_TRACE(::testing::Message() << "QUANTKV_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  const int64_t n_kv = 2, d = 64, n = 400;
  const std::string spec = "k=int2:chan:keep4,v=int2:g64:asym:keep4,sink=4,window=8,block=32";
  Fixture kept = Make(rng, spec, n_kv, d, n, /*retain=*/true);
  Fixture plain = Make(rng, spec, n_kv, d, n, /*retain=*/false);
  // Token 10 left the ring long ago: only a retained row can be promoted.
  EXPECT_EQ(plain.cache->PromoteRow(plain.seq, 0, 10, 1.0f), 0);
  EXPECT_EQ(kept.cache->PromoteRow(kept.seq, 0, 10, 1.0f), 2 * n_kv);
  const kernels::KvLayerView view = kept.cache->View(kept.seq, 0, n);
  std::vector<float> out(32 * d);
  view.k.codecs[1]->Decode(view.k.Slab(view.block_table[0], 1), 0, 32, out.data());
  for (int64_t c = 0; c < d; ++c) {
    EXPECT_EQ(out[10 * d + c], Fp16(kept.k[(10 * n_kv + 1) * d + c])) << "exact after promotion";
  }
  ASSERT_NE(kept.cache->RetainedRow(kept.seq, 1, 1, n - 1), nullptr);
  EXPECT_EQ(kept.cache->RetainedRow(kept.seq, 1, 1, n), nullptr);
  kept.cache->RetainRows(kept.seq, false);
  EXPECT_EQ(kept.cache->RetainedRow(kept.seq, 0, 0, 10), nullptr);
  EXPECT_EQ(kept.cache->PromoteRow(kept.seq, 0, 11, 1.0f), 0) << "released";
  // Retention asked for on a sequence already written retains nothing (rows would be missing).
  plain.cache->RetainRows(plain.seq, true);
  EXPECT_FALSE(plain.seq.retain_rows);
}

}  // namespace
}  // namespace quantkv
