// Page selection (Quest): attention with skipped blocks equals a float64 softmax(qKᵀ)V over
// the tokens that are not skipped, on the tiled and the fused decode paths; SelectPages
// keeps the block that holds a key aligned with the query, keeps everything at fraction 1,
// and its block bound is an upper bound of every q·k in the block.
#include <algorithm>
#include <cmath>

#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "kernels/fp16.h"
#include "runtime/kv/kv_cache.h"
#include "tests/engine/test_random.h"

namespace quantkv {
namespace {

struct Bed {
  std::unique_ptr<KvCache> cache;
  SequenceKv seq;
  std::vector<float> k, v;  // fp16-rounded, [n][n_kv][d]
};

constexpr int64_t kD = 64, kKv = 2, kHeads = 6, kBt = 32, kN = 300;

Bed Make(std::mt19937_64& rng, const std::string& spec) {
  Bed b;
  KvCacheConfig c;
  c.n_layers = 1;
  c.n_kv_heads = kKv;
  c.head_dim = kD;
  c.policy = *ParseKvPolicy(spec);
  c.max_bytes = 16 << 20;
  c.max_step_tokens = 64;
  c.page_summaries = true;
  b.cache = std::move(*KvCache::Create(c));
  b.k = testing::RandomFloats(rng, kN * kKv * kD);
  b.v = testing::RandomFloats(rng, kN * kKv * kD);
  for (std::vector<float>* x : {&b.k, &b.v}) {
    for (float& f : *x) f = kernels::Fp16ToFp32(kernels::Fp32ToFp16(f));
  }
  EXPECT_TRUE(b.cache->Reserve(b.seq, kN).ok());
  for (int64_t p = 0; p < kN; p += 50) {  // in steps, as an engine writes
    b.cache->Write(b.seq, 0, p, 50, b.k.data() + p * kKv * kD, b.v.data() + p * kKv * kD);
    b.seq.length = p + 50;
  }
  return b;
}

TEST(PageSelectionTest, SkippedBlocksAreLeftOutExactly) {
  const uint64_t seed = testing::TestSeed();
  SCOPED_TRACE(::testing::Message() << "QUANTKV_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  Bed b = Make(rng, "fp16,block=32,sink=4,window=16");
  kernels::KvLayerView view = b.cache->View(b.seq, 0, kN);
  ASSERT_EQ(view.n_blocks, kN / kBt);
  std::vector<uint8_t> skip(kKv * view.n_blocks, 0);
  skip[0 * view.n_blocks + 0] = 1;  // head 0 skips blocks 0 (past its sinks), 3 and 8
  skip[0 * view.n_blocks + 3] = 1;
  skip[0 * view.n_blocks + 8] = 1;  // (its last 4 tokens are in the window: still read)
  skip[1 * view.n_blocks + 5] = 1;  // head 1 skips block 5
  view.skip_blocks = skip.data();
  const std::vector<float> q = testing::RandomFloats(rng, kHeads * kD);
  const int32_t pos = kN - 1;
  const float scale = 1.0f / 8;
  for (bool fused : {false, true}) {
    SCOPED_TRACE(fused ? "fused decode" : "tiled");
    kernels::AttentionQuery aq;
    aq.q = q.data();
    aq.n_q = 1;
    aq.n_heads = kHeads;
    aq.positions = &pos;
    aq.scale = scale;
    aq.fused_decode = fused;
    std::vector<float> out(kHeads * kD);
    kernels::Attention(aq, view, out.data(), nullptr);
    const int64_t ring = kernels::RingStart(view, pos);
    for (int64_t h = 0; h < kHeads; ++h) {
      const int64_t g = h / (kHeads / kKv);
      std::vector<double> w(kN, -INFINITY);
      double mx = -INFINITY;
      for (int64_t t = 0; t < kN; ++t) {
        const bool skipped = t >= 4 && t < ring && skip[g * view.n_blocks + t / kBt];
        EXPECT_EQ(kernels::SkipsToken(view, g, pos, t), skipped);
        if (skipped) continue;
        double s = 0;
        for (int64_t c = 0; c < kD; ++c) s += double(q[h * kD + c]) * b.k[(t * kKv + g) * kD + c];
        w[t] = s * scale;
        mx = std::max(mx, w[t]);
      }
      double sum = 0;
      std::vector<double> o(kD, 0.0);
      for (int64_t t = 0; t < kN; ++t) {
        if (w[t] == -INFINITY) continue;
        const double e = std::exp(w[t] - mx);
        sum += e;
        for (int64_t c = 0; c < kD; ++c) o[c] += e * b.v[(t * kKv + g) * kD + c];
      }
      for (int64_t c = 0; c < kD; ++c)
        EXPECT_NEAR(out[h * kD + c], o[c] / sum, 2e-5) << h << " " << c;
    }
  }
}

TEST(PageSelectionTest, SelectPagesKeepsTheBlockAQueryPointsAtAndBoundsItsScores) {
  const uint64_t seed = testing::TestSeed();
  SCOPED_TRACE(::testing::Message() << "QUANTKV_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  std::vector<float> q = testing::RandomFloats(rng, kHeads * kD);
  Bed b = Make(rng, "int4:g64:asym,block=32");
  // Plant, in block 6 of KV head 1, a key 10x along its group's queries.
  // (Rewrite the sequence with the planted key.)
  {
    const int64_t t = 6 * kBt + 7, g = 1;
    for (int64_t c = 0; c < kD; ++c) {
      float s = 0;
      for (int64_t j = 0; j < kHeads / kKv; ++j) s += q[(g * (kHeads / kKv) + j) * kD + c];
      b.k[(t * kKv + g) * kD + c] = kernels::Fp16ToFp32(kernels::Fp32ToFp16(10 * s));
    }
    b.cache->Free(b.seq);
    EXPECT_TRUE(b.cache->Reserve(b.seq, kN).ok());
    for (int64_t p = 0; p < kN; p += 50) {
      b.cache->Write(b.seq, 0, p, 50, b.k.data() + p * kKv * kD, b.v.data() + p * kKv * kD);
      b.seq.length = p + 50;
    }
  }
  std::vector<uint8_t> skip;
  EXPECT_FALSE(b.cache->SelectPages(b.seq, 0, kN, q.data(), 1, kHeads, 1.0, 1, &skip))
      << "fraction 1 skips nothing";
  ASSERT_TRUE(b.cache->SelectPages(b.seq, 0, kN, q.data(), 1, kHeads, 0.1, 1, &skip));
  const int64_t nb = kN / kBt;
  ASSERT_EQ(skip.size(), static_cast<size_t>(kKv * nb));
  EXPECT_EQ(skip[1 * nb + 6], 0) << "the planted block is kept";
  for (int64_t g = 0; g < kKv; ++g) {
    EXPECT_EQ(std::count(skip.begin() + g * nb, skip.begin() + (g + 1) * nb, 0), 1);
  }
  // Too few blocks to skip any: min_blocks covers them all.
  EXPECT_FALSE(b.cache->SelectPages(b.seq, 0, kN, q.data(), 1, kHeads, 0.1, nb, &skip));
  // A cache without summaries never selects.
  KvCacheConfig c;
  c.n_layers = 1;
  c.n_kv_heads = kKv;
  c.head_dim = kD;
  c.policy = *ParseKvPolicy("int4,block=32");
  c.max_bytes = 4 << 20;
  auto plain = KvCache::Create(c);
  ASSERT_TRUE(plain.ok());
  EXPECT_FALSE((*plain)->SelectPages(b.seq, 0, kN, q.data(), 1, kHeads, 0.1, 1, &skip));
  EXPECT_LT((*plain)->block_bytes_all_layers(), b.cache->block_bytes_all_layers())
      << "summaries are counted in the block's bytes";
}

}  // namespace
}  // namespace quantkv
