// Product-quantized keys scored by table lookup (decode: few queries) against the tiled
// kernel, which decodes the same keys and takes dot products: the same attention up to
// float rounding, with and without Hadamard-rotated keys, GQA groups, sinks and a window.
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/engine/test_cache.h"

namespace quantkv {
namespace {

TEST(AttentionLookupTest, LookupScoresEqualDecodedKeys) {
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t kv_heads = 2, d = 64;
  struct Case {
    const char* spec;
    int bits, dims;
    int64_t heads, n_ctx, n_q;
  };
  for (const Case& c :
       {Case{"k=pq4x8,v=int8,block=32", 8, 4, 6, 300, 1},
        Case{"k=pq2x6,v=int4,rotate=k,block=32", 6, 2, 6, 257, 3},
        Case{"k=pq4x10,v=pq4x8,rotate=kv,sink=4,window=16,block=64", 10, 4, 2, 700, 2}}) {
    SCOPED_TRACE(c.spec);
    testing::CacheAttention ca;
    ca.spec = c.spec;
    ca.n_kv_heads = kv_heads;
    ca.head_dim = d;
    ca.n_heads = c.heads;
    auto centroids = [&](int bits, int dims) {
      std::vector<float> v(static_cast<size_t>((1 << bits) * dims));
      for (float& x : v) x = nd(rng);
      return v;
    };
    ca.codebooks.k = centroids(c.bits, c.dims);
    if (std::string(c.spec).find("v=pq4x8") != std::string::npos) {
      ca.codebooks.v = centroids(8, 4);
    }
    std::vector<float> k(c.n_ctx * kv_heads * d), v(k.size()), q(c.n_q * c.heads * d);
    for (float& x : k) x = nd(rng);
    for (float& x : v) x = nd(rng);
    for (float& x : q) x = nd(rng);
    const std::vector<float> lookup = testing::AttendThroughCache(ca, k, v, q, c.n_q);
    ca.fused_decode = false;
    const std::vector<float> tiled = testing::AttendThroughCache(ca, k, v, q, c.n_q);
    ASSERT_EQ(lookup.size(), tiled.size());
    ASSERT_FALSE(lookup.empty());
    double worst = 0;
    for (size_t i = 0; i < tiled.size(); ++i) {
      worst = std::max(worst, std::fabs(double{lookup[i]} - tiled[i]));
    }
    EXPECT_LT(worst, 2e-5) << "max |lookup - tiled|";
    EXPECT_NE(lookup, tiled) << "lookup path not taken (results identical bit for bit)";
  }
}

}  // namespace
}  // namespace quantkv
