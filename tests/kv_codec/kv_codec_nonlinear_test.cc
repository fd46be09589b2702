// Non-linear KV codecs and the low-rank residual: llama.cpp's cache types (q8_0, q4_0, q4_1,
// iq4_nl) checked against their block formats written out independently here, and the codebook
// codecs (normal-float, power, log, Lloyd-Max levels) checked for nearest-level coding, sizes, and
// — on fresh random tensors with planted outliers — lower reconstruction error than the uniform
// codec at the same bits. Seeded freshly each run (seed printed); QUANTKV_TEST_SEED replays.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "kernels/fp16.h"
#include "kernels/kv_clip_model.h"
#include "kernels/kv_codebook.h"
#include "kernels/kv_codec.h"
#include "kernels/kv_vector_quant.h"
#include "tests/testutil/test_seed.h"

namespace quantkv::kernels {
namespace {

uint64_t Seed() { return testing::TestSeed(); }

std::unique_ptr<KvCodec> Make(const std::string& text, int64_t d = 64, int64_t bt = 32,
                              std::vector<float> levels = {}) {
  absl::StatusOr<KvCodecSpec> spec = ParseKvCodecSpec(text);
  EXPECT_TRUE(spec.ok()) << text << ": " << spec.status();
  if (!spec.ok()) return nullptr;
  KvCodecConfig c{*spec, d, bt, {}, {}, std::move(levels)};
  absl::StatusOr<std::unique_ptr<KvCodec>> codec = KvCodec::Create(c);
  EXPECT_TRUE(codec.ok()) << text << ": " << codec.status();
  return codec.ok() ? std::move(*codec) : nullptr;
}

std::vector<float> RoundTrip(const KvCodec& c, const std::vector<float>& x) {
  std::vector<uint8_t> slab(static_cast<size_t>(c.slab_bytes()));
  c.Encode(x.data(), slab.data());
  std::vector<float> y(x.size());
  c.Decode(slab.data(), 0, c.block_tokens(), y.data());
  return y;
}

double Mse(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += (double{a[i]} - b[i]) * (double{a[i]} - b[i]);
  return s / static_cast<double>(a.size());
}

// Normal values with one planted outlier (6-12 sigma) in every 64 consecutive values: the
// shape of real key/value rows, where a few channels dominate each group's range.
std::vector<float> Planted(std::mt19937_64& rng, int64_t n) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = 0.3f + nd(rng);
  for (int64_t g = 0; g + 64 <= n; g += 64) {
    const int64_t at = g + static_cast<int64_t>(u(rng) * 64) % 64;
    x[at] = (u(rng) < 0.5f ? -1.0f : 1.0f) * (6.0f + 6.0f * u(rng));
  }
  return x;
}

// ---------------------------------------------------------------- grammar

TEST(KvNonlinearSpecTest, NamesRoundTripAndErrorsNameThePart) {
  for (const char* text :
       {"q8_0", "q4_0", "q4_1", "iq4_nl", "nl4:g64:asym:nf", "nl3:g32:sym:log",
        "nl2:g64:asym:pow0.5", "nl4:g64:sym:clip0.9:lloyd", "nl3:chan:asym:nf"}) {
    absl::StatusOr<KvCodecSpec> s = ParseKvCodecSpec(text);
    ASSERT_TRUE(s.ok()) << text << ": " << s.status();
    EXPECT_EQ(s->ToString(), text);
    EXPECT_EQ(ParseKvCodecSpec(s->ToString())->ToString(), text);
  }
  EXPECT_EQ(ParseKvCodecSpec("nl4")->ToString(), "nl4:g64:asym:nf");
  EXPECT_EQ(ParseKvCodecSpec("Q4_0")->type, KvCodecType::kGgml);
  struct Bad {
    const char* text;
    const char* names;
  };
  for (const Bad& b :
       {Bad{"q4_0:g32", "no options"}, Bad{"nl4:block", "block"}, Bad{"nl4:pow0", "pow0"},
        Bad{"nl4:pow1.5", "pow1.5"}, Bad{"nl4:nf:log", "log"}, Bad{"nl5", "nl5"},
        Bad{"nl4:out1", "out"}, Bad{"nl4:foo", "foo"}, Bad{"int4:nf", "nf"}}) {
    absl::StatusOr<KvCodecSpec> s = ParseKvCodecSpec(b.text);
    ASSERT_FALSE(s.ok()) << b.text;
    EXPECT_NE(std::string(s.status().message()).find(b.names), std::string::npos)
        << b.text << ": " << s.status();
  }
  // Geometry: ggml blocks are 32 values; codebooks need their levels.
  absl::StatusOr<KvCodecSpec> q4 = ParseKvCodecSpec("q4_0");
  EXPECT_FALSE(KvCodec::Create(*q4, 48, 32).ok());
  absl::StatusOr<KvCodecSpec> lloyd = ParseKvCodecSpec("nl2:lloyd");
  absl::StatusOr<std::unique_ptr<KvCodec>> none = KvCodec::Create(*lloyd, 64, 32);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(std::string(none.status().message()).find("calibrate"), std::string::npos);
  for (const std::vector<float>& bad : std::vector<std::vector<float>>{
           {-1, 0.5f, 0.2f, 1}, {-1, 0, 1}, {-2, 0, 0.5f, 1}, {-1, 0, NAN, 1}}) {
    EXPECT_FALSE(KvCodec::Create(KvCodecConfig{*lloyd, 64, 32, {}, {}, bad}).ok());
  }
}

// ---------------------------------------------------------------- llama.cpp formats

TEST(KvGgmlTest, SlabSizesAreLlamaCppBlockSizes) {
  struct Case {
    const char* name;
    double bits;
  };
  for (const Case& c :
       {Case{"q8_0", 8.5}, Case{"q4_0", 4.5}, Case{"q4_1", 5.0}, Case{"iq4_nl", 4.5}}) {
    std::unique_ptr<KvCodec> codec = Make(c.name, 128, 16);
    ASSERT_TRUE(codec);
    EXPECT_DOUBLE_EQ(codec->bits_per_element(), c.bits) << c.name;
  }
}

// The formats decoded from their definition (fp16 scale first, then bytes whose low nibble is
// value j and high nibble value j + 16), and encoded values checked against the definition
// of ggml's reference quantizers for q8_0 / q4_0 / q4_1.
TEST(KvGgmlTest, BytesFollowTheBlockFormats) {
  std::mt19937_64 rng(Seed());
  const int64_t d = 64, bt = 8;
  const std::vector<float> x = Planted(rng, d * bt);
  for (const char* name : {"q8_0", "q4_0", "q4_1", "iq4_nl"}) {
    SCOPED_TRACE(name);
    std::unique_ptr<KvCodec> codec = Make(name, d, bt);
    ASSERT_TRUE(codec);
    std::vector<uint8_t> slab(static_cast<size_t>(codec->slab_bytes()));
    codec->Encode(x.data(), slab.data());
    std::vector<float> y(x.size());
    codec->Decode(slab.data(), 0, bt, y.data());
    const std::string n = name;
    const int64_t bb = n == "q8_0" ? 34 : n == "q4_1" ? 20 : 18;
    static constexpr int kIq4[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                     1,    13,   25,  38,  53,  69,  89,  113};
    for (int64_t blk = 0; blk < d * bt / 32; ++blk) {
      const uint8_t* b = slab.data() + blk * bb;
      const float* xb = x.data() + blk * 32;
      uint16_t dh;
      std::memcpy(&dh, b, 2);
      const float dd = Fp16ToFp32(dh);
      float amax = 0, max = 0, lo = xb[0], hi = xb[0];
      for (int j = 0; j < 32; ++j) {
        if (std::fabs(xb[j]) > amax) {
          amax = std::fabs(xb[j]);
          max = xb[j];
        }
        lo = std::min(lo, xb[j]);
        hi = std::max(hi, xb[j]);
      }
      for (int j = 0; j < 32; ++j) {
        float want;
        if (n == "q8_0") {
          const int q = static_cast<int8_t>(b[2 + j]);
          EXPECT_EQ(q, static_cast<int>(std::round(xb[j] * (127.0f / amax))));
          want = dd * q;
        } else {
          const int q = j < 16 ? b[bb - 16 + j] & 15 : b[bb - 16 + j - 16] >> 4;
          if (n == "q4_0") {
            EXPECT_EQ(dh, Fp32ToFp16(max / -8.0f));
            EXPECT_EQ(q, std::min(15, static_cast<int>(xb[j] * (1.0f / (max / -8.0f)) + 8.5f)));
            want = dd * (q - 8);
          } else if (n == "q4_1") {
            uint16_t mh;
            std::memcpy(&mh, b + 2, 2);
            EXPECT_EQ(mh, Fp32ToFp16(lo));
            EXPECT_EQ(
                q, std::min(15, static_cast<int>((xb[j] - lo) * (1.0f / ((hi - lo) / 15)) + 0.5f)));
            want = dd * q + Fp16ToFp32(mh);
          } else {
            want = dd * kIq4[q];
          }
        }
        ASSERT_EQ(y[blk * 32 + j], want) << "block " << blk << " value " << j;
      }
    }
  }
}

// iq4_nl's non-uniform levels and fitted scale beat q4_0 at the same 4.5 bits; q8_0 is
// within its half-step bound.
TEST(KvGgmlTest, ErrorsMatchTheFormats) {
  std::mt19937_64 rng(Seed());
  const int64_t d = 128, bt = 32;
  double q4 = 0, iq4 = 0;
  for (int trial = 0; trial < 8; ++trial) {
    const std::vector<float> x = Planted(rng, d * bt);
    q4 += Mse(RoundTrip(*Make("q4_0", d, bt), x), x);
    iq4 += Mse(RoundTrip(*Make("iq4_nl", d, bt), x), x);
    const std::vector<float> y8 = RoundTrip(*Make("q8_0", d, bt), x);
    for (int64_t blk = 0; blk < d * bt / 32; ++blk) {
      float amax = 0;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[blk * 32 + j]));
      for (int j = 0; j < 32; ++j) {
        const int64_t i = blk * 32 + j;
        ASSERT_LE(std::fabs(y8[i] - x[i]), amax / 127 * (0.5 + 1.0 / 1024) + amax / 1024) << i;
      }
    }
  }
  EXPECT_LT(iq4, 0.9 * q4) << "iq4_nl " << iq4 << " q4_0 " << q4;
  // NaN inputs never turn into NaN outputs.
  std::vector<float> x(64 * 32, 1.0f);
  x[5] = NAN;
  for (const char* name : {"q8_0", "q4_0", "q4_1", "iq4_nl"}) {
    for (float v : RoundTrip(*Make(name), x)) ASSERT_FALSE(std::isnan(v)) << name;
  }
}

