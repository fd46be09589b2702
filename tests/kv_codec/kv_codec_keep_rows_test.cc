// Promoted token rows (":keepN"): kept rows decode exactly, the lowest-priority kept row
// gives way to a higher one, the rest decodes as the inner codec; the spec round-trips and
// bad uses are refused. And through the cache: a promoted token reads back exactly in the
// attention view.
#include <algorithm>
#include <cmath>
#include <random>

#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "kernels/cpu/attention_tile.h"
#include "kernels/fp16.h"
#include "kernels/kv_codec.h"
#include "runtime/kv/kv_cache.h"
#include "tests/testutil/test_seed.h"

namespace quantkv {
namespace {

using kernels::KvCodec;
using kernels::ParseKvCodecSpec;

std::vector<float> Random(std::mt19937_64& rng, size_t n) {
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

float Fp16(float x) { return kernels::Fp16ToFp32(kernels::Fp32ToFp16(x)); }

TEST(KvCodecKeepRowsTest, KeptRowsDecodeExactlyByPriority) {
  const uint64_t seed = testing::TestSeed();
  SCOPED_TRACE(::testing::Message() << "QUANTKV_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  const int64_t d = 64, bt = 32;
  auto inner = KvCodec::Create(*ParseKvCodecSpec("int2:g64:asym"), d, bt);
  auto spec = ParseKvCodecSpec("int2:g64:asym:keep2");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->keep_rows, 2);
  EXPECT_EQ(spec->ToString(), "int2:g64:asym:keep2");
  auto keep = KvCodec::Create(*spec, d, bt);
  ASSERT_TRUE(inner.ok() && keep.ok()) << keep.status();
  EXPECT_EQ((*keep)->slab_bytes(), (*inner)->slab_bytes() + 2 * (2 + 4 + 2 * d));
  const std::vector<float> x = Random(rng, bt * d);
  std::vector<uint8_t> a((*inner)->slab_bytes()), b((*keep)->slab_bytes());
  (*inner)->Encode(x.data(), a.data());
  (*keep)->Encode(x.data(), b.data());
  std::vector<float> da(bt * d), db(bt * d);
  (*inner)->Decode(a.data(), 0, bt, da.data());
  (*keep)->Decode(b.data(), 0, bt, db.data());
  EXPECT_EQ(da, db) << "with no row kept it is the inner codec";
  // Rows 3 and 7 at priorities 1 and 2; row 9 at 0.5 is refused, at 1.5 replaces row 3.
  EXPECT_TRUE((*keep)->KeepRow(b.data(), 3, x.data() + 3 * d, 1.0f));
  EXPECT_TRUE((*keep)->KeepRow(b.data(), 7, x.data() + 7 * d, 2.0f));
  EXPECT_FALSE((*keep)->KeepRow(b.data(), 9, x.data() + 9 * d, 0.5f));
  EXPECT_TRUE((*keep)->KeepRow(b.data(), 7, x.data() + 7 * d, 0.1f)) << "kept already";
  (*keep)->Decode(b.data(), 0, bt, db.data());
  for (int64_t t : {3, 7}) {
    for (int64_t c = 0; c < d; ++c) EXPECT_EQ(db[t * d + c], Fp16(x[t * d + c]));
  }
  for (int64_t c = 0; c < d; ++c) EXPECT_EQ(db[9 * d + c], da[9 * d + c]);
  EXPECT_TRUE((*keep)->KeepRow(b.data(), 9, x.data() + 9 * d, 1.5f));
  (*keep)->Decode(b.data(), 0, bt, db.data());
  for (int64_t c = 0; c < d; ++c) {
    EXPECT_EQ(db[9 * d + c], Fp16(x[9 * d + c]));
    EXPECT_EQ(db[3 * d + c], da[3 * d + c]) << "row 3 gave way";
    EXPECT_EQ(db[7 * d + c], Fp16(x[7 * d + c])) << "row 7 (priority 2) stays";
  }
  // A partial decode sees only its own kept rows.
  std::vector<float> part(4 * d);
  (*keep)->Decode(b.data(), 6, 10, part.data());
  for (int64_t c = 0; c < d; ++c) {
    EXPECT_EQ(part[1 * d + c], Fp16(x[7 * d + c]));
    EXPECT_EQ(part[3 * d + c], Fp16(x[9 * d + c]));
  }
  EXPECT_FALSE((*keep)->KeepRow(b.data(), bt, x.data(), 9.0f)) << "outside the block";
  EXPECT_FALSE((*inner)->KeepRow(a.data(), 3, x.data(), 9.0f)) << "no slots";
}

TEST(KvCodecKeepRowsTest, BadKeepSpecsAreRefused) {
  for (const char* bad :
       {"fp16:keep2", "int4:keep0", "int4:keep33", "int4:keep2:keep2", "q4_0:keep2"}) {
    absl::StatusOr<kernels::KvCodecSpec> s = ParseKvCodecSpec(bad);
    if (s.ok()) {
      EXPECT_FALSE(KvCodec::Create(*s, 64, 32).ok()) << bad;
    } else {
      EXPECT_FALSE(s.status().message().empty()) << bad;
    }
  }
  auto s = ParseKvCodecSpec("int4:keep32");
  ASSERT_TRUE(s.ok());
  auto c = KvCodec::Create(*s, 64, 32);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("fewer kept rows than the 32 tokens"), std::string::npos)
      << c.status();
  EXPECT_TRUE(KvCodec::Create(*ParseKvCodecSpec("nl3:g64:sym:nf:keep4"), 64, 32).ok());
  EXPECT_TRUE(KvCodec::Create(*ParseKvCodecSpec("int2:chan:keep4"), 64, 32).ok());
}

TEST(KvCodecKeepRowsTest, PromotedTokenReadsBackExactlyThroughTheCache) {
  const uint64_t seed = testing::TestSeed();
  SCOPED_TRACE(::testing::Message() << "QUANTKV_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  KvCacheConfig kc;
  kc.n_layers = 2;
  kc.n_kv_heads = 2;
  kc.head_dim = 64;
  kc.max_bytes = 8 << 20;
  kc.max_step_tokens = 64;
  auto policy = ParseKvPolicy("k=int2:chan:keep3,v=int2:g64:asym:keep3,block=32", 2, 2);
  ASSERT_TRUE(policy.ok()) << policy.status();
  kc.policy = *policy;
  auto cache = KvCache::Create(kc);
  ASSERT_TRUE(cache.ok()) << cache.status();
  ASSERT_TRUE((*cache)->promotes());
  SequenceKv seq;
  const int64_t n = 40, row = 2 * 64;
  ASSERT_TRUE((*cache)->Reserve(seq, n).ok());
  const std::vector<float> k = Random(rng, n * row), v = Random(rng, n * row);
  for (int64_t l = 0; l < 2; ++l) (*cache)->Write(seq, l, 0, n, k.data(), v.data());
  seq.length = n;
  EXPECT_EQ((*cache)->PromoteRow(seq, 1, 5, 1.0f), 4) << "2 heads x K, V";
  EXPECT_EQ((*cache)->PromoteRow(seq, 1, 35, 1.0f), 0) << "its block is not encoded yet";
  const kernels::KvLayerView view = (*cache)->View(seq, 1, n);
  for (int kv = 0; kv < 2; ++kv) {
    const kernels::KvSlabs& slabs = kv == 0 ? view.k : view.v;
    const std::vector<float>& src = kv == 0 ? k : v;
    for (int64_t h = 0; h < 2; ++h) {
      std::vector<float> out(32 * 64);
      slabs.codecs[h]->Decode(
          slabs.base + view.block_table[0] * slabs.block_bytes + slabs.slab_offsets[h], 0, 32,
          out.data());
      for (int64_t c = 0; c < 64; ++c) {
        EXPECT_EQ(out[5 * 64 + c], Fp16(src[5 * row + h * 64 + c])) << kv << " head " << h;
      }
      double err = 0;  // a token not promoted keeps its int2 error
      for (int64_t c = 0; c < 64; ++c)
        err += std::fabs(out[6 * 64 + c] - src[6 * row + h * 64 + c]);
      EXPECT_GT(err, 1e-2);
    }
  }
}

TEST(KvCodecKeepRowsTest, DropSpecsParseAndRefuseWhatTheyCannotBe) {
  auto s = ParseKvCodecSpec("drop:keep8");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->ToString(), "drop:keep8");
  auto c = KvCodec::Create(*s, 64, 128);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE((*c)->drops_rows());
  EXPECT_EQ((*c)->slab_bytes(), 8 * (2 + 4 + 2 * 64)) << "only the kept rows";
  for (const char* bad : {"drop", "drop:g32", "drop:keep0", "drop:keep8:sym", "drop:keep99"}) {
    absl::StatusOr<kernels::KvCodecSpec> b = ParseKvCodecSpec(bad);
    ASSERT_FALSE(b.ok()) << bad;
    EXPECT_NE(b.status().message().find("keepN"), std::string::npos) << b.status();
  }
  KvCacheConfig kc;
  kc.n_layers = 1;
  kc.n_kv_heads = 1;
  kc.head_dim = 64;
  kc.max_bytes = 1 << 20;
  kc.max_step_tokens = 64;
  for (const char* bad :
       {"k=drop:keep4,v=int2:keep4,block=32", "k=drop:keep4,v=drop:keep2,block=32"}) {
    auto policy = ParseKvPolicy(bad, 1, 1);
    ASSERT_TRUE(policy.ok()) << policy.status();
    kc.policy = *policy;
    auto cache = KvCache::Create(kc);
    ASSERT_FALSE(cache.ok()) << bad;
    EXPECT_NE(cache.status().message().find("same N"), std::string::npos) << cache.status();
  }
}

// drop:keepN through the cache and attention: a query attends to the sinks, the ring and the
// promoted rows only, on the tiled path and (forced off it) with fused decode asked for, in
// a prefill chunk and at decode; against float64 over exactly those tokens.
TEST(KvCodecKeepRowsTest, EvictedTokensAreNotAttended) {
  const uint64_t seed = testing::TestSeed();
  SCOPED_TRACE(::testing::Message() << "QUANTKV_TEST_SEED=" << seed);
  std::mt19937_64 rng(seed);
  const int64_t d = 64, n_kv = 2, n_heads = 6, n = 100, row = n_kv * d;
  KvCacheConfig kc;
  kc.n_layers = 1;
  kc.n_kv_heads = n_kv;
  kc.head_dim = d;
  kc.max_bytes = 8 << 20;
  kc.max_step_tokens = 128;
  auto policy = ParseKvPolicy("k=drop:keep3,v=drop:keep3,sink=2,window=4,block=32", 1, n_kv);
  ASSERT_TRUE(policy.ok()) << policy.status();
  kc.policy = *policy;
  auto cache = KvCache::Create(kc);
  ASSERT_TRUE(cache.ok()) << cache.status();
  SequenceKv seq;
  ASSERT_TRUE((*cache)->Reserve(seq, n).ok());
  const std::vector<float> k = Random(rng, n * row), v = Random(rng, n * row);
  (*cache)->Write(seq, 0, 0, n, k.data(), v.data());
  seq.length = n;
  // Blocks 0..2 are encoded (96 tokens); keep 3 rows in block 0, 1 in block 2, none in 1.
  const std::vector<int64_t> promoted = {5, 9, 30, 70};
  for (int64_t t : promoted) ASSERT_EQ((*cache)->PromoteRow(seq, 0, t, 1.0f), 2 * n_kv) << t;
  const kernels::KvLayerView view = (*cache)->View(seq, 0, n);
  // What each query at position p sees: sinks, promoted rows, its ring (RingStart on).
  auto attended = [&](int64_t t, int64_t p) {
    return t < 2 || t >= kernels::RingStart(view, p) ||
           std::find(promoted.begin(), promoted.end(), t) != promoted.end();
  };
  const int64_t n_q = 5;  // positions 95..99: the last of block 2 and the tail
  const std::vector<float> q = Random(rng, n_q * n_heads * d);
  std::vector<int32_t> pos(n_q);
  for (int64_t i = 0; i < n_q; ++i) pos[i] = static_cast<int32_t>(n - n_q + i);
  const float scale = 0.125f;
  for (int mode = 0; mode < 3; ++mode) {
    // 0: tiled path (vector kernel where the CPU has it), 1: fused decode asked for (drop
    // must keep it tiled), 2: the tiled path's scalar loop.
    const bool fused = mode == 1;
    kernels::attention_internal::SetTileKernelEnabledForTesting(mode != 2);
    for (int64_t first : {int64_t{0}, n_q - 1}) {  // the chunk, then the last query alone
      kernels::AttentionQuery aq;
      aq.q = q.data() + first * n_heads * d;
      aq.n_q = n_q - first;
      aq.n_heads = n_heads;
      aq.positions = pos.data() + first;
      aq.scale = scale;
      aq.fused_decode = fused;
      std::vector<float> out(aq.n_q * n_heads * d);
      kernels::Attention(aq, view, out.data(), nullptr);
      for (int64_t i = 0; i < aq.n_q; ++i) {
        const int64_t p = aq.positions[i];
        for (int64_t h = 0; h < n_heads; ++h) {
          const int64_t g = h / (n_heads / n_kv);
          const float* qh = aq.q + (i * n_heads + h) * d;
          auto reference = [&](bool only_attended) {
            std::vector<double> sc(p + 1, -INFINITY), o(d, 0.0);
            double mx = -INFINITY, sum = 0;
            for (int64_t t = 0; t <= p; ++t) {
              if (only_attended && !attended(t, p)) continue;
              double dot = 0;
              for (int64_t c = 0; c < d; ++c) dot += qh[c] * Fp16(k[t * row + g * d + c]);
              sc[t] = scale * dot;
              mx = std::max(mx, sc[t]);
            }
            for (int64_t t = 0; t <= p; ++t) {
              if (sc[t] == -INFINITY) continue;
              const double w = std::exp(sc[t] - mx);
              sum += w;
              for (int64_t c = 0; c < d; ++c) o[c] += w * Fp16(v[t * row + g * d + c]);
            }
            for (double& x : o) x /= sum;
            return o;
          };
          const std::vector<double> want = reference(true), all = reference(false);
          double err = 0, gap = 0;
          for (int64_t c = 0; c < d; ++c) {
            err = std::max(err, std::fabs(out[(i * n_heads + h) * d + c] - want[c]));
            gap = std::max(gap, std::fabs(all[c] - want[c]));
          }
          EXPECT_LT(err, 1e-5) << "mode " << mode << " p " << p << " head " << h;
          EXPECT_GT(gap, 1e-3) << "evicting must matter for the check to mean anything";
        }
      }
    }
  }
  kernels::attention_internal::SetTileKernelEnabledForTesting(true);
}

}  // namespace
}  // namespace quantkv
