// KV codecs: spec grammar (parse, canonical ToString, errors), geometry checks, exact slab
// sizes, and decode(encode(x)) against each codec's analytic error bound on fresh random
// inputs (normal, outlier channels, constant rows and blocks, tiny and large magnitudes),
// sub-range decodes equal to the full decode, unaligned slabs, no writes outside the slab.
// Ends with a decode throughput print (not an assertion).
//
// The run is seeded freshly each time (seed printed); QUANTKV_TEST_SEED replays one.
// ctest runs this binary three times: best ISA, QUANTKV_ISA=avx2 and QUANTKV_ISA=scalar.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "kernels/fp16.h"
#include "kernels/kv_codec.h"
#include "tests/testutil/test_seed.h"

namespace quantkv::kernels {
namespace {

uint64_t Seed() { return testing::TestSeed(); }

bool MessageHas(const absl::Status& s, std::string_view needle) {
  return std::string(s.message()).find(needle) != std::string::npos;
}

std::unique_ptr<KvCodec> MustCreate(const std::string& text, int64_t d, int64_t bt) {
  absl::StatusOr<KvCodecSpec> spec = ParseKvCodecSpec(text);
  EXPECT_TRUE(spec.ok()) << text << ": " << spec.status();
  if (!spec.ok()) return nullptr;
  absl::StatusOr<std::unique_ptr<KvCodec>> c = KvCodec::Create(*spec, d, bt);
  EXPECT_TRUE(c.ok()) << text << " d=" << d << " bt=" << bt << ": " << c.status();
  if (!c.ok()) return nullptr;
  return std::move(*c);
}

void ExpectSameSpec(const KvCodecSpec& a, const KvCodecSpec& b, const std::string& what) {
  EXPECT_EQ(a.type, b.type) << what;
  EXPECT_EQ(a.bits, b.bits) << what;
  EXPECT_EQ(a.symmetric, b.symmetric) << what;
  EXPECT_EQ(a.granularity, b.granularity) << what;
  if (a.granularity == KvGranularity::kPerTokenGroup) {
    EXPECT_EQ(a.group_size, b.group_size) << what;
  }
  EXPECT_EQ(BitsFromFp32(a.clip), BitsFromFp32(b.clip)) << what;
}

// Every codec spec the round-trip sweep covers.
std::vector<std::string> AllSpecs() {
  std::vector<std::string> s = {"fp32", "fp16", "bf16", "fp8:g32", "fp8:g64", "fp8:g64:clip0.9"};
  for (const char* bits : {"int8", "int4", "int3", "int2"}) {
    for (const char* gran : {"g32", "g64", "chan", "block"}) {
      for (const char* sym : {"sym", "asym"}) {
        for (const char* clip : {"", ":clip0.9"}) {
          s.push_back(std::string(bits) + ":" + gran + ":" + sym + clip);
        }
      }
    }
  }
  return s;
}

// ---------------------------------------------------------------- parsing

TEST(KvCodecSpecTest, ParsesDefaultsAndOptions) {
  absl::StatusOr<KvCodecSpec> s = ParseKvCodecSpec("int4");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->type, KvCodecType::kUniform);
  EXPECT_EQ(s->bits, 4);
  EXPECT_FALSE(s->symmetric);
  EXPECT_EQ(s->granularity, KvGranularity::kPerTokenGroup);
  EXPECT_EQ(s->group_size, 64);
  EXPECT_EQ(s->clip, 1.0f);

  s = ParseKvCodecSpec("int2:chan");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->bits, 2);
  EXPECT_EQ(s->granularity, KvGranularity::kPerChannel);
  EXPECT_FALSE(s->symmetric);

  s = ParseKvCodecSpec("int8:clip0.95:sym:g32");  // any order
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->bits, 8);
  EXPECT_TRUE(s->symmetric);
  EXPECT_EQ(s->group_size, 32);
  EXPECT_EQ(s->clip, 0.95f);

  s = ParseKvCodecSpec(" INT3:G32:ASYM ");  // case and surrounding blanks
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->bits, 3);
  EXPECT_EQ(s->group_size, 32);

  s = ParseKvCodecSpec("fp8");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->type, KvCodecType::kFp8E4M3);
  EXPECT_EQ(s->group_size, 64);
  EXPECT_EQ(s->bits, 8);

  for (auto [name, type, bits] :
       {std::tuple{"fp32", KvCodecType::kF32, 32}, std::tuple{"fp16", KvCodecType::kF16, 16},
        std::tuple{"bf16", KvCodecType::kBF16, 16}}) {
    s = ParseKvCodecSpec(name);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ(s->type, type) << name;
    EXPECT_EQ(s->bits, bits) << name;
  }
}

TEST(KvCodecSpecTest, CanonicalSpelling) {
  const std::pair<const char*, const char*> cases[] = {
      {"fp16", "fp16"},
      {"fp32", "fp32"},
      {"bf16", "bf16"},
      {"fp8", "fp8:g64"},
      {"fp8:clip0.5:g32", "fp8:g32:clip0.5"},
      {"int4", "int4:g64:asym"},
      {"int4:g32", "int4:g32:asym"},
      {"int4:sym:g32", "int4:g32:sym"},
      {"int2:chan", "int2:chan"},
      {"int2:asym:chan", "int2:chan"},
      {"int2:chan:sym", "int2:chan:sym"},
      {"int4:block", "int4:block"},
      {"int4:sym:block", "int4:block:sym"},
      {"int2:static", "int2:static"},
      {"int4:static:sym", "int4:static:sym"},
      {"int8:sym:clip0.95", "int8:g64:sym:clip0.95"},
      {"int3:clip1", "int3:g64:asym"},
  };
  for (const auto& [in, want] : cases) {
    absl::StatusOr<KvCodecSpec> s = ParseKvCodecSpec(in);
    ASSERT_TRUE(s.ok()) << in << ": " << s.status();
    EXPECT_EQ(s->ToString(), want) << in;
  }
}

