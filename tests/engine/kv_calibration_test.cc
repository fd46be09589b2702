// KV calibration (runtime/kv/kv_calibration.h) on synthetic activations with known
// statistics: each method gives the scales it promises, the per-channel maps beat one
// per-tensor map, clipping pays off on heavy tails, and the written file loads back into
// a cache bit for bit.
#include "runtime/kv/kv_calibration.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>

#include "gtest/gtest.h"
#include "kernels/kv_codec.h"
#include "runtime/kv/kv_cache.h"

namespace quantkv {
namespace {

constexpr int64_t kLayers = 2, kKv = 2, kD = 16, kTokens = 512;
constexpr int64_t kRow = kKv * kD;

KvCalibrationConfig Config(const std::string& spec, CalibrationMethod m) {
  auto policy = ParseKvPolicy(spec, kLayers);
  EXPECT_TRUE(policy.ok()) << policy.status();
  KvCalibrationConfig c;
  c.n_layers = kLayers;
  c.n_kv_heads = kKv;
  c.head_dim = kD;
  c.policy = *policy;
  c.method = m;
  c.max_tokens = kTokens;
  return c;
}

// Rows whose channel ch has spread 0.1 * (1 + ch) around offset ch / 4 (normal), or
// Laplace tails when heavy.
std::vector<float> Rows(std::mt19937_64& rng, bool heavy) {
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::exponential_distribution<float> e(1.0f);
  std::bernoulli_distribution sign(0.5);
  std::vector<float> r(kTokens * kRow);
  for (int64_t t = 0; t < kTokens; ++t) {
    for (int64_t ch = 0; ch < kRow; ++ch) {
      const float z = heavy ? (sign(rng) ? e(rng) : -e(rng)) : n(rng);
      r[t * kRow + ch] = 0.25f * ch + 0.1f * (1 + ch) * z;
    }
  }
  return r;
}

KvCalibrator Fed(const KvCalibrationConfig& c, const std::vector<float>& k,
                 const std::vector<float>& v) {
  auto cal = KvCalibrator::Create(c);
  EXPECT_TRUE(cal.ok()) << cal.status();
  for (int64_t l = 0; l < kLayers; ++l) {
    for (int64_t t = 0; t < kTokens; t += 100) {
      cal->Add(l, std::min<int64_t>(100, kTokens - t), k.data() + t * kRow, v.data() + t * kRow);
    }
    cal->Add(l, 50, k.data(), v.data());  // past max_tokens: ignored
    EXPECT_EQ(cal->tokens(l), kTokens);
  }
  return std::move(*cal);
}

// Squared reconstruction error of rows through the cache codec a policy gives layer 0's K.
double CodecError(const KvPolicy& p, const std::vector<float>& rows) {
  double err = 0;
  const LayerStaticScales* st = p.StaticScalesFor(0);
  for (int64_t h = 0; h < kKv; ++h) {
    kernels::KvCodecConfig cc{p.ForLayer(0).k, kD, p.block_tokens, {}, {}};
    if (st != nullptr && !st->k.scale.empty()) {
      cc.static_scale.assign(st->k.scale.begin() + h * kD, st->k.scale.begin() + (h + 1) * kD);
      if (!st->k.min.empty()) {
        cc.static_min.assign(st->k.min.begin() + h * kD, st->k.min.begin() + (h + 1) * kD);
      }
    }
    auto codec = kernels::KvCodec::Create(cc);
    EXPECT_TRUE(codec.ok()) << codec.status();
    const int64_t bt = p.block_tokens;
    std::vector<float> x(bt * kD), y(bt * kD);
    std::vector<uint8_t> slab((*codec)->slab_bytes());
    for (int64_t b = 0; (b + 1) * bt <= kTokens; ++b) {
      for (int64_t t = 0; t < bt; ++t) {
        std::copy_n(rows.data() + (b * bt + t) * kRow + h * kD, kD, x.data() + t * kD);
      }
      (*codec)->Encode(x.data(), slab.data());
      (*codec)->Decode(slab.data(), 0, bt, y.data());
      for (int64_t i = 0; i < bt * kD; ++i) err += (x[i] - y[i]) * (x[i] - y[i]);
    }
  }
  return err;
}

// Writes the calibration file of p and parses it back, as `--kv @FILE` would.
absl::StatusOr<KvPolicy> WriteAndLoad(const KvPolicy& p, const std::string& name) {
  const std::string path = ::testing::TempDir() + "/" + name;
  {
    std::ofstream out(path);
    out << KvPolicyFileJson(p, "{}");
  }
  return ParseKvPolicy("@" + path, kLayers);
}

// A cache of the test's geometry for `policy`.
KvCacheConfig CacheFor(const KvPolicy& policy) {
  KvCacheConfig cc;
  cc.n_layers = kLayers;
  cc.n_kv_heads = kKv;
  cc.head_dim = kD;
  cc.policy = policy;
  cc.max_bytes = 1 << 20;
  return cc;
}

TEST(KvCalibrationTest, MinMaxPerChannelIsTheColumnRange) {
  std::mt19937_64 rng(1);
  const std::vector<float> k = Rows(rng, false), v = Rows(rng, false);
  auto p = Fed(Config("k=int4:static,v=int8:static:sym,block=32", CalibrationMethod::kMinMax), k, v)
               .Finish();
  ASSERT_TRUE(p.ok()) << p.status();
  const LayerStaticScales* st = p->StaticScalesFor(1);
  ASSERT_NE(st, nullptr);
  ASSERT_EQ(st->k.scale.size(), kRow);
  ASSERT_EQ(st->k.min.size(), kRow);
  EXPECT_TRUE(st->v.min.empty());  // symmetric
  for (int64_t ch = 0; ch < kRow; ++ch) {
    float lo = k[ch], hi = k[ch], amax = 0;
    for (int64_t t = 0; t < kTokens; ++t) {
      lo = std::min(lo, k[t * kRow + ch]);
      hi = std::max(hi, k[t * kRow + ch]);
      amax = std::max(amax, std::fabs(v[t * kRow + ch]));
    }
    EXPECT_FLOAT_EQ(st->k.min[ch], lo);
    EXPECT_FLOAT_EQ(st->k.scale[ch], (hi - lo) / 15.0f);
    EXPECT_FLOAT_EQ(st->v.scale[ch], amax / 127.0f);
  }
}

TEST(KvCalibrationTest, PerChannelBeatsPerTensor) {
  std::mt19937_64 rng(2);
  const std::vector<float> k = Rows(rng, false), v = Rows(rng, false);
  KvCalibrationConfig c = Config("int4:static,block=32", CalibrationMethod::kMinMax);
  auto per_channel = Fed(c, k, v).Finish();
  c.per_tensor = true;
  auto per_tensor = Fed(c, k, v).Finish();
  ASSERT_TRUE(per_channel.ok() && per_tensor.ok());
  const StaticScales& t = per_tensor->StaticScalesFor(0)->k;
  for (float s : t.scale) EXPECT_EQ(s, t.scale[0]);  // one map for the whole tensor
  EXPECT_LT(CodecError(*per_channel, k), 0.25 * CodecError(*per_tensor, k));
}

TEST(KvCalibrationTest, PercentileAndMseClipHeavyTails) {
  std::mt19937_64 rng(3);
  const std::vector<float> k = Rows(rng, true), v = Rows(rng, true);
  auto minmax = Fed(Config("int2:static,block=32", CalibrationMethod::kMinMax), k, v).Finish();
  KvCalibrationConfig pc = Config("int2:static,block=32", CalibrationMethod::kPercentile);
  pc.alpha = 0.99;
  auto pct = Fed(pc, k, v).Finish();
  auto mse = Fed(Config("int2:static,block=32", CalibrationMethod::kMse), k, v).Finish();
  ASSERT_TRUE(minmax.ok() && pct.ok() && mse.ok());
  for (int64_t ch = 0; ch < kRow; ++ch) {
    EXPECT_LT(pct->StaticScalesFor(0)->k.scale[ch], minmax->StaticScalesFor(0)->k.scale[ch]);
  }
  const double e_minmax = CodecError(*minmax, k);
  EXPECT_LT(CodecError(*pct, k), e_minmax);
  EXPECT_LT(CodecError(*mse, k), 0.8 * e_minmax);
}

TEST(KvCalibrationTest, MseTunesTheClipOfDynamicCodecs) {
  std::mt19937_64 rng(4);
  const std::vector<float> k = Rows(rng, true), v = Rows(rng, true);
  auto p = Fed(Config("k=int2:chan,v=int2:g16,block=32", CalibrationMethod::kMse), k, v).Finish();
  ASSERT_TRUE(p.ok()) << p.status();
  for (int64_t l = 0; l < kLayers; ++l) {
    EXPECT_LT(p->ForLayer(l).k.clip, 1.0f) << "layer " << l;
    EXPECT_LT(p->ForLayer(l).v.clip, 1.0f) << "layer " << l;
  }
  KvPolicy plain = *p;
  plain.layers.clear();  // clip 1
  EXPECT_LT(CodecError(*p, k), CodecError(plain, k));
  // minmax leaves dynamic codecs alone.
  auto same =
      Fed(Config("k=int2:chan,v=int2:g16,block=32", CalibrationMethod::kMinMax), k, v).Finish();
  ASSERT_TRUE(same.ok());
  EXPECT_TRUE(same->layers.empty());
}

TEST(KvCalibrationTest, FileLoadsBackIntoACache) {
  std::mt19937_64 rng(5);
  const std::vector<float> k = Rows(rng, false), v = Rows(rng, false);
  auto p = Fed(Config("k=int4:static,v=int2:chan,sink=4,window=8,block=32,rope=pre",
                      CalibrationMethod::kMse),
               k, v)
               .Finish();
  ASSERT_TRUE(p.ok()) << p.status();
  const std::string path = ::testing::TempDir() + "/kv_calibration_test.json";
  {
    std::ofstream out(path);
    out << KvPolicyFileJson(*p, R"({"method":"mse"})");
  }
  auto back = ParseKvPolicy("@" + path, kLayers);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->ToSpec(), p->ToSpec());
  EXPECT_TRUE(back->pre_rope_keys);
  for (int64_t l = 0; l < kLayers; ++l) {
    EXPECT_EQ(back->StaticScalesFor(l)->k.scale, p->StaticScalesFor(l)->k.scale);
    EXPECT_EQ(back->StaticScalesFor(l)->k.min, p->StaticScalesFor(l)->k.min);
    EXPECT_EQ(back->ForLayer(l).v.clip, p->ForLayer(l).v.clip);
  }
  KvCacheConfig cc = CacheFor(*back);
  kernels::RopeSpec rs;
  rs.head_dim = kD;
  kernels::RopeTable rope(rs);
  cc.rope = &rope;
  auto cache = KvCache::Create(cc);
  ASSERT_TRUE(cache.ok()) << cache.status();
  // Static keys cost exactly 4 bits; per-channel int2 values 2 bits plus 4 bytes of scale
  // and min per channel per 32-token block (1 bit): 3.5 on average, protected tokens
  // vanishing at this length.
  EXPECT_NEAR((*cache)->BitsPerElementAt(1 << 20), 3.5, 1e-3);

