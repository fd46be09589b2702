// KvCache bookkeeping and accounting, and KvPolicy parsing. No model needed.
#include "runtime/kv/kv_cache.h"

#include <filesystem>
#include <fstream>
#include <utility>

#include "gtest/gtest.h"

namespace quantkv {
namespace {

KvCacheConfig Smol(const std::string& spec, int64_t max_bytes = int64_t{100} << 20) {
  KvCacheConfig c;
  c.n_layers = 30;
  c.n_kv_heads = 3;
  c.head_dim = 64;
  c.policy = *ParseKvPolicy(spec, 30);
  c.max_bytes = max_bytes;
  return c;
}

TEST(KvCacheTest, Fp16AccountingMatchesTheFormula) {
  // SmolLM2: 30 layers x (K+V) x 3 heads x 64 x 2 bytes = 23040 bytes per token.
  auto cache = KvCache::Create(Smol("fp16"));
  ASSERT_TRUE(cache.ok()) << cache.status();
  EXPECT_DOUBLE_EQ((*cache)->BytesPerTokenAt(4096), 23040.0);
  EXPECT_DOUBLE_EQ((*cache)->BitsPerElementAt(1000), 16.0);
  EXPECT_DOUBLE_EQ((*KvCache::Create(Smol("fp32")))->BitsPerElementAt(77), 32.0);
}

TEST(KvCacheTest, QuantizedAccountingCountsMetadataAndProtectedTokens) {
  // int4 g64 asym: 4 bits + fp16 scale and min per 64 values = 4.5 bits.
  auto int4 = KvCache::Create(Smol("int4"));
  ASSERT_TRUE(int4.ok()) << int4.status();
  EXPECT_NEAR((*int4)->BitsPerElementAt(32 * 64), 4.5, 1e-12);
  // A partial tail block stays fp16: 2048 + 16 tokens = 2048 * 4.5 + 16 * 16 bits.
  EXPECT_NEAR((*int4)->BitsPerElementAt(2064), (2048 * 4.5 + 16 * 16.0) / 2064, 1e-12);
  // Sinks and window add their fp16 copies.
  auto prot = KvCache::Create(Smol("int4,sink=4,window=32,block=32"));
  ASSERT_TRUE(prot.ok());
  // 2048 tokens: 64 encoded blocks, 4 sinks + last 32 tokens in fp16.
  EXPECT_NEAR((*prot)->BitsPerElementAt(2048), (2048 * 4.5 + 36 * 16.0) / 2048, 1e-12);
}

// A 100k-token SmolLM2 sequence (the long-context issue's numbers): fp16 2.30 GB, 4-bit
// 0.65 GB, 2-bit 0.36 GB, from codes + per-64 fp16 scale and minimum, and a partial tail
// block in fp16 (none here: 100000 is a multiple of the default 32-token block).
TEST(KvCacheTest, HundredThousandTokenSequenceSizesMatchTheFormula) {
  const int64_t n = 100000, elements_per_token = 30 * 2 * 3 * 64;
  for (const auto& [spec, bits] : {std::pair<const char*, double>{"fp16", 16.0},
                                   {"int4", 4.0 + 32.0 / 64},
                                   {"int2", 2.0 + 32.0 / 64}}) {
    auto cache = KvCache::Create(Smol(spec));
    ASSERT_TRUE(cache.ok()) << cache.status();
    const int64_t tail = n % (*cache)->block_tokens();
    const double expected =
        ((n - tail) * bits + tail * 16.0) / 8 * static_cast<double>(elements_per_token);
    EXPECT_NEAR((*cache)->BytesPerTokenAt(n) * n, expected, 1e-6 * expected) << spec;
  }
  EXPECT_NEAR((*KvCache::Create(Smol("fp16")))->BytesPerTokenAt(n) * n / 1e9, 2.304, 1e-9);
  EXPECT_NEAR((*KvCache::Create(Smol("int4")))->BytesPerTokenAt(n) * n / 1e9, 0.648, 1e-3);
  EXPECT_NEAR((*KvCache::Create(Smol("int2")))->BytesPerTokenAt(n) * n / 1e9, 0.36, 1e-3);
}

TEST(KvCacheTest, ReserveFailsWithoutLeakingBlocks) {
  KvCacheConfig c = Smol("fp16,block=16");
  c.max_bytes = 23040 * 16 * 4;  // exactly 4 blocks
  auto cache = KvCache::Create(c);
  ASSERT_TRUE(cache.ok());
  EXPECT_EQ((*cache)->allocator().num_blocks(), 4);
  SequenceKv a, b;
  ASSERT_TRUE((*cache)->Reserve(a, 48).ok());  // 3 full blocks
  EXPECT_EQ(a.blocks.size(), 3u);
  absl::Status s = (*cache)->Reserve(b, 32);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("--kv-budget-mb"), std::string::npos);
  EXPECT_TRUE(b.blocks.empty());
  EXPECT_EQ((*cache)->allocator().num_free(), 1);
  (*cache)->Free(a);
  EXPECT_EQ((*cache)->allocator().num_free(), 4);
  EXPECT_TRUE(a.ring.empty());
}

TEST(KvPolicyTest, PresetsParseAndMeetTheirBudgets) {
  for (const KvPreset& p : KvPresets()) {
    auto policy = ParseKvPolicy(p.name, 30);
    ASSERT_TRUE(policy.ok()) << p.name << ": " << policy.status();
    auto cache = KvCache::Create(Smol(p.name));
    ASSERT_TRUE(cache.ok()) << p.name << ": " << cache.status();
    const double bits = (*cache)->BitsPerElementAt(2048);
    if (p.name == "int4-comp") EXPECT_LE(bits, 4.5) << p.name;
    if (p.name == "int2-comp") EXPECT_LE(bits, 2.5) << p.name;
  }
}

TEST(KvPolicyTest, PresetsCanBeAmended) {
  auto p = ParseKvPolicy("int2-comp,rope=pre,window=32", 30);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_TRUE(p->pre_rope_keys);
  EXPECT_EQ(p->window_tokens, 32);
  EXPECT_EQ(p->sink_tokens, 4);  // from the preset
  EXPECT_EQ(p->all.k.granularity, kernels::KvGranularity::kPerChannel);
  EXPECT_EQ(p->all.k.bits, 2);
  // ToSpec spells everything out and parses back to the same policy.
  auto back = ParseKvPolicy(p->ToSpec(), 30);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->ToSpec(), p->ToSpec());
}