// ---------------------------------------------------------------- codebooks

TEST(KvCodebookTest, BuiltInLevels) {
  for (const char* text :
       {"nl4:nf", "nl3:nf", "nl2:nf", "nl4:pow0.5", "nl2:pow0.7", "nl4:log", "nl3:log"}) {
    const std::vector<float> lv = KvCodebookLevels(*ParseKvCodecSpec(text));
    const size_t n = size_t{1} << ParseKvCodecSpec(text)->bits;
    ASSERT_EQ(lv.size(), n) << text;
    EXPECT_EQ(lv.front(), -1.0f) << text;
    EXPECT_EQ(lv.back(), 1.0f) << text;
    for (size_t i = 1; i < n; ++i) EXPECT_GT(lv[i], lv[i - 1]) << text;
    if (std::string(text).find("nf") != std::string::npos) {
      EXPECT_EQ(lv[n / 2 - 1], 0.0f) << text;  // NormalFloat has an exact zero
    } else {
      for (size_t i = 0; i < n; ++i) EXPECT_NEAR(lv[i], -lv[n - 1 - i], 1e-6) << text;
    }
  }
  // Power levels are the uniform grid raised to 1/P; log levels halve towards zero.
  const std::vector<float> pw = KvCodebookLevels(*ParseKvCodecSpec("nl2:pow0.5"));
  EXPECT_NEAR(pw[2], 1.0 / 9.0, 1e-6);
  const std::vector<float> lg = KvCodebookLevels(*ParseKvCodecSpec("nl3:log"));
  EXPECT_EQ(lg[4], 0.125f);
  EXPECT_EQ(lg[5], 0.25f);
  // NF4 is QLoRA's table (bitsandbytes' published values, to 4 decimals).
  const std::vector<float> nf = KvCodebookLevels(*ParseKvCodecSpec("nl4:nf"));
  const double nf4[16] = {-1.0,   -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                          0.0796, 0.1609,  0.2461,  0.3379,  0.4407,  0.5626,  0.7230,  1.0};
  for (int i = 0; i < 16; ++i) EXPECT_NEAR(nf[i], nf4[i], 1e-4) << i;
}