  // The same file for a model of another geometry is refused with a clear message.
  cc.head_dim = 2 * kD;
  rs.head_dim = 2 * kD;
  kernels::RopeTable rope2(rs);
  cc.rope = &rope2;
  auto wrong = KvCache::Create(cc);
  ASSERT_FALSE(wrong.ok());
  EXPECT_NE(std::string(wrong.status().message()).find("another model"), std::string::npos)
      << wrong.status();
  // A static codec with no scales at all names the tool that makes them.
  cc.policy = *ParseKvPolicy("int4:static", kLayers);
  auto none = KvCache::Create(cc);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(std::string(none.status().message()).find("quantkv calibrate"), std::string::npos);
  std::remove(path.c_str());
}

TEST(KvCalibrationTest, BadInputsAreClearErrors) {
  KvCalibrationConfig c = Config("int4:static,block=32", CalibrationMethod::kPercentile);
  c.alpha = 0.3;
  EXPECT_FALSE(KvCalibrator::Create(c).ok());
  c.alpha = 0.999;
  c.max_tokens = 16;
  EXPECT_FALSE(KvCalibrator::Create(c).ok());
  c.max_tokens = 64;
  auto cal = KvCalibrator::Create(c);
  ASSERT_TRUE(cal.ok());
  std::vector<float> rows(10 * kRow, 1.0f);
  cal->Add(0, 10, rows.data(), rows.data());
  auto p = cal->Finish();
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(std::string(p.status().message()).find("layer 0 saw 10 tokens"), std::string::npos);
  EXPECT_FALSE(ParseCalibrationMethod("kmeans").ok());
}

// Lloyd-Max codebooks: one per layer and K|V, fitted on the normalised values, lowering the
// error of the NF levels they start from; written to the file, loaded back into a cache.
TEST(KvCalibrationTest, CodebooksAreFittedAndLoadBack) {
  std::mt19937_64 rng(11);
  const std::vector<float> k = Rows(rng, true), v = Rows(rng, true);
  auto p =
      Fed(Config("k=nl3:chan:asym:lloyd,v=nl2:g16:sym:lloyd,block=32", CalibrationMethod::kMinMax),
          k, v)
          .Finish();
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->codebooks.size(), static_cast<size_t>(kLayers));
  for (int64_t l = 0; l < kLayers; ++l) {
    const LayerKvVectors* b = p->CodebooksFor(l);
    ASSERT_NE(b, nullptr);
    EXPECT_EQ(b->k.size(), 8u);
    EXPECT_EQ(b->v.size(), 4u);
    EXPECT_TRUE(std::is_sorted(b->k.begin(), b->k.end()));
  }
  auto back = WriteAndLoad(*p, "kv_codebook_test.json");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->CodebooksFor(1)->k, p->CodebooksFor(1)->k);
  KvCacheConfig cc = CacheFor(*back);
  ASSERT_TRUE(KvCache::Create(cc).ok()) << KvCache::Create(cc).status();
  // The same spec without the file's levels is a clear error naming calibration.
  cc.policy.codebooks.clear();
  auto missing = KvCache::Create(cc);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(std::string(missing.status().message()).find("calibrate"), std::string::npos);
  // Fitted levels reconstruct layer 0's keys better than the NF levels they start from.
  auto err = [&](const kernels::KvCodecConfig& c) {
    auto codec = kernels::KvCodec::Create(c);
    EXPECT_TRUE(codec.ok()) << codec.status();
    double e = 0;
    std::vector<float> block(32 * kD), slab_in(32 * kD), out(32 * kD);
    std::vector<uint8_t> slab((*codec)->slab_bytes());
    for (int64_t t0 = 0; t0 + 32 <= kTokens; t0 += 32) {
      for (int64_t h = 0; h < kKv; ++h) {
        for (int64_t t = 0; t < 32; ++t) {
          for (int64_t c2 = 0; c2 < kD; ++c2)
            slab_in[t * kD + c2] = k[(t0 + t) * kRow + h * kD + c2];
        }
        (*codec)->Encode(slab_in.data(), slab.data());
        (*codec)->Decode(slab.data(), 0, 32, out.data());
        for (int64_t i = 0; i < 32 * kD; ++i) e += (out[i] - slab_in[i]) * (out[i] - slab_in[i]);
      }
    }
    return e;
  };
  kernels::KvCodecConfig fitted{p->ForLayer(0).k, kD, 32, {}, {}, p->CodebooksFor(0)->k};
  kernels::KvCodecConfig nf{*kernels::ParseKvCodecSpec("nl3:chan:asym:nf"), kD, 32, {}, {}, {}};
  EXPECT_LT(err(fitted), 0.97 * err(nf));
}