TEST(KvCodecSpecTest, ToStringParseRoundTrip) {
  for (const std::string& text : AllSpecs()) {
    absl::StatusOr<KvCodecSpec> s = ParseKvCodecSpec(text);
    ASSERT_TRUE(s.ok()) << text << ": " << s.status();
    const std::string canon = s->ToString();
    absl::StatusOr<KvCodecSpec> again = ParseKvCodecSpec(canon);
    ASSERT_TRUE(again.ok()) << canon << ": " << again.status();
    ExpectSameSpec(*s, *again, text + " -> " + canon);
    EXPECT_EQ(again->ToString(), canon);
  }
  // Arbitrary clips survive the trip bit for bit.
  std::mt19937_64 rng(Seed());
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (int i = 0; i < 200; ++i) {
    KvCodecSpec spec;
    spec.type = KvCodecType::kUniform;
    spec.bits = 4;
    spec.symmetric = i % 2 == 0;
    spec.clip = std::max(u(rng), 1e-6f);
    absl::StatusOr<KvCodecSpec> back = ParseKvCodecSpec(spec.ToString());
    ASSERT_TRUE(back.ok()) << spec.ToString() << ": " << back.status();
    ExpectSameSpec(spec, *back, spec.ToString());
  }
}

TEST(KvCodecSpecTest, ParseErrorsNameThePart) {
  const std::pair<const char*, const char*> cases[] = {
      {"", "empty"},
      {"   ", "empty"},
      {"int5", "'int5'"},
      {"fp4", "'fp4'"},
      {"q5_0", "'q5_0'"},
      {"fp16:g32", "'g32'"},
      {"fp32:sym", "'sym'"},
      {"bf16:clip0.9", "'clip0.9'"},
      {"fp8:chan", "'chan'"},
      {"fp8:asym", "'asym'"},
      {"int4:g0", "'g0'"},
      {"int4:g", "'g'"},
      {"int4:gx", "'gx'"},
      {"int4:g32x", "'g32x'"},
      {"int4:g-4", "'g-4'"},
      {"int4:g99999999", "'g99999999'"},
      {"int4:clip0", "'clip0'"},
      {"int4:clip1.5", "'clip1.5'"},
      {"int4:clip-0.5", "'clip-0.5'"},
      {"int4:clipnan", "'clipnan'"},
      {"int4:clipinf", "'clipinf'"},
      {"int4:clip0.5x", "'clip0.5x'"},
      {"int4:clip", "'clip'"},
      {"int4:chan:g32", "'g32'"},
      {"int4:g32:chan", "'chan'"},
      {"int4:chan:block", "'block'"},
      {"int4:static:chan", "'chan'"},
      {"fp8:static", "'static'"},
      {"int4:g32:g64", "'g64'"},
      {"int4:sym:asym", "'asym'"},
      {"int4:sym:sym", "'sym'"},
      {"int4:clip0.5:clip0.9", "'clip0.9'"},
      {"int4:foo", "'foo'"},
      {"int4::g32", "empty option"},
      {"int4:", "empty option"},
      {"int4:g32:", "empty option"},
  };
  for (const auto& [in, part] : cases) {
    absl::StatusOr<KvCodecSpec> s = ParseKvCodecSpec(in);
    ASSERT_FALSE(s.ok()) << "'" << in << "' parsed";
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << in;
    EXPECT_TRUE(MessageHas(s.status(), part)) << "'" << in << "': " << s.status();
  }
}

TEST(KvCodecCreateTest, GeometryErrors) {
  auto create = [](const std::string& text, int64_t d, int64_t bt) {
    absl::StatusOr<KvCodecSpec> s = ParseKvCodecSpec(text);
    EXPECT_TRUE(s.ok()) << text;
    return KvCodec::Create(*s, d, bt).status();
  };
  absl::Status st = create("int4:g48", 64, 32);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(MessageHas(st, "group size 48 does not divide head_dim 64")) << st;
  st = create("fp8:g48", 64, 32);
  EXPECT_TRUE(MessageHas(st, "does not divide")) << st;
  st = create("int3:g4", 12, 32);
  EXPECT_TRUE(MessageHas(st, "multiple of 8")) << st;
  st = create("int4:chan", 7, 32);
  EXPECT_TRUE(MessageHas(st, "multiple of 2")) << st;
  st = create("int2:chan", 6, 32);
  EXPECT_TRUE(MessageHas(st, "multiple of 4")) << st;
  st = create("fp16", 0, 32);
  EXPECT_TRUE(MessageHas(st, "head_dim 0")) << st;
  st = create("int4", 64, 0);
  EXPECT_TRUE(MessageHas(st, "block_tokens 0")) << st;
  EXPECT_TRUE(create("int3:g8", 24, 3).ok());
  EXPECT_TRUE(create("fp8:g1", 5, 1).ok());

  KvCodecSpec bad;
  bad.type = KvCodecType::kUniform;
  bad.bits = 5;
  st = KvCodec::Create(bad, 64, 32).status();
  EXPECT_TRUE(MessageHas(st, "bits 5")) << st;
  bad.bits = 4;
  for (float clip : {0.0f, -1.0f, 1.5f, std::nanf("")}) {
    bad.clip = clip;
    st = KvCodec::Create(bad, 64, 32).status();
    EXPECT_TRUE(MessageHas(st, "clip")) << clip << ": " << st;
  }
  KvCodecSpec fp8;
  fp8.type = KvCodecType::kFp8E4M3;
  fp8.granularity = KvGranularity::kPerChannel;
  st = KvCodec::Create(fp8, 64, 32).status();
  EXPECT_TRUE(MessageHas(st, "chan")) << st;
}

// ---------------------------------------------------------------- sizes