// Every value decodes to the level (times its scale) nearest to it, and slabs hold exactly
// metadata + packed codes; scales are per token group or, with chan, per channel.
TEST(KvCodebookTest, CodesAreNearestLevels) {
  std::mt19937_64 rng(Seed());
  for (const char* text : {"nl4:g64:asym:nf", "nl3:g32:sym:pow0.6", "nl2:g16:asym:log",
                           "nl3:g64:asym:clip0.8:nf", "nl3:chan:asym:nf", "nl2:chan:sym:pow0.5"}) {
    SCOPED_TRACE(text);
    const int64_t d = 64, bt = 8;
    std::unique_ptr<KvCodec> c = Make(text, d, bt);
    ASSERT_TRUE(c);
    const KvCodecSpec& s = c->spec();
    const bool chan = s.granularity == KvGranularity::kPerChannel;
    const int64_t n_scales = chan ? d : bt * (d / s.group_size);
    EXPECT_EQ(c->slab_bytes(), (s.symmetric ? 2 : 4) * n_scales + (d * bt * s.bits + 7) / 8);
    const std::vector<float> x = Planted(rng, d * bt);
    const std::vector<float> y = RoundTrip(*c, x);
    const std::vector<float> lv = KvCodebookLevels(s);
    for (int64_t t = 0; t < bt; ++t) {
      for (int64_t ch = 0; ch < d; ++ch) {
        // The values sharing this one's scale.
        std::vector<float> set;
        if (chan) {
          for (int64_t u = 0; u < bt; ++u) set.push_back(x[u * d + ch]);
        } else {
          const int64_t g0 = ch / s.group_size * s.group_size;
          set.assign(x.begin() + t * d + g0, x.begin() + t * d + g0 + s.group_size);
        }
        float lo = set[0], hi = set[0], amax = 0;
        for (float v : set) {
          lo = std::min(lo, v);
          hi = std::max(hi, v);
          amax = std::max(amax, std::fabs(v));
        }
        const double mid = s.symmetric ? 0.0 : 0.5 * (lo + hi);
        const double half = s.clip * (s.symmetric ? amax : 0.5 * (hi - lo));
        const int64_t i = t * d + ch;
        double best = 1e30;
        for (float l : lv) best = std::min(best, std::fabs(mid + half * l - x[i]));
        // fp16 metadata (scale rounded up, midpoint to nearest) moves levels by < 2^-10.
        ASSERT_LE(std::fabs(y[i] - x[i]), best + 2e-3 * (std::fabs(mid) + half) + 1e-6)
            << "t " << t << " c " << ch;
      }
    }
  }
}

