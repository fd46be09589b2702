// Paged attention against a float64 softmax(qKᵀ)V on the same (rounded) cache contents,
// with scattered physical blocks, GQA groups, and causal prefill positions.
#include "kernels/attention.h"

#include <algorithm>
#include <cmath>

#include "gtest/gtest.h"
#include "runtime/kv/paged_kv_cache.h"
#include "tests/engine/test_random.h"

namespace quantkv {
namespace {

void CheckAttention(KvFormat format, int64_t n_ctx, int64_t n_q, double tol) {
  const uint64_t seed = testing::TestSeed();
  SCOPED_TRACE(::testing::Message() << "QUANTKV_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  const int64_t n_heads = 6, n_kv = 2, d = 64, bt = 16;
  KvCacheConfig cfg{1, n_kv, d, bt, format, int64_t{8} << 20};
  auto cache = PagedKvCache::Create(cfg);
  ASSERT_TRUE(cache.ok());
  // Take a few blocks first so the sequence's blocks are not 0, 1, 2, ...
  SequenceBlocks other, seq;
  ASSERT_TRUE((*cache)->Reserve(other, 3 * bt).ok());
  ASSERT_TRUE((*cache)->Reserve(seq, n_ctx).ok());
  std::vector<float> k = testing::RandomFloats(rng, n_ctx * n_kv * d);
  std::vector<float> v = testing::RandomFloats(rng, n_ctx * n_kv * d);
  (*cache)->Write(seq, 0, 0, n_ctx, k.data(), v.data());
  if (format == KvFormat::kF16) {  // the reference sees what the cache stores
    for (float& x : k) x = kernels::Fp16ToFp32(kernels::Fp32ToFp16(x));
    for (float& x : v) x = kernels::Fp16ToFp32(kernels::Fp32ToFp16(x));
  }
  std::vector<float> q = testing::RandomFloats(rng, n_q * n_heads * d);
  std::vector<int32_t> pos(n_q);
  for (int64_t i = 0; i < n_q; ++i) pos[i] = static_cast<int32_t>(n_ctx - n_q + i);
  kernels::AttentionQuery aq{q.data(), n_q, n_heads, pos.data(), 1.0f / 8.0f};
  std::vector<float> out(n_q * n_heads * d);
  kernels::ThreadPool pool(2);
  kernels::PagedAttention(aq, (*cache)->View(seq, 0, n_ctx), out.data(), &pool);

  double err = 0, norm = 0;
  for (int64_t i = 0; i < n_q; ++i) {
    for (int64_t h = 0; h < n_heads; ++h) {
      const int64_t g = h / (n_heads / n_kv);
      std::vector<double> s(pos[i] + 1);
      for (int64_t t = 0; t <= pos[i]; ++t) {
        double dot = 0;
        for (int64_t e = 0; e < d; ++e) {
          dot += double(q[(i * n_heads + h) * d + e]) * k[(t * n_kv + g) * d + e];
        }
        s[t] = dot / 8.0;
      }
      const double mx = *std::max_element(s.begin(), s.end());
      double z = 0;
      for (double& x : s) z += (x = std::exp(x - mx));
      for (int64_t e = 0; e < d; ++e) {
        double o = 0;
        for (int64_t t = 0; t <= pos[i]; ++t) o += s[t] / z * v[(t * n_kv + g) * d + e];
        const double got = out[(i * n_heads + h) * d + e];
        err += (got - o) * (got - o);
        norm += o * o;
      }
    }
  }
  EXPECT_LE(std::sqrt(err / norm), tol);
}

TEST(PagedAttentionTest, DecodeFp32) { CheckAttention(KvFormat::kF32, 77, 1, 1e-5); }
TEST(PagedAttentionTest, DecodeFp16) { CheckAttention(KvFormat::kF16, 130, 1, 1e-5); }
TEST(PagedAttentionTest, CausalPrefillFp32) { CheckAttention(KvFormat::kF32, 40, 40, 1e-5); }
TEST(PagedAttentionTest, ChunkedPrefillFp16) { CheckAttention(KvFormat::kF16, 90, 25, 1e-5); }

}  // namespace
}  // namespace quantkv
