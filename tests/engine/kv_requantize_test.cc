// Elastic precision under memory pressure (KvCacheConfig::floor, KvCache::Requantize): the
// oldest blocks of a sequence re-encoded 4 -> 2 bits in pairs free one block per pair, and
// attention over the mixed cache (tiled and fused decode kernels) equals float64 over what
// the codecs make of the rows: floor(primary(x)) for requantized blocks, primary(x) for the
// others, x for sinks and the window.
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "kernels/dequantize.h"
#include "runtime/kv/kv_cache.h"
#include "tests/engine/test_cache.h"
#include "tests/testutil/test_seed.h"

namespace quantkv {
namespace {

constexpr int64_t kKvHeads = 3, kHeads = 9, kDim = 64, kBlock = 128;
constexpr char kPrimary[] = "int4-comp";
constexpr char kFloor[] = "k=int2:chan:clip0.7,v=int2:chan:sym,sink=4,window=8,block=128";

std::vector<float> Fp16Rounded(std::vector<float> x) {
  std::vector<uint16_t> h(x.size());
  kernels::Fp32ToFp16Row(x.data(), h.data(), static_cast<int64_t>(x.size()));
  kernels::Fp16ToFp32Row(h.data(), x.data(), static_cast<int64_t>(x.size()));
  return x;
}

KvCacheConfig Config(const char* floor) {
  KvCacheConfig cfg;
  cfg.n_layers = 1;
  cfg.n_kv_heads = kKvHeads;
  cfg.head_dim = kDim;
  cfg.policy = *ParseKvPolicy(kPrimary);
  if (floor != nullptr) cfg.floor = *ParseKvPolicy(floor);
  cfg.max_bytes = 4 << 20;
  cfg.max_step_tokens = 64;
  return cfg;
}

// Rows of one block of head h through `specs` in turn (encode, decode), [kBlock][kDim].
std::vector<float> ThroughCodecs(std::vector<float> x,
                                 const std::vector<kernels::KvCodecSpec>& specs) {
  for (const kernels::KvCodecSpec& spec : specs) {
    kernels::KvCodecConfig cc;
    cc.spec = spec;
    cc.head_dim = kDim;
    cc.block_tokens = kBlock;
    auto codec = kernels::KvCodec::Create(cc);
    EXPECT_TRUE(codec.ok()) << codec.status();
    std::vector<uint8_t> slab((*codec)->slab_bytes());
    (*codec)->Encode(x.data(), slab.data());
    (*codec)->Decode(slab.data(), 0, kBlock, x.data());
  }
  return x;
}

TEST(KvRequantizeTest, PairsFreeBlocksAndAttentionReadsTheFloor) {
  std::mt19937 rng(testing::TestSeed());
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t row = kKvHeads * kDim, n_ctx = 5 * kBlock + 40;
  std::vector<float> k(n_ctx * row), v(n_ctx * row), q(32 * kHeads * kDim);
  for (float& x : k) x = nd(rng);
  for (float& x : v) x = nd(rng);
  for (float& x : q) x = nd(rng);
  k = Fp16Rounded(k);
  v = Fp16Rounded(v);

  auto cache = KvCache::Create(Config(kFloor));
  ASSERT_TRUE(cache.ok()) << cache.status();
  ASSERT_TRUE((*cache)->elastic());
  SequenceKv seq;
  testing::WriteInSteps(**cache, seq, k, v, row);
  BlockAllocator& alloc = (*cache)->allocator();
  const int32_t free_before = alloc.num_free();
  const int64_t bytes_before = (*cache)->SequenceBytes(seq);
  EXPECT_EQ((*cache)->RequantizablePairs(seq), 2);  // 5 full blocks: 0-1 and 2-3
  EXPECT_EQ((*cache)->Requantize(seq, 1), 1);
  EXPECT_EQ((*cache)->Requantize(seq, 10), 1) << "only one pair is left";
  EXPECT_EQ((*cache)->Requantize(seq, 1), 0);
  EXPECT_EQ(seq.floor_blocks, 4);
  EXPECT_EQ(alloc.num_free(), free_before + 2);
  EXPECT_EQ((*cache)->SequenceBytes(seq), bytes_before - 2 * (*cache)->block_bytes_all_layers());
  EXPECT_EQ((*cache)->requantized_blocks(), 4);

  // What each token of each KV head should read.
  const KvPolicy primary = *ParseKvPolicy(kPrimary), floor = *ParseKvPolicy(kFloor);
  std::vector<float> want_k = k, want_v = v;
  for (int64_t b = 0; b < 5; ++b) {
    for (int64_t h = 0; h < kKvHeads; ++h) {
      for (int kv = 0; kv < 2; ++kv) {
        std::vector<float>& w = kv == 0 ? want_k : want_v;
        const std::vector<float>& src = kv == 0 ? k : v;
        std::vector<float> x(kBlock * kDim);
        for (int64_t t = 0; t < kBlock; ++t) {
          std::copy_n(src.data() + (b * kBlock + t) * row + h * kDim, kDim, x.data() + t * kDim);
        }
        std::vector<kernels::KvCodecSpec> specs = {kv == 0 ? primary.ForHead(0, h).k
                                                           : primary.ForHead(0, h).v};
        if (b < 4) specs.push_back(kv == 0 ? floor.ForHead(0, h).k : floor.ForHead(0, h).v);
        x = ThroughCodecs(x, specs);
        for (int64_t t = 0; t < kBlock; ++t) {
          std::copy_n(x.data() + t * kDim, kDim, w.data() + (b * kBlock + t) * row + h * kDim);
        }
      }
    }
  }

  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
  for (const int64_t n_q : {int64_t{1}, int64_t{30}}) {
    SCOPED_TRACE(::testing::Message() << n_q << " queries");
    std::vector<int32_t> positions;
    for (int64_t i = 0; i < n_q; ++i) positions.push_back(static_cast<int32_t>(n_ctx - n_q + i));
    const kernels::KvLayerView view = (*cache)->View(seq, 0, n_ctx);
    ASSERT_TRUE(view.has_floor);
    std::vector<float> out(n_q * kHeads * kDim);
    kernels::AttentionQuery aq{q.data(), n_q, kHeads, positions.data(), scale};
    kernels::Attention(aq, view, out.data(), nullptr);
    double max_err = 0, max_ref = 0;
    for (int64_t i = 0; i < n_q; ++i) {
      const int64_t p = positions[i];
      const int64_t ring = kernels::RingStart(view, p);
      for (int64_t hq = 0; hq < kHeads; ++hq) {
        const int64_t g = hq / (kHeads / kKvHeads);
        const float* qi = q.data() + (i * kHeads + hq) * kDim;
        std::vector<double> s(p + 1);
        double mx = -INFINITY;
        for (int64_t t = 0; t <= p; ++t) {
          const bool exact = t < view.sink_tokens || t >= ring;
          const float* kr = (exact ? k : want_k).data() + t * row + g * kDim;
          double dot = 0;
          for (int64_t x = 0; x < kDim; ++x) dot += double(qi[x]) * kr[x];
          s[t] = dot * scale;
          mx = std::max(mx, s[t]);
        }
        double sum = 0;
        std::vector<double> o(kDim, 0.0);
        for (int64_t t = 0; t <= p; ++t) {
          const bool exact = t < view.sink_tokens || t >= ring;
          const float* vr = (exact ? v : want_v).data() + t * row + g * kDim;
          const double w = std::exp(s[t] - mx);
          sum += w;
          for (int64_t x = 0; x < kDim; ++x) o[x] += w * vr[x];
        }
        for (int64_t x = 0; x < kDim; ++x) {
          const double ref = o[x] / sum;
          max_ref = std::max(max_ref, std::abs(ref));
          max_err = std::max(max_err, std::abs(ref - out[(i * kHeads + hq) * kDim + x]));
        }
      }
    }
    // The fused kernel rounds q to int8 pieces and exp differently: its usual bound.
    EXPECT_LT(max_err, 2e-3 * max_ref) << "max |err| " << max_err << " of " << max_ref;
  }

  (*cache)->Free(seq);
  EXPECT_EQ(alloc.num_free(), alloc.num_blocks()) << "a floor pair's block was not returned";
}

TEST(KvRequantizeTest, FloorsThatCannotShareABlockAreRefused) {
  auto too_big = KvCache::Create(Config("int4:g64:asym,sink=4,window=8,block=128"));
  ASSERT_FALSE(too_big.ok());
  EXPECT_NE(too_big.status().message().find("more than half"), std::string::npos)
      << too_big.status();
  auto other_block = KvCache::Create(Config("k=int2:chan:clip0.7,v=int2:chan:sym,block=64"));
  ASSERT_FALSE(other_block.ok());
  EXPECT_NE(other_block.status().message().find("must be those of"), std::string::npos)
      << other_block.status();
  auto plain = KvCache::Create(Config(nullptr));
  ASSERT_TRUE(plain.ok());
  SequenceKv seq;
  EXPECT_EQ((*plain)->RequantizablePairs(seq), 0);
  EXPECT_EQ((*plain)->Requantize(seq, 3), 0);
}

}  // namespace
}  // namespace quantkv