// Keys have outlier channels (large, offset, the same in every token): per-channel scales
// follow them, per-token groups cannot.
TEST(KvCodebookTest, PerChannelScalesFollowOutlierChannels) {
  std::mt19937_64 rng(Seed());
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t d = 64, bt = 32;
  double tok = 0, chan = 0;
  for (int trial = 0; trial < 8; ++trial) {
    std::vector<float> x(d * bt);
    for (int64_t t = 0; t < bt; ++t) {
      for (int64_t c = 0; c < d; ++c) {
        const bool outlier = c % 16 == 3;
        x[t * d + c] = outlier ? 8.0f + 3.0f * nd(rng) : nd(rng);
      }
    }
    tok += Mse(RoundTrip(*Make("nl3:g64:asym:nf", d, bt), x), x);
    chan += Mse(RoundTrip(*Make("nl3:chan:asym:nf", d, bt), x), x);
  }
  EXPECT_LT(chan, 0.5 * tok) << "per-channel " << chan << " per-token " << tok;
}

// Planted outliers: the group's range is set by one value, the rest crowd near zero, where
// non-uniform levels put their resolution. Lloyd levels fitted on other tensors of the same
// kind do at least as well as the best built-in set.
TEST(KvCodebookTest, NonUniformLevelsBeatUniformCodesWithOutliers) {
  std::mt19937_64 rng(Seed());
  const int64_t d = 64, bt = 32;
  for (int bits : {4, 3, 2}) {
    SCOPED_TRACE(bits);
    const std::string b = std::to_string(bits);
    absl::StatusOr<KvCodecSpec> lloyd_spec = ParseKvCodecSpec("nl" + b + ":g64:sym:lloyd");
    std::vector<float> train;
    for (int i = 0; i < 16; ++i) {
      const std::vector<float> x = Planted(rng, d * bt);
      KvCodebookNormalize(*lloyd_spec, x.data(), bt, d, bt, train);
    }
    absl::StatusOr<std::vector<float>> fitted = FitKvCodebook(bits, train);
    ASSERT_TRUE(fitted.ok()) << fitted.status();
    double uni = 0, nf = 0, pw = 0, ll = 0;
    for (int trial = 0; trial < 8; ++trial) {
      const std::vector<float> x = Planted(rng, d * bt);
      uni += Mse(RoundTrip(*Make("int" + b + ":g64:sym", d, bt), x), x);
      nf += Mse(RoundTrip(*Make("nl" + b + ":g64:sym:nf", d, bt), x), x);
      pw += Mse(RoundTrip(*Make("nl" + b + ":g64:sym:pow0.5", d, bt), x), x);
      ll += Mse(RoundTrip(*Make("nl" + b + ":g64:sym:lloyd", d, bt, *fitted), x), x);
    }
    std::printf("[ info ] %d bits MSE: uniform %.4f nf %.4f pow0.5 %.4f lloyd %.4f\n", bits,
                uni / 8, nf / 8, pw / 8, ll / 8);
    // Four NF levels spend one on an exact zero and one on each end: little room at 2 bits.
    EXPECT_LT(nf, (bits == 2 ? 0.95 : 0.8) * uni);
    EXPECT_LT(pw, 0.8 * uni);
    EXPECT_LE(ll, 1.02 * std::min(nf, pw));
  }
  // Too little data to fit is a clear error, not a degenerate codebook.
  EXPECT_FALSE(FitKvCodebook(4, std::vector<float>(10, 0.0f)).ok());
  EXPECT_FALSE(FitKvCodebook(5, std::vector<float>(1000, 0.0f)).ok());
}

