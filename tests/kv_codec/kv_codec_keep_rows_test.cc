// Promoted token rows (":keepN"): kept rows decode exactly, the lowest-priority kept row
// gives way to a higher one, the rest decodes as the inner codec; the spec round-trips and
// bad uses are refused. And through the cache: a promoted token reads back exactly in the
// attention view.
#include <cmath>
#include <random>

#include "gtest/gtest.h"
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

}  // namespace
}  // namespace quantkv