TEST(KvPolicyTest, GrammarAndErrors) {
  auto p = ParseKvPolicy("k=int4:chan,v=int2,0.k=int8,sink=4,window=16,block=64", 30);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->all.k.granularity, kernels::KvGranularity::kPerChannel);
  EXPECT_EQ(p->all.v.bits, 2);
  EXPECT_EQ(p->ForLayer(0).k.bits, 8);
  EXPECT_EQ(p->ForLayer(0).v.bits, 2);
  EXPECT_EQ(p->ForLayer(1).k.bits, 4);
  EXPECT_EQ(p->sink_tokens, 4);
  EXPECT_EQ(p->window_tokens, 16);
  EXPECT_EQ(p->block_tokens, 64);
  for (const char* bad :
       {"", "int5", "k=", "q=int4", "sink=-1", "block=0", "30.k=int4", "int4,,", "window=abc"}) {
    auto r = ParseKvPolicy(bad, 30);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  // A group that does not divide head_dim is caught when the cache is built.
  EXPECT_FALSE(KvCache::Create(Smol("int4:g48")).ok());
}

TEST(KvPolicyTest, PolicyFile) {
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("qkv_policy_" + std::to_string(getpid()) + ".json"))
                               .string();
  std::ofstream(path) << R"({"block": 32, "sink": 2, "k": "int4:chan", "v": "int4",
                            "layers": {"3": {"k": "fp16"}}})";
  auto p = ParseKvPolicy("@" + path, 30);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->ForLayer(3).k.type, kernels::KvCodecType::kF16);
  EXPECT_EQ(p->ForLayer(3).v.bits, 4);
  EXPECT_EQ(p->sink_tokens, 2);
  std::ofstream(path) << R"({"layers": {"3": {"k": 4}}})";
  EXPECT_EQ(ParseKvPolicy("@" + path, 30).status().code(), absl::StatusCode::kInvalidArgument);
  std::filesystem::remove(path);
  EXPECT_EQ(ParseKvPolicy("@" + path, 30).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace quantkv