TEST(KvCodecSizeTest, BitsPerElementIncludesMetadata) {
  struct Case {
    const char* spec;
    int64_t d, bt;
    double bits;
  };
  const Case cases[] = {
      {"fp32", 64, 32, 32.0},
      {"fp16", 64, 32, 16.0},
      {"bf16", 128, 16, 16.0},
      {"fp8:g64", 64, 32, 8.25},
      {"fp8:g32", 128, 16, 8.5},
      {"int8:g64:sym", 128, 32, 8.25},
      {"int8:g64:asym", 64, 32, 8.5},
      {"int4:g64:asym", 64, 32, 4.5},
      {"int4:g64:asym", 64, 7, 4.5},
      {"int4:g32:asym", 64, 32, 5.0},
      {"int4:g128:sym", 128, 16, 4.125},
      {"int3:g64:sym", 64, 16, 3.25},
      {"int3:g32:asym", 128, 64, 4.0},
      {"int2:chan", 64, 64, 2.5},
      {"int2:chan:sym", 64, 32, 2.5},
      {"int4:chan", 128, 16, 6.0},
      {"int2:g64:asym", 64, 32, 2.5},
  };
  for (const Case& c : cases) {
    std::unique_ptr<KvCodec> codec = MustCreate(c.spec, c.d, c.bt);
    ASSERT_TRUE(codec);
    EXPECT_DOUBLE_EQ(codec->bits_per_element(), c.bits) << c.spec << " d=" << c.d << " bt=" << c.bt;
    EXPECT_EQ(codec->slab_bytes() * 8, static_cast<int64_t>(c.bits * c.d * c.bt)) << c.spec;
  }
}

// Independent byte count for every spec of the sweep.
int64_t ExpectedSlabBytes(const KvCodecSpec& s, int64_t d, int64_t bt) {
  switch (s.type) {
    case KvCodecType::kF32:
      return 4 * d * bt;
    case KvCodecType::kF16:
    case KvCodecType::kBF16:
      return 2 * d * bt;
    case KvCodecType::kFp8E4M3:
      return d * bt + 2 * bt * (d / s.group_size);
    case KvCodecType::kUniform: {
      const int64_t codes = s.bits * d * bt / 8;
      const int64_t per_meta = s.symmetric ? 2 : 4;
      const int64_t n_meta = s.granularity == KvGranularity::kPerChannel ? d
                             : s.granularity == KvGranularity::kPerBlock ? 1
                             : s.granularity == KvGranularity::kStatic   ? 0
                                                                         : bt * (d / s.group_size);
      return codes + per_meta * n_meta;
    }
    case KvCodecType::kGgml:
    case KvCodecType::kCodebook:
    case KvCodecType::kVector:
      break;  // not in this sweep: kv_codec_nonlinear_test checks their sizes
    case KvCodecType::kDrop:
      break;  // not in this sweep: kv_codec_keep_rows_test checks its size
  }
  return -1;
}

// ---------------------------------------------------------------- round trips

enum class Data { kNormal, kOutlierChannels, kConstantRows, kConstantBlock, kTiny, kLarge, kZero };
const char* DataName(Data d) {
  switch (d) {
    case Data::kNormal:
      return "normal";
    case Data::kOutlierChannels:
      return "outlier-channels";
    case Data::kConstantRows:
      return "constant-rows";
    case Data::kConstantBlock:
      return "constant-block";
    case Data::kTiny:
      return "tiny";
    case Data::kLarge:
      return "large";
    case Data::kZero:
      return "zero";
  }
  return "?";
}

std::vector<float> MakeData(std::mt19937_64& rng, Data kind, int64_t d, int64_t bt) {
  std::vector<float> x(static_cast<size_t>(d * bt));
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::normal_distribution<float> n(0.0f, 1.0f);
  const float sigma = 0.1f + 3.0f * u(rng);
  const float mean = (u(rng) - 0.5f) * sigma;
  for (float& v : x) v = mean + sigma * n(rng);
  switch (kind) {
    case Data::kNormal:
      break;
    case Data::kOutlierChannels: {
      // A few channels (as in keys) with large magnitude and a shifted mean.
      // Distinct channels, so values stay inside fp16 range (metadata saturates beyond).
      const int64_t c0 = static_cast<int64_t>(u(rng) * d) % d;
      for (int k = 0; k < 4; ++k) {
        const int64_t c = (c0 + k * (d / 4)) % d;
        const float gain = 10.0f + 40.0f * u(rng), shift = (u(rng) - 0.5f) * 50.0f;
        for (int64_t t = 0; t < bt; ++t) x[t * d + c] = x[t * d + c] * gain + shift;
      }
      break;
    }
    case Data::kConstantRows: {
      const float values[] = {0.0f, 0.1f, -3.7f, 1.0f / 3.0f, 1e-7f};
      for (int64_t t = 0; t < bt; t += 2) {
        const float v = u(rng) < 0.5f ? values[t / 2 % 5] : sigma * n(rng);
        std::fill_n(x.begin() + t * d, d, v);
      }
      break;
    }
    case Data::kConstantBlock: {
      const float v = sigma * n(rng);
      std::fill(x.begin(), x.end(), v);
      break;
    }
    case Data::kTiny:
      for (float& v : x) v *= 1e-6f;
      break;
    case Data::kLarge:
      for (float& v : x) v *= 300.0f;
      break;
    case Data::kZero:
      std::fill(x.begin(), x.end(), 0.0f);
      break;
  }
  return x;
}

