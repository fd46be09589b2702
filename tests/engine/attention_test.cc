// Attention over the quantized paged cache against a float64 softmax(qKᵀ)V computed on
// the values each query is meant to see: full precision (fp16-rounded) for sinks, the
// window and blocks not yet full at its position; the codec's reconstruction otherwise.
// Covers every codec family, GQA ratios, protection and lengths off the block grid.
#include "kernels/attention.h"

#include <algorithm>
#include <cmath>

#include "gtest/gtest.h"
#include "kernels/cpu/attention_tile.h"
#include "runtime/kv/kv_cache.h"
#include "tests/engine/test_cache.h"
#include "tests/engine/test_random.h"

namespace quantkv {
namespace {

struct Case {
  std::string spec;
  int64_t n_heads, n_kv;
  int64_t n_ctx, n_q;  // the last n_q tokens are one step (prefill chunk or decode)
};

std::string Name(const ::testing::TestParamInfo<Case>& info) {
  std::string s = info.param.spec + "_h" + std::to_string(info.param.n_heads) + "kv" +
                  std::to_string(info.param.n_kv) + "_n" + std::to_string(info.param.n_ctx) + "q" +
                  std::to_string(info.param.n_q);
  for (char& c : s) {
    if (!isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return s;
}

class AttentionTest : public ::testing::TestWithParam<Case> {};

TEST_P(AttentionTest, MatchesFloat64OnWhatEachQuerySees) {
  const Case c = GetParam();
  const uint64_t seed = testing::TestSeed();
  SCOPED_TRACE(::testing::Message() << "QUANTKV_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  const int64_t d = 64;
  auto policy = ParseKvPolicy(c.spec);
  ASSERT_TRUE(policy.ok()) << policy.status();
  KvCacheConfig cfg;
  cfg.n_layers = 1;
  cfg.n_kv_heads = c.n_kv;
  cfg.head_dim = d;
  cfg.policy = *policy;
  // Room for the longest case (100k tokens even in fp32), else 64 MiB.
  cfg.max_bytes = std::max<int64_t>(int64_t{64} << 20, c.n_ctx * c.n_kv * d * 2 * 4 + (16 << 20));
  cfg.max_step_tokens = std::max<int64_t>(c.n_q, 64);
  auto cache = KvCache::Create(cfg);
  ASSERT_TRUE(cache.ok()) << cache.status();
  const int64_t bt = policy->block_tokens, S = policy->sink_tokens, W = policy->window_tokens;

  // Occupy some blocks first so the sequence's physical blocks are scattered.
  SequenceKv other, seq;
  ASSERT_TRUE((*cache)->Reserve(other, 2 * bt + 1).ok());
  const int64_t row = c.n_kv * d;
  std::vector<float> k = testing::RandomFloats(rng, c.n_ctx * row);
  std::vector<float> v = testing::RandomFloats(rng, c.n_ctx * row);
  for (int64_t ch = 0; ch < d; ch += 17) {  // outlier channels in K, as real keys have
    for (int64_t t = 0; t < c.n_ctx; ++t) k[t * row + ch] *= 8.0f;
  }
  // Earlier tokens in steps of at most max_step_tokens, then the query step.
  int64_t pos = 0;
  auto write = [&](int64_t n) {
    ASSERT_TRUE((*cache)->Reserve(seq, pos + n).ok());
    (*cache)->Write(seq, 0, pos, n, k.data() + pos * row, v.data() + pos * row);
    pos += n;
    seq.length = pos;
  };
  while (pos < c.n_ctx - c.n_q) write(std::min(cfg.max_step_tokens, c.n_ctx - c.n_q - pos));
  write(c.n_q);

  // Reference values: fp16 rounding (protected storage) or the codec's reconstruction of
  // the block encoded from those fp16 values.
  auto fp16 = [&](std::vector<float> x) {
    if (!policy->protected_fp32()) {
      for (float& f : x) f = kernels::Fp16ToFp32(kernels::Fp32ToFp16(f));
    }
    return x;
  };
  const std::vector<float> k16 = fp16(k), v16 = fp16(v);
  auto reconstruct = [&](const std::vector<float>& x16, const kernels::KvCodecSpec& spec) {
    auto codec = kernels::KvCodec::Create(spec, d, bt);
    EXPECT_TRUE(codec.ok());
    std::vector<float> out = x16, block(bt * d), dec(bt * d);
    std::vector<uint8_t> slab((*codec)->slab_bytes());
    for (int64_t b = 0; (b + 1) * bt <= c.n_ctx; ++b) {
      for (int64_t h = 0; h < c.n_kv; ++h) {
        for (int64_t t = 0; t < bt; ++t) {
          std::copy_n(x16.begin() + (b * bt + t) * row + h * d, d, block.begin() + t * d);
        }
        (*codec)->Encode(block.data(), slab.data());
        (*codec)->Decode(slab.data(), 0, bt, dec.data());
        for (int64_t t = 0; t < bt; ++t) {
          std::copy_n(dec.begin() + t * d, d, out.begin() + (b * bt + t) * row + h * d);
        }
      }
    }
    return out;
  };
  const std::vector<float> kq = reconstruct(k16, policy->all.k),
                           vq = reconstruct(v16, policy->all.v);

  std::vector<float> q = testing::RandomFloats(rng, c.n_q * c.n_heads * d, 0.3f);
  std::vector<int32_t> positions(c.n_q);
  for (int64_t i = 0; i < c.n_q; ++i) positions[i] = static_cast<int32_t>(c.n_ctx - c.n_q + i);
  std::vector<float> out(c.n_q * c.n_heads * d);
  kernels::ThreadPool pool(2);
  const float scale = 1.0f / 8.0f;
  kernels::Attention({q.data(), c.n_q, c.n_heads, positions.data(), scale},
                     (*cache)->View(seq, 0, c.n_ctx), out.data(), &pool);

  double err = 0, norm = 0;
  for (int64_t i = 0; i < c.n_q; ++i) {
    const int64_t p = positions[i];
    for (int64_t h = 0; h < c.n_heads; ++h) {
      const int64_t g = h / (c.n_heads / c.n_kv);
      // Full precision for: sinks, tokens whose block was not full at p, the last W tokens.
      auto exact = [&](int64_t t) { return t < S || (t / bt + 1) * bt > p + 1 || t > p - W; };
      std::vector<double> s(p + 1);
      for (int64_t t = 0; t <= p; ++t) {
        const std::vector<float>& kk = exact(t) ? k16 : kq;
        double dot = 0;
        for (int64_t e = 0; e < d; ++e)
          dot += double(q[(i * c.n_heads + h) * d + e]) * kk[t * row + g * d + e];
        s[t] = dot * scale;
      }
      const double mx = *std::max_element(s.begin(), s.end());
      double z = 0;
      for (double& x : s) z += (x = std::exp(x - mx));
      for (int64_t e = 0; e < d; ++e) {
        double o = 0;
        for (int64_t t = 0; t <= p; ++t) o += s[t] / z * (exact(t) ? v16 : vq)[t * row + g * d + e];
        const double got = out[(i * c.n_heads + h) * d + e];
        err += (got - o) * (got - o);
        norm += o * o;
      }
    }
  }
  EXPECT_LE(std::sqrt(err / norm), 2e-5);
}

INSTANTIATE_TEST_SUITE_P(
    Codecs, AttentionTest,
    ::testing::Values(
        Case{"fp32", 6, 2, 77, 1}, Case{"fp16", 6, 2, 130, 1}, Case{"fp32", 6, 2, 40, 40},
        Case{"fp16,block=16", 9, 3, 90, 25}, Case{"bf16", 4, 4, 33, 1}, Case{"int8", 6, 2, 31, 31},
        Case{"int8,block=16", 8, 1, 1000, 1}, Case{"int4", 6, 2, 33, 1},
        Case{"int4:g32:sym", 6, 2, 1000, 64}, Case{"k=int4:chan,v=int4:g32", 6, 2, 257, 1},
        Case{"k=int4:chan,v=int4,sink=4,window=16,block=64", 9, 3, 1000, 1},
        Case{"k=int4:chan,v=int4,sink=4,window=16,block=64", 9, 3, 300, 100},
        Case{"int3,sink=3,window=5,block=16", 6, 2, 101, 40}, Case{"int2,window=32", 6, 2, 200, 1},
        Case{"k=int2:chan,v=int2:g32:sym", 6, 2, 4097, 1}, Case{"fp8", 6, 2, 65, 1},
        Case{"fp8,sink=1", 6, 2, 1, 1}, Case{"int2:g64:out1,window=8", 6, 2, 300, 1},
        Case{"k=int4:block,v=int2:out2", 9, 3, 200, 50},
        // Sequence splits (flash-decoding): one KV head, long context, 4 splits merged.
        Case{"int4,sink=4,window=40", 8, 1, 4097, 1}, Case{"fp16", 8, 1, 3000, 3}),
    Name);

// Decode (n_q <= 4): the kernels that read uniform codes directly (int8/int4/int2 per token
// group), lengths on and off the 16-token and block grids, GQA ratios 1, 3, 4 and 8 (two
// passes of query rows), codecs the value kernel leaves to the tile path (int4/int2 with
// small groups), mixed K/V codecs, blocks that are not a multiple of 16 tokens, and several
// decode queries per call.
INSTANTIATE_TEST_SUITE_P(
    Decode, AttentionTest,
    ::testing::Values(
        Case{"int4", 9, 3, 1, 1}, Case{"int4", 9, 3, 31, 1}, Case{"int4", 9, 3, 33, 1},
        Case{"int4", 9, 3, 1000, 1}, Case{"int4", 9, 3, 4097, 1}, Case{"int4:sym", 4, 4, 1000, 1},
        Case{"int8", 4, 4, 1000, 1}, Case{"int8:g16:sym", 8, 2, 33, 1},
        Case{"int8:g32", 9, 3, 4097, 1}, Case{"int2", 9, 3, 4097, 1},
        Case{"int2:g16", 6, 2, 1000, 1}, Case{"int2:sym", 8, 2, 31, 1},
        Case{"int4:g32:sym", 16, 2, 1000, 1}, Case{"int4:g16", 9, 3, 257, 1},
        Case{"int4,block=24", 6, 2, 1000, 1}, Case{"int8,block=16,sink=3,window=20", 9, 3, 31, 1},
        Case{"int4,sink=4,window=40", 9, 3, 1000, 4}, Case{"int2,window=8", 8, 2, 300, 2},
        Case{"fp16", 9, 3, 4097, 1}, Case{"k=int4,v=fp16", 6, 2, 1000, 1},
        Case{"k=fp16,v=int8:g64:sym", 6, 2, 1000, 1}, Case{"k=int4:chan,v=int2", 9, 3, 700, 1},
        Case{"fp32,sink=2,window=9", 12, 3, 500, 1}),
    Name);

// 100k-token caches (the long-context issue): decode over ~1,560 blocks with sequence
// splits, per-channel and per-token codecs and fp16, against the same float64 reference.
INSTANTIATE_TEST_SUITE_P(LongContext, AttentionTest,
                         ::testing::Values(Case{"int4-comp", 9, 3, 100000, 1},
                                           Case{"int2", 9, 3, 100000, 1},
                                           Case{"fp16", 9, 3, 100003, 2}),
                         Name);

// The engine attends decode rows of many sequences side by side, each call without the
// pool but with split_threads = the pool's size: that must give bit for bit what the call
// on the pool gives, including the sequence splits of a long context.
TEST(AttentionSplitTest, SerialCallWithSplitThreadsEqualsPooledCall) {
  std::mt19937_64 rng(testing::TestSeed());
  const int64_t d = 64, n_kv = 3, n_heads = 9, n_ctx = 3000;
  const std::vector<float> k = testing::RandomFloats(rng, n_ctx * n_kv * d);
  const std::vector<float> v = testing::RandomFloats(rng, n_ctx * n_kv * d);
  const std::vector<float> q = testing::RandomFloats(rng, n_heads * d);
  kernels::ThreadPool pool(2);
  for (const char* spec : {"fp16", "int4-comp"}) {
    testing::CacheAttention c{.spec = spec, .n_kv_heads = n_kv, .head_dim = d, .n_heads = n_heads};
    c.pool = &pool;
    const std::vector<float> pooled = testing::AttendThroughCache(c, k, v, q, 1);
    c.pool = nullptr;
    c.split_threads = 2;
    EXPECT_EQ(testing::AttendThroughCache(c, k, v, q, 1), pooled) << spec;
    // Without it a serial call does not split 3000 tokens: the merge order differs, which is
    // what the check above guards against.
    c.split_threads = 0;
    EXPECT_NE(testing::AttendThroughCache(c, k, v, q, 1), pooled) << spec;
  }
}

// The tiled path's vectorized kernel (kernels/cpu/attention_tile.cc) against its scalar
// loop on the same cache: prefill chunks that cross tiles, blocks and the sink/ring
// boundaries, decode rows, page selection. They differ only in summation order and the exp
// polynomial, so within a few fp32 ulps of the output scale; and each row's result must not
// depend on the other queries of its call (bit-invariant batching).
TEST(AttentionTileKernelTest, VectorKernelMatchesScalarLoop) {
  if (!kernels::attention_internal::TileKernelUsable(64)) {
    GTEST_SKIP() << "no AVX-512 on this CPU (or QUANTKV_ISA caps it): the scalar loop runs";
  }
  std::mt19937_64 rng(testing::TestSeed());
  const int64_t d = 64, n_kv = 3, n_heads = 9, n_ctx = 700;
  const std::vector<float> k = testing::RandomFloats(rng, n_ctx * n_kv * d);
  const std::vector<float> v = testing::RandomFloats(rng, n_ctx * n_kv * d);
  const std::vector<float> q = testing::RandomFloats(rng, 100 * n_heads * d);
  for (const char* spec :
       {"fp16", "int4", "int4-comp", "int2-comp", "k=int4:chan,v=int2,sink=3,window=70,block=32"}) {
    for (int64_t n_q : {1, 3, 37, 100}) {
      testing::CacheAttention c{
          .spec = spec, .n_kv_heads = n_kv, .head_dim = d, .n_heads = n_heads};
      c.fused_decode = false;
      const std::vector<float> fast = testing::AttendThroughCache(c, k, v, q, n_q);
      kernels::attention_internal::SetTileKernelEnabledForTesting(false);
      const std::vector<float> slow = testing::AttendThroughCache(c, k, v, q, n_q);
      kernels::attention_internal::SetTileKernelEnabledForTesting(true);
      ASSERT_EQ(fast.size(), slow.size());
      double max_abs = 0, max_diff = 0;
      for (size_t i = 0; i < fast.size(); ++i) {
        max_abs = std::max(max_abs, std::fabs(static_cast<double>(slow[i])));
        max_diff = std::max(max_diff, std::fabs(static_cast<double>(fast[i]) - slow[i]));
      }
      EXPECT_LT(max_diff, 2e-6 * max_abs) << spec << " n_q " << n_q;
      EXPECT_GT(max_abs, 0.0);
      if (n_q == 100) {
        // The last query alone gives the bits it got among 100.
        const std::vector<float> last(q.begin() + 99 * n_heads * d, q.begin() + 100 * n_heads * d);
        // Alone it is a decode row at the same position (a 1-query call at the end).
        const std::vector<float> alone = testing::AttendThroughCache(c, k, v, last, 1);
        const std::vector<float> among(fast.end() - n_heads * d, fast.end());
        EXPECT_EQ(alone, among) << spec;
      }
    }
  }
}

}  // namespace
}  // namespace quantkv
