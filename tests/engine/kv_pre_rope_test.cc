// Pre-RoPE key quantization: keys are un-rotated before encoding and re-rotated inside
// attention. With an exact codec the result must equal the post-RoPE cache; with a
// per-channel int4 codec on keys whose outliers sit in fixed pre-RoPE channels (what real
// keys look like), pre-RoPE storage must give a smaller attention error (KVQuant's point).
#include <cmath>

#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "kernels/rope.h"
#include "runtime/kv/kv_cache.h"
#include "tests/engine/test_cache.h"
#include "tests/engine/test_metrics.h"
#include "tests/engine/test_random.h"

namespace quantkv {
namespace {

using testing::RelError;

constexpr int64_t kD = 64, kKv = 2, kHeads = 4, kCtx = 300;

struct Data {
  std::vector<float> k, v, q;  // k rotated, as the engine writes it; q of the last token
};

Data MakeData(std::mt19937_64& rng, const kernels::RopeTable& rope) {
  Data x;
  const int64_t row = kKv * kD;
  x.k = testing::RandomFloats(rng, kCtx * row, 0.5f);
  x.v = testing::RandomFloats(rng, kCtx * row);
  // Fixed-sign outlier channels before RoPE: large per-channel offsets.
  for (int64_t t = 0; t < kCtx; ++t) {
    for (int64_t ch = 3; ch < row; ch += 11) x.k[t * row + ch] += 12.0f;
  }
  std::vector<int32_t> pos(kCtx);
  for (int64_t t = 0; t < kCtx; ++t) pos[t] = static_cast<int32_t>(t);
  rope.Apply(x.k.data(), kCtx, kKv, pos.data());
  x.q = testing::RandomFloats(rng, kHeads * kD, 0.3f);
  return x;
}

std::vector<float> Attend(const std::string& spec, const kernels::RopeTable& rope, const Data& x) {
  return testing::AttendThroughCache({spec, kKv, kD, kHeads, &rope, nullptr}, x.k, x.v, x.q, 1);
}

TEST(KvPreRopeTest, ExactCodecMatchesPostRope) {
  for (bool neox : {false, true}) {
    kernels::RopeSpec rs;
    rs.head_dim = kD;
    rs.neox = neox;
    kernels::RopeTable rope(rs);
    std::mt19937_64 rng(testing::TestSeed());
    const Data x = MakeData(rng, rope);
    const std::vector<float> post = Attend("fp32,block=32", rope, x);
    const std::vector<float> pre = Attend("fp32,block=32,rope=pre", rope, x);
    EXPECT_LT(RelError(pre, post), 2e-6) << "neox " << neox;
    kernels::RopeTable cached(rs);
    cached.Precompute(kCtx);  // the cached table must rotate exactly as the computed one
    EXPECT_LT(RelError(Attend("fp32,block=32,rope=pre", cached, x), post), 2e-6);
  }
}

TEST(KvPreRopeTest, PerChannelKeysQuantizeBetterBeforeRope) {
  kernels::RopeSpec rs;
  rs.head_dim = kD;
  kernels::RopeTable rope(rs);
  std::mt19937_64 rng(testing::TestSeed());
  const Data x = MakeData(rng, rope);
  const std::vector<float> exact = Attend("fp32,block=32", rope, x);
  const double post = RelError(Attend("k=int4:chan,v=fp32,block=32", rope, x), exact);
  const double pre = RelError(Attend("k=int4:chan,v=fp32,block=32,rope=pre", rope, x), exact);
  EXPECT_LT(pre, 0.85 * post) << "pre-RoPE " << pre << " vs post-RoPE " << post;
}

TEST(KvPreRopeTest, NeedsTheRopeTable) {
  auto policy = ParseKvPolicy("int4,rope=pre");
  ASSERT_TRUE(policy.ok());
  EXPECT_TRUE(policy->pre_rope_keys);
  KvCacheConfig cfg;
  cfg.n_layers = 1;
  cfg.n_kv_heads = 1;
  cfg.head_dim = kD;
  cfg.policy = *policy;
  auto cache = KvCache::Create(cfg);
  ASSERT_FALSE(cache.ok());
  EXPECT_NE(std::string(cache.status().message()).find("rope"), std::string::npos);
  auto bad = ParseKvPolicy("int4,rope=sideways");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("rope=sideways"), std::string::npos);
}

}  // namespace
}  // namespace quantkv