// Per-element error bound for `x` under `s` (see each codec's description in kv_codec.h):
//   uniform   scale/2 inside the (clipped) range, where scale is the fp16 metadata rounded
//             outward, plus the clipped-away distance outside it;
//   fp8       2^-4 relative (3 mantissa bits, nearest), 2^-10 scale absolute (subnormals);
//   fp16      2^-11 relative, 2^-25 absolute; bf16 2^-8 relative; fp32 exact.
// Plus a few fp32 ulps of rounding in the encoder/decoder arithmetic.
std::vector<double> ErrorBound(const KvCodecSpec& s, const std::vector<float>& x, int64_t d,
                               int64_t bt) {
  std::vector<double> b(x.size(), 0.0);
  constexpr double kF16Ulp = 1.0 / 1024.0, kF16Tiny = 1.0 / (1 << 24);
  auto ulps = [](double v) { return 1e-6 * v; };
  if (s.type == KvCodecType::kF32) return b;
  if (s.type == KvCodecType::kF16 || s.type == KvCodecType::kBF16) {
    const double rel = s.type == KvCodecType::kF16 ? 1.0 / 2048 : 1.0 / 256;
    for (size_t i = 0; i < x.size(); ++i) b[i] = rel * std::fabs(x[i]) + std::pow(2.0, -25);
    return b;
  }
  // Index sets that share metadata.
  std::vector<std::vector<int64_t>> sets;
  if (s.granularity == KvGranularity::kPerChannel) {
    for (int64_t c = 0; c < d; ++c) {
      std::vector<int64_t> idx;
      for (int64_t t = 0; t < bt; ++t) idx.push_back(t * d + c);
      sets.push_back(std::move(idx));
    }
  } else if (s.granularity == KvGranularity::kPerBlock) {
    std::vector<int64_t> idx(static_cast<size_t>(d * bt));
    for (int64_t i = 0; i < d * bt; ++i) idx[i] = i;
    sets.push_back(std::move(idx));
  } else {
    for (int64_t t = 0; t < bt; ++t) {
      for (int64_t g = 0; g < d / s.group_size; ++g) {
        std::vector<int64_t> idx;
        for (int64_t c = 0; c < s.group_size; ++c) idx.push_back(t * d + g * s.group_size + c);
        sets.push_back(std::move(idx));
      }
    }
  }
  const double clip = s.clip;
  for (const std::vector<int64_t>& idx : sets) {
    double mn = x[idx[0]], mx = x[idx[0]], amax = 0.0;
    for (int64_t i : idx) {
      mn = std::min<double>(mn, x[i]);
      mx = std::max<double>(mx, x[i]);
      amax = std::max<double>(amax, std::fabs(x[i]));
    }
    if (s.type == KvCodecType::kFp8E4M3) {
      const double scale = clip * amax / 448.0;
      const double su = scale * (1 + kF16Ulp) + kF16Tiny;
      for (int64_t i : idx) {
        const double a = std::fabs(x[i]);
        b[i] = a / 16.0 + su / 1024.0 + std::max(0.0, a - clip * amax) + ulps(a + amax);
      }
      continue;
    }
    if (s.symmetric) {
      const double qmax = (1 << (s.bits - 1)) - 1;
      const double su = clip * amax / qmax * (1 + kF16Ulp) + kF16Tiny;
      for (int64_t i : idx) {
        const double a = std::fabs(x[i]);
        b[i] = su / 2 + std::max(0.0, a - clip * amax) + ulps(a + amax);
      }
    } else {
      const double levels = (1 << s.bits) - 1;
      const double mid = mn + 0.5 * (mx - mn), half = 0.5 * clip * (mx - mn);
      const double lo = clip < 1 ? mid - half : mn, hi = clip < 1 ? mid + half : mx;
      const double min_low = lo - (std::fabs(lo) * kF16Ulp + kF16Tiny);  // fp16 min, rounded down
      const double su = (hi - min_low) / levels * (1 + kF16Ulp) + kF16Tiny;
      for (int64_t i : idx) {
        const double outside = std::max({0.0, lo - x[i], x[i] - hi});
        b[i] = su / 2 + outside + ulps(std::fabs(x[i]) + std::fabs(lo) + std::fabs(hi));
      }
    }
  }
  return b;
}

bool SameBits(const float* a, const float* b, int64_t n) {
  return std::memcmp(a, b, static_cast<size_t>(n) * sizeof(float)) == 0;
}

struct RoundTripStats {
  int cases = 0;
  double worst_ratio = 0.0;  // max |err| / bound over cases with a nonzero bound
};