TEST(KvCodebookTest, HostileInputs) {
  std::vector<float> x(64 * 4, 1.0f);
  x[0] = 1e30f;
  x[1] = -1e30f;
  x[64] = std::numeric_limits<float>::infinity();
  x[128] = NAN;
  std::fill(x.begin() + 192, x.end(), 0.25f);  // a constant row
  for (const char* text : {"nl4:sym", "nl4:asym", "nl2:pow0.5", "nl3:log"}) {
    std::unique_ptr<KvCodec> c = Make(text, 64, 4);
    ASSERT_TRUE(c);
    const std::vector<float> y = RoundTrip(*c, x);
    for (size_t i = 0; i < y.size(); ++i) {
      ASSERT_FALSE(std::isnan(y[i])) << text << " " << i;
      ASSERT_TRUE(std::isfinite(y[i])) << text << " " << i;
    }
    for (int64_t k = 192; k < 256; ++k) EXPECT_NEAR(y[k], 0.25f, 1e-3) << text;
  }
}

// ---------------------------------------------------------------- low-rank residual

TEST(KvLowRankTest, SpecSizesAndErrors) {
  EXPECT_EQ(ParseKvCodecSpec("int2:g64:rank2")->ToString(), "int2:g64:asym:rank2");
  EXPECT_EQ(ParseKvCodecSpec("nl3:chan:rank1")->ToString(), "nl3:chan:asym:nf:rank1");
  for (const char* bad :
       {"int2:rank0", "int2:rank17", "int2:rank2:rank1", "fp8:rank1", "fp16:rank1", "int2:rankx"}) {
    EXPECT_FALSE(ParseKvCodecSpec(bad).ok()) << bad;
  }
  EXPECT_FALSE(KvCodec::Create(*ParseKvCodecSpec("int2:out1:rank1"), 64, 32).ok());
  EXPECT_FALSE(KvCodec::Create(*ParseKvCodecSpec("int2:rank8"), 64, 4).ok());  // rank > tokens
  // R fp16 values per token and per channel on top of the inner slab.
  std::unique_ptr<KvCodec> plain = Make("int2:g64", 64, 128);
  std::unique_ptr<KvCodec> lr = Make("int2:g64:rank2", 64, 128);
  ASSERT_TRUE(plain && lr);
  EXPECT_EQ(lr->slab_bytes(), plain->slab_bytes() + 2 * 2 * (128 + 64));
  // meanres: one fp16 mean per channel.
  EXPECT_EQ(Make("int2:g64:meanres", 64, 128)->slab_bytes(), plain->slab_bytes() + 2 * 64);
  EXPECT_EQ(ParseKvCodecSpec("nl3:meanres")->ToString(), "nl3:g64:asym:nf:meanres");
  EXPECT_FALSE(ParseKvCodecSpec("fp8:meanres").ok());
  EXPECT_FALSE(KvCodec::Create(*ParseKvCodecSpec("int2:rank1:meanres"), 64, 32).ok());
}