// Product quantization: k-means centroids per layer and K|V, in the file, loaded into a cache.
TEST(KvCalibrationTest, VectorCentroidsAreFittedAndLoadBack) {
  std::mt19937_64 rng(12);
  const std::vector<float> k = Rows(rng, false), v = Rows(rng, true);
  auto p = Fed(Config("k=pq2x6,v=pq4x8,block=32", CalibrationMethod::kMinMax), k, v).Finish();
  ASSERT_TRUE(p.ok()) << p.status();
  for (int64_t l = 0; l < kLayers; ++l) {
    ASSERT_NE(p->CodebooksFor(l), nullptr);
    EXPECT_EQ(p->CodebooksFor(l)->k.size(), 64u * 2);
    EXPECT_EQ(p->CodebooksFor(l)->v.size(), 256u * 4);
  }
  auto back = WriteAndLoad(*p, "kv_pq_test.json");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->CodebooksFor(0)->v, p->CodebooksFor(0)->v);
  KvCacheConfig cc = CacheFor(*back);
  auto cache = KvCache::Create(cc);
  ASSERT_TRUE(cache.ok()) << cache.status();
  // 2 heads x 16 channels: K 6 bits per 2 channels, V 8 bits per 4, plus fp16 row scales.
  EXPECT_NEAR((*cache)->BitsPerElementAt(32 * 100), ((3.0 + 16.0 / kD) + (2.0 + 16.0 / kD)) / 2,
              1e-9);
}