void CheckRoundTrip(const std::string& text, int64_t d, int64_t bt, Data kind, std::mt19937_64& rng,
                    RoundTripStats& stats) {
  SCOPED_TRACE(::testing::Message() << text << " d=" << d << " bt=" << bt
                                    << " data=" << DataName(kind) << " seed=" << Seed());
  std::unique_ptr<KvCodec> codec = MustCreate(text, d, bt);
  ASSERT_TRUE(codec);
  const KvCodecSpec& spec = codec->spec();
  const int64_t bytes = codec->slab_bytes();
  ASSERT_EQ(bytes, ExpectedSlabBytes(spec, d, bt));
  const std::vector<float> x = MakeData(rng, kind, d, bt);

  // Encode into a guarded buffer: nothing outside [0, slab_bytes) is written.
  constexpr int64_t kGuard = 64;
  std::vector<uint8_t> buf(static_cast<size_t>(bytes + 2 * kGuard), 0xa5);
  uint8_t* slab = buf.data() + kGuard;
  codec->Encode(x.data(), slab);
  for (int64_t i = 0; i < kGuard; ++i) {
    ASSERT_EQ(buf[i], 0xa5) << "Encode wrote before the slab";
    ASSERT_EQ(buf[kGuard + bytes + i], 0xa5) << "Encode wrote past slab_bytes";
  }

  const int64_t n = d * bt;
  std::vector<float> full(static_cast<size_t>(n + 16), -12345.0f);
  codec->Decode(slab, 0, bt, full.data());
  for (int64_t i = n; i < n + 16; ++i) ASSERT_EQ(full[i], -12345.0f) << "Decode wrote past t1";

  const std::vector<double> bound = ErrorBound(spec, x, d, bt);
  int reported = 0;
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_TRUE(std::isfinite(full[i])) << "element " << i;
    const double err = std::fabs(static_cast<double>(full[i]) - x[i]);
    if (bound[i] > 0) stats.worst_ratio = std::max(stats.worst_ratio, err / bound[i]);
    if (!(err <= bound[i]) && reported++ < 5) {
      ADD_FAILURE() << "token " << i / d << " channel " << i % d << ": x=" << x[i]
                    << " decoded=" << full[i] << " |err|=" << err << " > bound " << bound[i];
    }
  }
  if (kind == Data::kZero) {
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(full[i], 0.0f) << "zero block, element " << i;
  }
  ++stats.cases;

  // Sub-ranges decode to exactly the matching rows of the full decode.
  std::vector<std::pair<int64_t, int64_t>> ranges = {{0, 1}, {bt - 1, bt}, {0, bt}};
  std::uniform_int_distribution<int64_t> pick(0, bt - 1);
  for (int i = 0; i < 4; ++i) {
    int64_t a = pick(rng), b = pick(rng);
    if (a > b) std::swap(a, b);
    ranges.push_back({a, b + 1});
  }
  std::vector<float> part(static_cast<size_t>(n + 16));
  for (const auto& [t0, t1] : ranges) {
    std::fill(part.begin(), part.end(), -777.0f);
    codec->Decode(slab, t0, t1, part.data());
    EXPECT_TRUE(SameBits(part.data(), full.data() + t0 * d, (t1 - t0) * d))
        << "Decode [" << t0 << ", " << t1 << ") differs from the full decode";
    EXPECT_EQ(part[(t1 - t0) * d], -777.0f) << "Decode [" << t0 << ", " << t1 << ") wrote past";
  }
  // An empty range writes nothing.
  std::fill(part.begin(), part.end(), -777.0f);
  codec->Decode(slab, bt / 2, bt / 2, part.data());
  EXPECT_EQ(part[0], -777.0f);

  // An odd slab address gives the same bytes and the same values.
  std::vector<uint8_t> odd(static_cast<size_t>(bytes + 1));
  codec->Encode(x.data(), odd.data() + 1);
  EXPECT_EQ(std::memcmp(odd.data() + 1, slab, static_cast<size_t>(bytes)), 0)
      << "encoding depends on the slab's alignment";
  std::vector<float> odd_out(static_cast<size_t>(n));
  codec->Decode(odd.data() + 1, 0, bt, odd_out.data());
  EXPECT_TRUE(SameBits(odd_out.data(), full.data(), n)) << "unaligned slab decodes differently";
}

TEST(KvCodecRoundTripTest, EveryCodecWithinItsBound) {
  std::mt19937_64 rng(Seed());
  RoundTripStats stats;
  const Data kinds[] = {
      Data::kNormal, Data::kOutlierChannels, Data::kConstantRows, Data::kConstantBlock,
      Data::kTiny,   Data::kLarge,           Data::kZero};
  for (const std::string& text : AllSpecs()) {
    for (int64_t d : {64, 128}) {
      for (int64_t bt : {16, 32, 64}) {
        for (Data kind : kinds) {
          CheckRoundTrip(text, d, bt, kind, rng, stats);
          if (::testing::Test::HasFatalFailure()) return;
        }
      }
    }
  }
  std::printf("[ info ] %d round trips, worst |err| / bound = %.3f\n", stats.cases,
              stats.worst_ratio);
}

// The bounds are tight enough to mean something: on plain normal data (no clipping), every
// quantizing codec gets within a factor of two of its bound somewhere.
TEST(KvCodecRoundTripTest, BoundsAreTight) {
  std::mt19937_64 rng(Seed());
  double tightest = 1e9;
  std::string which;
  for (const std::string& text : AllSpecs()) {
    if (text.find("clip") != std::string::npos || text == "fp32") continue;
    RoundTripStats stats;
    for (int64_t bt : {16, 64}) CheckRoundTrip(text, 128, bt, Data::kNormal, rng, stats);
    EXPECT_GT(stats.worst_ratio, 0.5) << text;
    if (stats.worst_ratio < tightest) {
      tightest = stats.worst_ratio;
      which = text;
    }
  }
  std::printf("[ info ] smallest worst |err| / bound: %.3f (%s)\n", tightest, which.c_str());
}