// Keys-like slabs: outlier channels with a per-channel offset, which per-token 2-bit groups
// get wrong the same way in every token — a low-rank error the residual removes. Sub-range
// decodes equal the full decode; the error never grows.
TEST(KvLowRankTest, ResidualLowersTheError) {
  std::mt19937_64 rng(Seed());
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t d = 64, bt = 64;
  for (const char* inner : {"int2:g64", "nl2:g64:asym:nf", "int4:g64"}) {
    SCOPED_TRACE(inner);
    double e0 = 0, e1 = 0, e4 = 0, em = 0;
    for (int trial = 0; trial < 6; ++trial) {
      std::vector<float> offset(d);
      for (float& o : offset) o = 2.0f * nd(rng);
      std::vector<float> x(d * bt);
      for (int64_t t = 0; t < bt; ++t) {
        const float amp = 1.0f + 0.3f * nd(rng);
        for (int64_t c = 0; c < d; ++c) x[t * d + c] = amp * offset[c] + 0.5f * nd(rng);
      }
      std::unique_ptr<KvCodec> c0 = Make(inner, d, bt);
      std::unique_ptr<KvCodec> c1 = Make(std::string(inner) + ":rank1", d, bt);
      std::unique_ptr<KvCodec> c4 = Make(std::string(inner) + ":rank4", d, bt);
      e0 += Mse(RoundTrip(*c0, x), x);
      const std::vector<float> y1 = RoundTrip(*c1, x);
      e1 += Mse(y1, x);
      e4 += Mse(RoundTrip(*c4, x), x);
      em += Mse(RoundTrip(*Make(std::string(inner) + ":meanres", d, bt), x), x);
      std::vector<uint8_t> slab(static_cast<size_t>(c1->slab_bytes()));
      c1->Encode(x.data(), slab.data());
      std::vector<float> part(static_cast<size_t>(10 * d));
      c1->Decode(slab.data(), 20, 30, part.data());
      for (int64_t i = 0; i < 10 * d; ++i) ASSERT_EQ(part[i], y1[20 * d + i]);
    }
    std::printf("[ info ] %s MSE: plain %.5f meanres %.5f rank1 %.5f rank4 %.5f\n", inner, e0 / 6,
                em / 6, e1 / 6, e4 / 6);
    EXPECT_LT(em, e0);
    // At 4 bits the residual is mostly white rounding noise: less for a low rank to take.
    EXPECT_LT(e1, (std::string(inner) == "int4:g64" ? 0.99 : 0.9) * e0);
    EXPECT_LT(e4, e1);
  }
  // NaN / inf inputs do not spread through the residual.
  std::vector<float> x(64 * 32, 0.5f);
  x[3] = NAN;
  x[70] = INFINITY;
  const std::vector<float> y = RoundTrip(*Make("int2:g64:rank2", 64, 32), x);
  for (int64_t i = 128; i < 64 * 32; ++i) ASSERT_TRUE(std::isfinite(y[i])) << i;
}

// ---------------------------------------------------------------- product quantization

TEST(KvVectorTest, SpecSizesAndErrors) {
  absl::StatusOr<KvCodecSpec> s = ParseKvCodecSpec("pq4x8");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->type, KvCodecType::kVector);
  EXPECT_EQ(s->vector_dims, 4);
  EXPECT_EQ(s->bits, 8);
  EXPECT_EQ(s->ToString(), "pq4x8");
  EXPECT_TRUE(KvCodecNeedsCodebook(*s));
  for (const char* bad : {"pq", "pq4", "pq3x8", "pq4x13", "pq4x1", "pqx8", "pq4x8:g32", "pq4y8"}) {
    EXPECT_FALSE(ParseKvCodecSpec(bad).ok()) << bad;
  }
  // Centroids are required, and must match 2^B x M.
  absl::StatusOr<std::unique_ptr<KvCodec>> none = KvCodec::Create(*s, 64, 32);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(std::string(none.status().message()).find("calibrate"), std::string::npos);
  EXPECT_FALSE(KvCodec::Create(KvCodecConfig{*s, 64, 32, {}, {}, std::vector<float>(100)}).ok());
  EXPECT_FALSE(KvCodec::Create(*ParseKvCodecSpec("pq8x4"), 60, 32).ok());  // 8 does not divide 60
  std::unique_ptr<KvCodec> c = Make("pq4x8", 64, 32, std::vector<float>(256 * 4, 0.5f));
  ASSERT_TRUE(c);
  // One fp16 scale per token + 16 sub-vectors x 8 bits.
  EXPECT_EQ(c->slab_bytes(), 2 * 32 + 32 * 16);
  EXPECT_DOUBLE_EQ(c->bits_per_element(), 2.25);
  EXPECT_FALSE(FitKvVectorCodebook(*s, std::vector<float>(40, 1.0f)).ok());  // too few
}

