// KvCache bookkeeping and accounting, and KvPolicy parsing. No model needed.
#include "runtime/kv/kv_cache.h"

#include <cmath>
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
    if (p.name == "int4-comp") {
      EXPECT_LE(bits, 4.5) << p.name;
    }
    if (p.name == "int3-comp") {
      EXPECT_LE(bits, 3.5) << p.name;
    }
    if (p.name == "int2-comp") {
      EXPECT_LE(bits, 2.5) << p.name;
    }
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

TEST(KvPolicyTest, Temperature) {
  auto p = ParseKvPolicy("int4,temp=1.05,3.temp=0.9", 30);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_FLOAT_EQ(p->ScoreScale(0), 1.0f / 1.05f);
  EXPECT_FLOAT_EQ(p->ScoreScale(3), 1.0f / 0.9f);
  EXPECT_EQ(ParseKvPolicy(p->ToSpec(), 30)->ToSpec(), p->ToSpec());
  EXPECT_FLOAT_EQ(ParseKvPolicy("int4", 30)->ScoreScale(7), 1.0f);
  for (const char* bad : {"temp=0", "temp=3", "temp=x", "30.temp=1", "x.temp=1"}) {
    EXPECT_EQ(ParseKvPolicy(bad, 30).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(KvPolicyTest, PerHeadOverrides) {
  auto p = ParseKvPolicy("int4,2.k=int8,2.h1.k=int2,2.h1.v=fp16,2.h0.kv=int3", 30, 3);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->ForHead(2, 1).k.bits, 2);
  EXPECT_EQ(p->ForHead(2, 1).v.type, kernels::KvCodecType::kF16);
  EXPECT_EQ(p->ForHead(2, 0).k.bits, 3);
  EXPECT_EQ(p->ForHead(2, 0).v.bits, 3);
  EXPECT_EQ(p->ForHead(2, 2).k.bits, 8);  // the layer's override
  EXPECT_EQ(p->ForHead(3, 1).k.bits, 4);  // the whole cache's codec
  EXPECT_TRUE(p->HasHeadOverrides(2));
  EXPECT_FALSE(p->HasHeadOverrides(3));
  auto back = ParseKvPolicy(p->ToSpec(), 30, 3);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->ToSpec(), p->ToSpec());
  // A later layer-wide item overrides the layer's heads too; a bare codec resets everything.
  EXPECT_EQ(ParseKvPolicy("int4,2.h1.k=int2,2.k=int8", 30, 3)->ForHead(2, 1).k.bits, 8);
  EXPECT_EQ(ParseKvPolicy("int4,2.h1.k=int2,k=int8", 30, 3)->ForHead(2, 1).k.bits, 8);
  EXPECT_TRUE(ParseKvPolicy("int4,2.h1.k=int2,fp16", 30, 3)->heads.empty());
  for (const char* bad : {"2.h3.k=int4", "2.x1.k=int4", "2.h.k=int4", "2.h1.q=int4", "30.h0.k=int4",
                          "2.h1.k=int5", "2.h1.k.v=int4"}) {
    auto r = ParseKvPolicy(bad, 30, 3);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_NE(ParseKvPolicy("2.h3.k=int4", 30, 3).status().message().find("head"), std::string::npos);
}

TEST(KvCacheTest, PerHeadCodecsChangeOnlyTheirSlabs) {
  // One head of one layer at 2 bits: the block shrinks by that slab's difference.
  auto uniform = KvCache::Create(Smol("int4"));
  auto mixed = KvCache::Create(Smol("int4,5.h1.k=int2"));
  ASSERT_TRUE(uniform.ok() && mixed.ok());
  auto int4 = *kernels::KvCodec::Create(*kernels::ParseKvCodecSpec("int4"), 64, 32);
  auto int2 = *kernels::KvCodec::Create(*kernels::ParseKvCodecSpec("int2"), 64, 32);
  EXPECT_EQ((*uniform)->block_bytes_all_layers() - (*mixed)->block_bytes_all_layers(),
            int4->slab_bytes() - int2->slab_bytes());
  // The same rows written to both: heads 0 and 2 of layer 5 decode identically, head 1's
  // keys differ (2 bits), its values do not.
  std::vector<float> k(32 * 3 * 64), v(k.size());
  for (size_t i = 0; i < k.size(); ++i) {
    k[i] = std::sin(0.37f * static_cast<float>(i));
    v[i] = std::cos(0.11f * static_cast<float>(i));
  }
  std::vector<float> out_u(32 * 64), out_m(32 * 64);
  SequenceKv su, sm;
  ASSERT_TRUE((*uniform)->Reserve(su, 32).ok());
  ASSERT_TRUE((*mixed)->Reserve(sm, 32).ok());
  (*uniform)->Write(su, 5, 0, 32, k.data(), v.data());
  (*mixed)->Write(sm, 5, 0, 32, k.data(), v.data());
  const kernels::KvLayerView vu = (*uniform)->View(su, 5, 32);
  const kernels::KvLayerView vm = (*mixed)->View(sm, 5, 32);
  ASSERT_EQ(vu.n_blocks, 1);
  ASSERT_EQ(vm.n_blocks, 1);
  for (int64_t h = 0; h < 3; ++h) {
    for (int kv = 0; kv < 2; ++kv) {
      const kernels::KvSlabs& a = kv == 0 ? vu.k : vu.v;
      const kernels::KvSlabs& b = kv == 0 ? vm.k : vm.v;
      a.codecs[h]->Decode(a.Slab(vu.block_table[0], h), 0, 32, out_u.data());
      b.codecs[h]->Decode(b.Slab(vm.block_table[0], h), 0, 32, out_m.data());
      if (h == 1 && kv == 0) {
        EXPECT_NE(out_u, out_m);
      } else {
        EXPECT_EQ(out_u, out_m) << "head " << h << " kv " << kv;
      }
    }
  }
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
  std::ofstream(path)
      << R"({"k": "int4", "layers": {"3": {"k": "int8", "heads": {"2": {"v": "int2"}}}}})";
  auto heads = ParseKvPolicy("@" + path, 30, 3);
  ASSERT_TRUE(heads.ok()) << heads.status();
  EXPECT_EQ(heads->ForHead(3, 2).v.bits, 2);
  EXPECT_EQ(heads->ForHead(3, 2).k.bits, 8);
  EXPECT_EQ(heads->ForHead(3, 1).v.bits, 16);
  std::ofstream(path) << R"({"layers": {"3": {"heads": {"2": "int2"}}}})";
  EXPECT_EQ(ParseKvPolicy("@" + path, 30).status().code(), absl::StatusCode::kInvalidArgument);
  std::ofstream(path) << R"({"layers": {"3": {"k": 4}}})";
  EXPECT_EQ(ParseKvPolicy("@" + path, 30).status().code(), absl::StatusCode::kInvalidArgument);
  std::filesystem::remove(path);
  EXPECT_EQ(ParseKvPolicy("@" + path, 30).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace quantkv