// Odd geometries: tails shorter than a SIMD vector, small groups, head_dim not a multiple
// of 16, single-token blocks.
TEST(KvCodecRoundTripTest, OddGeometries) {
  std::mt19937_64 rng(Seed());
  RoundTripStats stats;
  struct Geo {
    const char* spec;
    int64_t d, bt;
  };
  const Geo geos[] = {
      {"int4:g8:asym", 40, 5}, {"int4:g8:sym", 24, 1},   {"int8:g4:asym", 12, 3},
      {"int3:g8:asym", 24, 7}, {"int3:g24:sym", 48, 2},  {"int2:g4:asym", 20, 9},
      {"int4:chan", 40, 5},    {"int8:chan:sym", 12, 3}, {"int3:chan", 24, 7},
      {"int2:chan", 20, 1},    {"int4:chan", 80, 33},    {"int8:g80:asym", 80, 4},
      {"int4:g16:sym", 96, 3}, {"fp8:g8", 40, 5},        {"fp8:g5", 5, 3},
      {"fp8:g16", 48, 2},      {"fp16", 7, 3},           {"bf16", 5, 2},
      {"fp32", 3, 3},          {"int2:g1:asym", 8, 2},   {"int4:chan", 600, 3},
  };
  for (const Geo& g : geos) {
    for (Data kind : {Data::kNormal, Data::kOutlierChannels, Data::kConstantRows}) {
      CheckRoundTrip(g.spec, g.d, g.bt, kind, rng, stats);
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
}

// Values far outside fp16 metadata range, infinities and NaN do not crash or produce NaN
// where the input was finite (values saturate).
TEST(KvCodecRoundTripTest, HostileInputsSaturate) {
  const int64_t d = 64, bt = 4;
  std::vector<float> x(static_cast<size_t>(d * bt), 1.0f);
  x[0] = 1e30f;
  x[1] = -1e30f;
  x[d] = std::numeric_limits<float>::infinity();
  x[2 * d] = std::nanf("");
  for (const std::string& text : AllSpecs()) {
    if (text == "fp16" || text == "bf16" || text == "fp32") continue;
    std::unique_ptr<KvCodec> codec = MustCreate(text, d, bt);
    ASSERT_TRUE(codec);
    std::vector<uint8_t> slab(static_cast<size_t>(codec->slab_bytes()));
    codec->Encode(x.data(), slab.data());
    std::vector<float> out(x.size());
    codec->Decode(slab.data(), 0, bt, out.data());
    // The last token is all ones with its own metadata (per-token groups): exact-ish.
    if (codec->spec().granularity == KvGranularity::kPerTokenGroup) {
      const float tol = 1.0f - codec->spec().clip + 1e-2f;  // clip < 1 saturates ones below 1
      for (int64_t c = 0; c < d; ++c) EXPECT_NEAR(out[3 * d + c], 1.0f, tol) << text;
    }
    for (int64_t i = 0; i < d * bt; ++i) {
      if (i == 2 * d && codec->spec().type == KvCodecType::kFp8E4M3) continue;  // NaN stays NaN
      EXPECT_FALSE(std::isnan(out[i])) << text << " element " << i;
    }
  }
}

// ---------------------------------------------------------------- exact grids

// All finite OCP E4M3 values, from the format's definition (bias 7, 3 mantissa bits,
// subnormals below 2^-6, S.1111.111 = NaN): code -> value.
std::vector<std::pair<int, double>> E4M3Grid() {
  std::vector<std::pair<int, double>> g;
  for (int code = 0; code < 256; ++code) {
    const int e = (code >> 3) & 0xf, m = code & 7;
    if (e == 15 && m == 7) continue;
    const double mag = e == 0 ? m * std::pow(2.0, -9) : (1 + m / 8.0) * std::pow(2.0, e - 7);
    g.push_back({code, (code & 0x80) ? -mag : mag});
  }
  return g;
}

// With the group's amax at exactly 448 the fp8 scale is 1, so every other value is encoded
// as itself rounded to the E4M3 grid: nearest, ties to the even code, saturating at 448.
TEST(KvCodecExactTest, Fp8IsOcpE4M3RoundToNearestEven) {
  const int64_t d = 32, bt = 64;
  std::unique_ptr<KvCodec> codec = MustCreate("fp8:g32", d, bt);
  ASSERT_TRUE(codec);
  const std::vector<std::pair<int, double>> grid = E4M3Grid();
  std::mt19937_64 rng(Seed());
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::vector<float> x(static_cast<size_t>(d * bt));
  for (int64_t t = 0; t < bt; ++t) {
    x[t * d] = t % 2 ? 448.0f : -448.0f;
    for (int64_t c = 1; c < d; ++c) {
      const int kind = static_cast<int>((t * d + c) % 4);
      if (kind == 0) {  // midpoints between neighbours: the tie cases
        const size_t k = static_cast<size_t>((u(rng) + 1) * 0.5 * (grid.size() - 1)) % grid.size();
        const double a = grid[k].second;
        double b = a;
        for (const auto& [code, v] : grid) {
          if (v > a && (b == a || v < b)) b = v;
        }
        x[t * d + c] = static_cast<float>(b == a ? a : 0.5 * (a + b));
      } else if (kind == 1) {  // tiny (subnormal codes)
        x[t * d + c] = static_cast<float>(u(rng) * 0.02);
      } else {
        x[t * d + c] = static_cast<float>(u(rng) * std::pow(2.0, 8.8 * u(rng)));  // |x| < 448
      }
    }
  }
  x[5] = 1000.0f;  // token 0's amax: its scale is 1000 / 448 (rounded up to fp16)
  x[6] = -1000.0f;
  std::vector<uint8_t> slab(static_cast<size_t>(codec->slab_bytes()));
  codec->Encode(x.data(), slab.data());
  std::vector<float> out(x.size());
  codec->Decode(slab.data(), 0, bt, out.data());
  for (int64_t t = 1; t < bt; ++t) {  // token 0 has amax 1000, checked by the bound tests
    for (int64_t c = 0; c < d; ++c) {
      const double v = x[t * d + c];
      int best_code = -1;
      double best = 0, best_err = 1e300;
      for (const auto& [code, g] : grid) {
        const double err = std::fabs(g - v);
        if (err < best_err || (err == best_err && (code & 1) == 0 && (best_code & 1) == 1)) {
          best_err = err;
          best = g;
          best_code = code;
        }
      }
      if (v == 0.0) best = 0.0;
      ASSERT_EQ(static_cast<double>(out[t * d + c]), best)
          << "token " << t << " channel " << c << " x=" << v;
      // Codes are stored [token][channel] ahead of the scales.
      ASSERT_EQ(slab[t * d + c] & 0x7f, best_code & 0x7f) << "token " << t << " channel " << c;
    }
  }
  // Fixed OCP codes: +-448 (the group maximum) is S.1111.110.
  EXPECT_EQ(slab[1 * d + 0], 0x7e);
  EXPECT_EQ(slab[2 * d + 0], 0xfe);
  EXPECT_EQ(slab[5], 0x7e);
  EXPECT_EQ(slab[6], 0xfe);
  EXPECT_NEAR(out[5], 1000.0f, 1000.0f / 1024);

  // With clip 0.5 the scale covers 224: larger magnitudes saturate there.
  std::unique_ptr<KvCodec> clipped = MustCreate("fp8:g32:clip0.5", d, bt);
  ASSERT_TRUE(clipped);
  clipped->Encode(x.data(), slab.data());
  clipped->Decode(slab.data(), 0, bt, out.data());
  for (int64_t t = 1; t < bt; ++t) {
    for (int64_t c = 0; c < d; ++c) {
      const float v = x[t * d + c];
      if (std::fabs(v) >= 224.0f) {
        ASSERT_EQ(out[t * d + c], std::copysign(224.0f, v)) << v;
      }
    }
  }
}

// Integer data whose range makes the fp16 scale exactly 1 decode exactly.
TEST(KvCodecExactTest, UniformIntegerGridsAreExact) {
  std::mt19937_64 rng(Seed());
  for (int bits : {8, 4, 3, 2}) {
    for (bool sym : {false, true}) {
      for (const char* gran : {"g32", "chan"}) {
        const std::string text = absl::StrFormat("int%d:%s:%s", bits, gran, sym ? "sym" : "asym");
        SCOPED_TRACE(text);
        const int64_t d = 64, bt = 32;
        std::unique_ptr<KvCodec> codec = MustCreate(text, d, bt);
        ASSERT_TRUE(codec);
        const int qmax = sym ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
        const int lo = sym ? -qmax : 0;
        const double shift = sym ? 0.0 : -17.0;  // asym: an offset that fp16 holds exactly
        std::uniform_int_distribution<int> q(lo, qmax);
        std::vector<float> x(static_cast<size_t>(d * bt));
        for (float& v : x) v = static_cast<float>(q(rng) + shift);
        // Pin both ends of every group and of every channel.
        for (int64_t t = 0; t < bt; ++t) {
          for (int64_t c = 0; c < d; ++c) {
            if (c % 32 == t % 32) x[t * d + c] = static_cast<float>(lo + shift);
            if ((c + 1) % 32 == t % 32) x[t * d + c] = static_cast<float>(qmax + shift);
          }
        }
        for (int64_t c = 0; c < d; ++c) {
          x[c] = static_cast<float>((c % 2 ? lo : qmax) + shift);
          x[d + c] = static_cast<float>((c % 2 ? qmax : lo) + shift);
        }
        std::vector<uint8_t> slab(static_cast<size_t>(codec->slab_bytes()));
        codec->Encode(x.data(), slab.data());
        std::vector<float> out(x.size());
        codec->Decode(slab.data(), 0, bt, out.data());
        for (size_t i = 0; i < x.size(); ++i) {
          ASSERT_EQ(out[i], x[i]) << "token " << i / d << " channel " << i % d;
        }
      }
    }
  }
}

// ---------------------------------------------------------------- throughput (printed only)

TEST(KvCodecSpeed, DecodeThroughput) {
  const int64_t d = 64, bt = 64;
  std::mt19937_64 rng(Seed());
  const std::vector<float> x = MakeData(rng, Data::kNormal, d, bt);
  std::vector<float> out(static_cast<size_t>(d * bt));
  const char* isa = std::getenv("QUANTKV_ISA");
  std::printf("[ info ] decode of one %lldx%lld slab (ISA cap: %s)\n", static_cast<long long>(bt),
              static_cast<long long>(d), isa ? isa : "none");
  for (const char* text :
       {"int8:g64:asym", "int8:g64:sym", "int4:g64:asym", "int4:g32:sym", "int4:chan",
        "int3:g64:asym", "int2:g64:asym", "int2:chan", "fp8:g64", "fp16", "bf16"}) {
    std::unique_ptr<KvCodec> codec = MustCreate(text, d, bt);
    ASSERT_TRUE(codec);
    std::vector<uint8_t> slab(static_cast<size_t>(codec->slab_bytes()));
    codec->Encode(x.data(), slab.data());
    double best = 1e30;
    float sink = 0.0f;
    for (int rep = 0; rep < 5; ++rep) {
      const int iters = 2000;
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) {
        codec->Decode(slab.data(), 0, bt, out.data());
        sink += out[i % out.size()];
      }
      const auto t1 = std::chrono::steady_clock::now();
      best = std::min(best, std::chrono::duration<double, std::nano>(t1 - t0).count() / iters);
    }
    std::printf("[ info ]   %-15s %5.2f bits/elt  %8.1f ns/slab  %6.2f Gvalues/s%s\n", text,
                codec->bits_per_element(), best, static_cast<double>(d * bt) / best,
                sink == 12345.0f ? " " : "");
  }
}

// ---------------------------------------------------------------- static scales

TEST(KvCodecStaticTest, CalibratedScalesBoundTheErrorAndCostNoBits) {
  std::mt19937_64 rng(Seed());
  for (const char* text : {"int8:static", "int4:static", "int3:static", "int2:static",
                           "int4:static:sym", "int2:static:sym"}) {
    SCOPED_TRACE(text);
    absl::StatusOr<KvCodecSpec> spec = ParseKvCodecSpec(text);
    ASSERT_TRUE(spec.ok()) << spec.status();
    const int64_t d = 64, bt = 32;
    // Per-channel ranges spanning four orders of magnitude, as real K channels do.
    std::uniform_real_distribution<float> mag(-2.0f, 2.0f), u(0.0f, 1.0f);
    KvCodecConfig cfg{*spec, d, bt, {}, {}};
    std::vector<float> lo(d), hi(d);
    const float levels = static_cast<float>((1 << spec->bits) - 1);
    const float qmax = static_cast<float>((1 << (spec->bits - 1)) - 1);
    for (int64_t c = 0; c < d; ++c) {
      const float range = std::pow(10.0f, mag(rng));
      lo[c] = spec->symmetric ? -range : -range * u(rng);
      hi[c] = spec->symmetric ? range : lo[c] + range;
      cfg.static_scale.push_back(spec->symmetric ? range / qmax : range / levels);
      if (!spec->symmetric) cfg.static_min.push_back(lo[c]);
    }
    absl::StatusOr<std::unique_ptr<KvCodec>> codec = KvCodec::Create(cfg);
    ASSERT_TRUE(codec.ok()) << codec.status();
    EXPECT_EQ((*codec)->bits_per_element(), spec->bits);  // scales are per model, not per token
    // Values inside each channel's range, plus a few outside (they saturate).
    std::vector<float> x(d * bt);
    for (int64_t t = 0; t < bt; ++t) {
      for (int64_t c = 0; c < d; ++c) {
        const float span = hi[c] - lo[c];
        x[t * d + c] = t == 0 ? hi[c] + span : t == 1 ? lo[c] - span : lo[c] + span * u(rng);
      }
    }
    std::vector<uint8_t> slab((*codec)->slab_bytes());
    (*codec)->Encode(x.data(), slab.data());
    std::vector<float> y(d * bt);
    (*codec)->Decode(slab.data(), 0, bt, y.data());
    for (int64_t t = 0; t < bt; ++t) {
      for (int64_t c = 0; c < d; ++c) {
        const double xi = std::clamp(x[t * d + c], lo[c], hi[c]);
        const double bound = cfg.static_scale[c] * (0.5 + 1e-5) + 1e-6 * std::fabs(xi);
        ASSERT_LE(std::fabs(y[t * d + c] - xi), bound) << "token " << t << " channel " << c;
      }
    }
  }
}

TEST(KvCodecStaticTest, MissingOrBadScalesAreClearErrors) {
  absl::StatusOr<KvCodecSpec> spec = ParseKvCodecSpec("int4:static");
  ASSERT_TRUE(spec.ok());
  absl::Status st = KvCodec::Create(*spec, 64, 32).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(MessageHas(st, "quantkv calibrate")) << st;
  KvCodecConfig cfg{*spec, 64, 32, std::vector<float>(64, 0.1f), std::vector<float>(63, 0.0f)};
  st = KvCodec::Create(cfg).status();
  EXPECT_TRUE(MessageHas(st, "got 64 scales, 63 minima")) << st;
  cfg.static_min.push_back(0.0f);
  cfg.static_scale[5] = std::nanf("");
  st = KvCodec::Create(cfg).status();
  EXPECT_TRUE(MessageHas(st, "channel 5")) << st;
  cfg.static_scale[5] = -1.0f;
  EXPECT_FALSE(KvCodec::Create(cfg).ok());
  cfg.static_scale[5] = 0.1f;
  EXPECT_TRUE(KvCodec::Create(cfg).ok());
}

// ---------------------------------------------------------------- dense-and-sparse

TEST(KvCodecOutlierTest, ParsesAndRefuses) {
  absl::StatusOr<KvCodecSpec> s = ParseKvCodecSpec("int2:out1");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_FLOAT_EQ(s->outlier_pct, 1.0f);
  EXPECT_EQ(s->ToString(), "int2:g64:asym:out1");
  EXPECT_FLOAT_EQ(ParseKvCodecSpec(s->ToString())->outlier_pct, 1.0f);
  for (const char* bad :
       {"int4:out0", "int4:out11", "int4:outx", "fp8:out1", "int4:out1:out2", "fp16:out1"}) {
    EXPECT_FALSE(ParseKvCodecSpec(bad).ok()) << bad;
  }
}

TEST(KvCodecOutlierTest, KeepsTheLargestValuesAndShrinksTheRestsError) {
  std::mt19937_64 rng(Seed());
  const int64_t d = 64, bt = 32;
  std::unique_ptr<KvCodec> plain = MustCreate("int2:g64", d, bt);
  std::unique_ptr<KvCodec> sparse = MustCreate("int2:g64:out1", d, bt);
  ASSERT_TRUE(plain && sparse);
  // 1% of 2048 values: 21 (fp16 position + value, 4 bytes each).
  EXPECT_EQ(sparse->slab_bytes(), plain->slab_bytes() + 4 * 21);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::uniform_int_distribution<int64_t> pos(0, d * bt - 1);
  double e_plain = 0, e_sparse = 0;
  for (int trial = 0; trial < 10; ++trial) {
    std::vector<float> x(d * bt);
    for (float& v : x) v = n(rng);
    std::vector<int64_t> planted;
    for (int i = 0; i < 15; ++i) {  // fewer than the outlier budget
      planted.push_back(pos(rng));
      x[planted.back()] = (i % 2 ? 1 : -1) * (20.0f + i);
    }
    auto roundtrip = [&](const KvCodec& c, int64_t t0, int64_t t1) {
      std::vector<uint8_t> slab(c.slab_bytes());
      std::vector<float> y((t1 - t0) * d);
      c.Encode(x.data(), slab.data());
      c.Decode(slab.data(), t0, t1, y.data());
      return y;
    };
    const std::vector<float> yp = roundtrip(*plain, 0, bt), ys = roundtrip(*sparse, 0, bt);
    for (int64_t p : planted) {
      EXPECT_NEAR(ys[p], x[p], std::fabs(x[p]) / 1024) << "outlier at " << p;
    }
    for (int64_t i = 0; i < d * bt; ++i) {
      e_plain += (yp[i] - x[i]) * (yp[i] - x[i]);
      e_sparse += (ys[i] - x[i]) * (ys[i] - x[i]);
    }
    // A sub-range decodes to the same rows as the full decode.
    const std::vector<float> part = roundtrip(*sparse, 5, 17);
    for (int64_t i = 0; i < 12 * d; ++i) ASSERT_EQ(part[i], ys[5 * d + i]);
  }
  EXPECT_LT(e_sparse, 0.5 * e_plain) << "sparse " << e_sparse << " plain " << e_plain;
}

}  // namespace
}  // namespace quantkv::kernels