// Channels that move together (pairs with correlation 0.9, plus a planted outlier channel):
// 2-channel centroids follow the joint distribution, so product quantization at 2.25 bits
// beats independent 2-bit codes at 2.5 bits; every sub-vector decodes to its nearest centroid.
TEST(KvVectorTest, CentroidsCaptureCorrelatedChannels) {
  std::mt19937_64 rng(Seed());
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t d = 64, bt = 32;
  auto make = [&] {
    std::vector<float> x(d * bt);
    for (int64_t t = 0; t < bt; ++t) {
      for (int64_t c = 0; c < d; c += 2) {
        const float a = nd(rng);
        x[t * d + c] = a;
        x[t * d + c + 1] = 0.9f * a + 0.44f * nd(rng);
      }
      x[t * d + 5] = 6.0f + nd(rng);
    }
    return x;
  };
  absl::StatusOr<KvCodecSpec> spec = ParseKvCodecSpec("pq2x4");
  std::vector<float> train;
  for (int i = 0; i < 64; ++i) {
    const std::vector<float> x = make();
    KvVectorNormalize(*spec, x.data(), bt, d, d, train);
  }
  EXPECT_EQ(train.size(), static_cast<size_t>(64 * bt * d));
  absl::StatusOr<std::vector<float>> cent = FitKvVectorCodebook(*spec, train);
  ASSERT_TRUE(cent.ok()) << cent.status();
  ASSERT_EQ(cent->size(), 16u * 2);
  std::unique_ptr<KvCodec> pq = Make("pq2x4", d, bt, *cent);
  std::unique_ptr<KvCodec> uni = Make("int2:g64", d, bt);
  ASSERT_TRUE(pq && uni);
  EXPECT_LT(pq->bits_per_element(), uni->bits_per_element());
  double e_pq = 0, e_uni = 0;
  for (int trial = 0; trial < 8; ++trial) {
    const std::vector<float> x = make();
    const std::vector<float> y = RoundTrip(*pq, x);
    e_pq += Mse(y, x);
    e_uni += Mse(RoundTrip(*uni, x), x);
    // Nearest centroid (in the token's normalised units, up to the fp16 scale's rounding).
    for (int64_t t = 0; t < bt; ++t) {
      double ss = 0;
      for (int64_t c = 0; c < d; ++c) ss += double{x[t * d + c]} * x[t * d + c];
      const double scale = std::sqrt(ss / d);
      for (int64_t j = 0; j < d / 2; ++j) {
        const double u0 = x[t * d + 2 * j] / scale, u1 = x[t * d + 2 * j + 1] / scale;
        double best = 1e30;
        for (size_t k = 0; k < 16; ++k) {
          best = std::min(best, std::hypot(u0 - (*cent)[2 * k], u1 - (*cent)[2 * k + 1]));
        }
        const double got =
            std::hypot(u0 - y[t * d + 2 * j] / scale, u1 - y[t * d + 2 * j + 1] / scale);
        // The stored scale is the RMS rounded up to fp16 (< 2^-10 relative).
        ASSERT_LE(got, best + 2e-3 * (1 + best + std::hypot(u0, u1)))
            << "t " << t << " sub-vector " << j;
      }
    }
  }
  std::printf("[ info ] MSE: pq2x4 (%.2f bits) %.4f, int2:g64 (%.2f bits) %.4f\n",
              pq->bits_per_element(), e_pq / 8, uni->bits_per_element(), e_uni / 8);
  EXPECT_LT(e_pq, 0.8 * e_uni);
}