// Learned clipping: a clip model per layer and K|V, in the file, loaded into a cache.
TEST(KvCalibrationTest, ClipModelsAreFittedAndLoadBack) {
  std::mt19937_64 rng(13);
  const std::vector<float> k = Rows(rng, true), v = Rows(rng, false);
  auto p = Fed(Config("k=int2:g16:learnclip,v=int3:g16:sym:learnclip,block=32",
                      CalibrationMethod::kMinMax),
               k, v)
               .Finish();
  ASSERT_TRUE(p.ok()) << p.status();
  for (int64_t l = 0; l < kLayers; ++l) {
    ASSERT_NE(p->ClipModelsFor(l), nullptr);
    EXPECT_EQ(p->ClipModelsFor(l)->k.size(), 5u);
    EXPECT_EQ(p->ClipModelsFor(l)->v.size(), 5u);
  }
  auto back = WriteAndLoad(*p, "kv_clip_test.json");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->ClipModelsFor(1)->k, p->ClipModelsFor(1)->k);
  KvCacheConfig cc = CacheFor(*back);
  ASSERT_TRUE(KvCache::Create(cc).ok()) << KvCache::Create(cc).status();
  cc.policy.clip_models.clear();
  EXPECT_FALSE(KvCache::Create(cc).ok());
}

}  // namespace
}  // namespace quantkv