// ---------------------------------------------------------------- learned clipping

TEST(KvLearnedClipTest, SpecAndErrors) {
  EXPECT_EQ(ParseKvCodecSpec("int2:g64:learnclip")->ToString(), "int2:g64:asym:learnclip");
  EXPECT_FALSE(ParseKvCodecSpec("nl3:learnclip").ok());
  EXPECT_FALSE(ParseKvCodecSpec("fp8:learnclip").ok());
  EXPECT_FALSE(ParseKvCodecSpec("int2:learnclip:learnclip").ok());
  const KvCodecSpec chan = *ParseKvCodecSpec("int2:chan:learnclip");
  EXPECT_FALSE(
      KvCodec::Create(KvCodecConfig{chan, 64, 32, {}, {}, {}, std::vector<float>(5, 0.5f)}).ok());
  absl::StatusOr<std::unique_ptr<KvCodec>> none =
      KvCodec::Create(*ParseKvCodecSpec("int2:learnclip"), 64, 32);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(std::string(none.status().message()).find("calibrate"), std::string::npos);
  // Scale-free features: a group and 1000x the group give the same prediction.
  std::vector<float> g(64), g2(64);
  for (int i = 0; i < 64; ++i) g2[i] = 1000.0f * (g[i] = std::sin(0.3f * i) + (i == 7 ? 5.0f : 0));
  float f1[kClipFeatures], f2[kClipFeatures];
  ClipFeatures(g.data(), 64, f1);
  ClipFeatures(g2.data(), 64, f2);
  for (int i = 0; i < kClipFeatures; ++i) EXPECT_NEAR(f1[i], f2[i], 1e-4 * (1 + std::fabs(f1[i])));
}

// Half the groups peaked (one planted outlier: a tight clip pays), half flat (no clip pays):
// per-group clips from the fitted model beat the best single clip ratio for all groups.
TEST(KvLearnedClipTest, PerGroupClipsBeatTheBestFixedClip) {
  std::mt19937_64 rng(Seed());
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
  const int64_t d = 64, bt = 32;
  auto make = [&] {
    std::vector<float> x(d * bt);
    for (int64_t t = 0; t < bt; ++t) {
      const bool peaked = t % 2 == 0;
      for (int64_t c = 0; c < d; ++c) x[t * d + c] = peaked ? nd(rng) : 2.0f * ud(rng);
      if (peaked) x[t * d + (t * 7) % d] = 12.0f * (ud(rng) < 0 ? -1.0f : 1.0f);
    }
    return x;
  };
  const KvCodecSpec spec = *ParseKvCodecSpec("int2:g64:sym:learnclip");
  std::vector<float> train;
  for (int i = 0; i < 40; ++i) {
    const std::vector<float> x = make();
    train.insert(train.end(), x.begin(), x.end());
  }
  absl::StatusOr<std::vector<float>> w = FitClipModel(spec, train.data(), 40 * bt, d);
  ASSERT_TRUE(w.ok()) << w.status();
  std::unique_ptr<KvCodec> learned =
      std::move(*KvCodec::Create(KvCodecConfig{spec, d, bt, {}, {}, {}, *w}));
  std::vector<std::vector<float>> test;
  for (int i = 0; i < 8; ++i) test.push_back(make());
  double e_learned = 0;
  for (const auto& x : test) e_learned += Mse(RoundTrip(*learned, x), x);
  double best_fixed = INFINITY, best_c = 0;
  for (float c = 0.2f; c <= 1.0f + 1e-6f; c += 0.05f) {
    std::unique_ptr<KvCodec> fixed =
        Make(absl::StrFormat("int2:g64:sym:clip%g", std::min(c, 1.0f)), d, bt);
    double e = 0;
    for (const auto& x : test) e += Mse(RoundTrip(*fixed, x), x);
    if (e < best_fixed) {
      best_fixed = e;
      best_c = c;
    }
  }
  std::printf("[ info ] MSE: learned clips %.4f, best fixed clip (%.2f) %.4f\n", e_learned / 8,
              best_c, best_fixed / 8);
  // A linear model of four statistics captures part of the per-group optimum (about 8% less
  // error than the best fixed clip here).
  EXPECT_LT(e_learned, 0.96 * best_fixed);
  EXPECT_FALSE(FitClipModel(spec, train.data(), 10, d).ok());  // too few groups
}

}  // namespace
}  // namespace quantkv::kernels
