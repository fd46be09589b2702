// The activation codecs of the compressed all-reduce (kernels/comm_codec.h), without MPI:
// round trips within the analytic bound on random data with planted outliers, outliers
// exact in fp16, the payload format, and the configs and payloads that must be refused.
// Also the decorator's chunking and its one-rank behaviour.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "kernels/comm_codec.h"
#include "kernels/fp16.h"
#include "runtime/comm/compressed_communicator.h"

namespace quantkv::kernels {
namespace {

CommCodecConfig Config(CommCodecType type, int group, int outliers = 0) {
  CommCodecConfig c;
  c.type = type;
  c.group_size = group;
  c.outliers = outliers;
  return c;
}

std::unique_ptr<CommCodec> Make(const CommCodecConfig& c) {
  absl::StatusOr<std::unique_ptr<CommCodec>> codec = CommCodec::Create(c);
  EXPECT_TRUE(codec.ok()) << codec.status();
  return codec.ok() ? std::move(*codec) : nullptr;
}

// Activation-like data: N(0, 1) with every 97th value 40x larger (the outlier channels of
// LLM residual streams), and a few exact zeros.
std::vector<float> Activations(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    x[i] = normal(rng);
    if (i % 97 == 13) x[i] *= 40.0f;
    if (i % 1001 == 7) x[i] = 0.0f;
  }
  return x;
}

struct RoundTrip {
  std::vector<uint8_t> payload;
  std::vector<float> out;
};

RoundTrip EncodeDecode(CommCodec& codec, const std::vector<float>& x) {
  const int64_t n = static_cast<int64_t>(x.size());
  RoundTrip r;
  r.payload.assign(static_cast<size_t>(codec.PayloadBytes(n)), 0xcd);
  codec.Encode(x.data(), n, r.payload.data());
  r.out.assign(x.size(), -12345.0f);
  const absl::Status s =
      codec.Decode(r.payload.data(), static_cast<int64_t>(r.payload.size()), r.out.data(), n);
  EXPECT_TRUE(s.ok()) << s;
  return r;
}

constexpr CommCodecType kTypes[] = {CommCodecType::kInt8, CommCodecType::kFp8E4M3,
                                    CommCodecType::kInt4};

// Every codec, group size and outlier count: each value within its analytic bound, and the
// bound not vacuous (some value comes within a factor 3 of it: a bound 100x too loose
// would let a broken quantizer through).
TEST(CommCodecTest, RoundTripWithinTheAnalyticBound) {
  for (CommCodecType type : kTypes) {
    for (int group : {32, 40, 64, 128}) {
      for (int outliers : {0, 1, group / 8}) {
        const CommCodecConfig cfg = Config(type, group, outliers);
        SCOPED_TRACE(cfg.ToString());
        std::unique_ptr<CommCodec> codec = Make(cfg);
        ASSERT_NE(codec, nullptr);
        // Not a multiple of any group size: the last group is padded.
        const std::vector<float> x = Activations(20011, group * 7 + outliers);
        const RoundTrip r = EncodeDecode(*codec, x);
        std::vector<double> bound(x.size());
        codec->ErrorBounds(x.data(), static_cast<int64_t>(x.size()), bound.data());
        double worst_ratio = 0.0;
        for (size_t i = 0; i < x.size(); ++i) {
          const double err = std::fabs(static_cast<double>(r.out[i]) - x[i]);
          ASSERT_LE(err, bound[i]) << "value " << i << " = " << x[i] << " decoded " << r.out[i];
          worst_ratio = std::max(worst_ratio, err / bound[i]);
        }
        EXPECT_GT(worst_ratio, 1.0 / 3.0);
      }
    }
  }
}

// Past one codes-then-scales segment (kCommCodecSegmentGroups groups) the layout repeats;
// a segment offset off by one would decode garbage from the second segment on.
TEST(CommCodecTest, SeveralSegments) {
  for (CommCodecType type : kTypes) {
    const CommCodecConfig cfg = Config(type, 32, 2);
    SCOPED_TRACE(cfg.ToString());
    std::unique_ptr<CommCodec> codec = Make(cfg);
    const int64_t n = 2 * kCommCodecSegmentGroups * 32 + 1000 + 5;
    const std::vector<float> x = Activations(n, 3);
    const RoundTrip r = EncodeDecode(*codec, x);
    std::vector<double> bound(x.size());
    codec->ErrorBounds(x.data(), n, bound.data());
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_LE(std::fabs(static_cast<double>(r.out[i]) - x[i]), bound[i]) << i;
    }
  }
}

// The bound formulas at points worked by hand.
TEST(CommCodecTest, ElementErrorBoundValues) {
  std::unique_ptr<CommCodec> int8 = Make(Config(CommCodecType::kInt8, 64));
  std::unique_ptr<CommCodec> int4 = Make(Config(CommCodecType::kInt4, 64));
  std::unique_ptr<CommCodec> fp8 = Make(Config(CommCodecType::kFp8E4M3, 64));
  // amax 127 -> scale 1 (+ one fp16 step) -> half a step.
  EXPECT_NEAR(int8->ElementErrorBound(127.0, 3.0, false), 0.5, 0.5 * 0x1p-9);
  EXPECT_NEAR(int4->ElementErrorBound(7.0, 3.0, false), 0.5, 0.5 * 0x1p-9);
  // fp8: 2^-4 relative plus the subnormal floor 2^-10 * scale (scale 1 for amax 448).
  EXPECT_NEAR(fp8->ElementErrorBound(448.0, 100.0, false), 100.0 / 16 + 1.0 / 1024, 0.01);
  // fp16 outliers: half an fp16 ulp.
  EXPECT_DOUBLE_EQ(int8->ElementErrorBound(1.0, 1000.0, true), 1000.0 * 0x1p-11);
  // Beyond fp16: no bound.
  EXPECT_TRUE(std::isinf(int8->ElementErrorBound(127.0 * 70000.0, 1.0, false)));
  EXPECT_TRUE(std::isinf(int8->ElementErrorBound(1.0, 70000.0, true)));
}

// Planted outliers (at most `outliers` per group, far above the rest) come back exactly as
// their fp16 roundings, and the rest within the bound of the group *without* them, checked
// against the planted positions rather than the codec's own choice. Without outlier slots
// the integer codecs err several times more on the same values (their step follows the
// group's largest value); FP8's error is relative, so there it barely changes.
TEST(CommCodecTest, OutliersAreExactInFp16) {
  for (CommCodecType type : kTypes) {
    const int group = 64, k = 2;
    const CommCodecConfig cfg = Config(type, group, k);
    SCOPED_TRACE(cfg.ToString());
    std::unique_ptr<CommCodec> with = Make(cfg);
    std::unique_ptr<CommCodec> without = Make(Config(type, group, 0));
    const int64_t n = 64 * 50;
    std::mt19937 rng(11);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(n);
    std::vector<bool> planted(n, false);
    for (int64_t i = 0; i < n; ++i) x[i] = std::clamp(normal(rng), -3.0f, 3.0f);
    for (int64_t g = 0; g < n / group; ++g) {
      for (int j = 0; j < k; ++j) {
        const int64_t i = g * group + (g * 13 + j * 29) % group;
        x[i] = (j % 2 ? -1.0f : 1.0f) * (200.0f + 3.3f * g + 0.123f * j);
        planted[i] = true;
      }
    }
    const RoundTrip a = EncodeDecode(*with, x);
    const RoundTrip b = EncodeDecode(*without, x);
    double worst_with = 0.0, worst_without = 0.0;
    for (int64_t g = 0; g < n / group; ++g) {
      double inlier_amax = 0.0;
      for (int64_t i = g * group; i < (g + 1) * group; ++i) {
        if (!planted[i]) inlier_amax = std::max(inlier_amax, std::fabs(double{x[i]}));
      }
      for (int64_t i = g * group; i < (g + 1) * group; ++i) {
        if (planted[i]) {
          ASSERT_EQ(a.out[i], Fp16ToFp32(Fp32ToFp16(x[i]))) << i;
          continue;
        }
        const double err = std::fabs(double{a.out[i]} - x[i]);
        ASSERT_LE(err, with->ElementErrorBound(inlier_amax, std::fabs(x[i]), false)) << i;
        worst_with = std::max(worst_with, err);
        worst_without = std::max(worst_without, std::fabs(double{b.out[i]} - x[i]));
      }
    }
    if (type != CommCodecType::kFp8E4M3) {
      EXPECT_GT(worst_without, 4.0 * worst_with);
    }
  }
}

TEST(CommCodecTest, PayloadSizeAndHeader) {
  std::unique_ptr<CommCodec> int8 = Make(Config(CommCodecType::kInt8, 64));
  std::unique_ptr<CommCodec> int4 = Make(Config(CommCodecType::kInt4, 32, 2));
  std::unique_ptr<CommCodec> fp8 = Make(Config(CommCodecType::kFp8E4M3, 128, 16));
  EXPECT_EQ(int8->PayloadBytes(0), 16);
  EXPECT_EQ(int8->PayloadBytes(64), 16 + 66);
  EXPECT_EQ(int8->PayloadBytes(65), 16 + 2 * 66);
  EXPECT_EQ(int4->PayloadBytes(100), 16 + 4 * (16 + 2 + 6));
  EXPECT_EQ(fp8->PayloadBytes(128), 16 + 128 + 2 + 48);
  EXPECT_DOUBLE_EQ(int8->BitsPerValue(), 8.25);
  EXPECT_DOUBLE_EQ(int4->BitsPerValue(), 6.0);

  const std::vector<float> x = Activations(1000, 5);
  std::vector<uint8_t> p(static_cast<size_t>(int4->PayloadBytes(1000)));
  int4->Encode(x.data(), 1000, p.data());
  absl::StatusOr<CommPayloadHeader> h =
      ReadCommPayloadHeader(p.data(), static_cast<int64_t>(p.size()));
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->n, 1000);
  EXPECT_EQ(h->config.ToString(), "int4:g32:out2");
  // Deterministic: the same input gives the same bytes.
  std::vector<uint8_t> q(p.size());
  int4->Encode(x.data(), 1000, q.data());
  EXPECT_EQ(p, q);
}

TEST(CommCodecTest, ParseAndPrint) {
  for (const char* text : {"int8:g64:out0", "int4:g32:out2", "fp8:g128:out16", "int8:g40:out5"}) {
    absl::StatusOr<CommCodecConfig> c = ParseCommCodecConfig(text);
    ASSERT_TRUE(c.ok()) << text << ": " << c.status();
    EXPECT_EQ(c->ToString(), text);
  }
  absl::StatusOr<CommCodecConfig> d = ParseCommCodecConfig("int4");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->type, CommCodecType::kInt4);
  EXPECT_EQ(d->group_size, 64);
  EXPECT_EQ(d->outliers, 2);
  EXPECT_EQ(ParseCommCodecConfig("fp8:out0")->ToString(), "fp8:g64:out0");
}

TEST(CommCodecTest, BadConfigsAreRefusedWithTheReason) {
  struct Case {
    const char* text;
    const char* message_part;
  };
  for (const Case& c :
       {Case{"int3", "unknown codec 'int3'"}, Case{"", "unknown codec ''"},
        Case{"int8:g16", "group size 16 must be a multiple of 8 in [32, 128]"},
        Case{"int8:g256", "group size 256"}, Case{"int8:g36", "group size 36"},
        Case{"int8:g", "unknown option 'g'"}, Case{"int8:g-32", "unknown option 'g-32'"},
        Case{"int8:x2", "unknown option 'x2'"},
        Case{"int4:g32:out5", "5 outliers per group outside [0, group size / 8 = 4]"},
        Case{"none", "unknown codec 'none'"}}) {
    absl::StatusOr<CommCodecConfig> r = ParseCommCodecConfig(c.text);
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(c.message_part), std::string::npos)
        << c.text << ": " << r.status().message();
  }
  EXPECT_FALSE(CommCodec::Create(Config(CommCodecType::kInt8, 64, -1)).ok());
  EXPECT_FALSE(CommCodec::Create(Config(static_cast<CommCodecType>(9), 64)).ok());
}

// A payload that does not match what the receiver expects is an error, not a guess.
TEST(CommCodecTest, DecodeRefusesMismatchedOrDamagedPayloads) {
  std::unique_ptr<CommCodec> codec = Make(Config(CommCodecType::kInt8, 64, 1));
  const std::vector<float> x = Activations(300, 9);
  std::vector<uint8_t> p(static_cast<size_t>(codec->PayloadBytes(300)));
  codec->Encode(x.data(), 300, p.data());
  std::vector<float> out(300);
  const int64_t bytes = static_cast<int64_t>(p.size());
  EXPECT_TRUE(codec->Decode(p.data(), bytes, out.data(), 300).ok());
  EXPECT_FALSE(codec->Decode(p.data(), bytes, out.data(), 299).ok());      // other n
  EXPECT_FALSE(codec->Decode(p.data(), bytes - 1, out.data(), 300).ok());  // truncated
  std::unique_ptr<CommCodec> other = Make(Config(CommCodecType::kInt8, 64, 0));
  absl::Status s = other->Decode(p.data(), bytes, out.data(), 300);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("int8:g64:out1"), std::string::npos) << s.message();
  std::vector<uint8_t> bad = p;
  bad[0] = 'X';  // magic
  EXPECT_FALSE(codec->Decode(bad.data(), bytes, out.data(), 300).ok());
  bad = p;
  bad[bytes - 5 * 3] = 64;  // the first outlier index: outside its group of 64
  EXPECT_FALSE(codec->Decode(bad.data(), bytes, out.data(), 300).ok());
}

// A non-finite input poisons its group (NaN) and no other; zeros stay exact zeros.
TEST(CommCodecTest, NonFiniteGroupsDecodeToNaN) {
  for (CommCodecType type : kTypes) {
    for (int outliers : {0, 2}) {
      std::unique_ptr<CommCodec> codec = Make(Config(type, 32, outliers));
      std::vector<float> x = Activations(32 * 4, 1);
      x[40] = std::numeric_limits<float>::infinity();
      x[70] = std::numeric_limits<float>::quiet_NaN();
      std::fill(x.begin() + 96, x.end(), 0.0f);
      const RoundTrip r = EncodeDecode(*codec, x);
      for (int i = 0; i < 32; ++i) EXPECT_TRUE(std::isfinite(r.out[i])) << i;
      for (int i = 32; i < 96; ++i) EXPECT_TRUE(std::isnan(r.out[i])) << i;
      for (int i = 96; i < 128; ++i) EXPECT_EQ(BitsFromFp32(r.out[i]), 0u) << i;
    }
  }
}

}  // namespace
}  // namespace quantkv::kernels

namespace quantkv {
namespace {

// Chunks tile [0, n) in order, start on group boundaries, and the first is the longest
// (the padded size of the reduced-chunk all-gather).
TEST(CompressedCommunicatorTest, ChunksTileTheVector) {
  for (int ranks : {1, 2, 3, 5}) {
    for (int64_t n : {0, 1, 63, 64, 65, 200, 1000, 576 * 7}) {
      int64_t at = 0;
      int64_t first = -1;
      for (int r = 0; r < ranks; ++r) {
        const CompressedCommunicator::Chunk c = CompressedCommunicator::ChunkOf(n, ranks, 64, r);
        EXPECT_EQ(c.begin, at) << n << " " << r;
        EXPECT_TRUE(c.begin == n || c.begin % 64 == 0);
        EXPECT_GE(c.end, c.begin);
        if (first < 0) first = c.end - c.begin;
        EXPECT_LE(c.end - c.begin, first);
        at = c.end;
      }
      EXPECT_EQ(at, n);
    }
  }
}

// One rank has nothing to exchange: the values stay as they are, and the stats count the
// call as uncompressed with no bytes sent.
TEST(CompressedCommunicatorTest, OneRankIsTheIdentity) {
  LocalCommunicator local;
  CompressedCommConfig cfg;
  cfg.min_elements = 0;
  absl::StatusOr<std::unique_ptr<CompressedCommunicator>> c =
      CompressedCommunicator::Create(local, cfg);
  ASSERT_TRUE(c.ok()) << c.status();
  std::vector<float> x = kernels::Activations(5000, 2);
  const std::vector<float> want = x;
  ASSERT_TRUE((*c)->AllReduceSum(x.data(), 5000).ok());
  EXPECT_EQ(x, want);
  EXPECT_EQ((*c)->stats().calls, 1);
  EXPECT_EQ((*c)->stats().compressed_calls, 0);
  EXPECT_EQ((*c)->stats().wire_bytes, 0);
  EXPECT_EQ((*c)->name(), "local+int8:g64:out2");
}

TEST(CompressedCommunicatorTest, BadSettingsAreRefused) {
  LocalCommunicator local;
  CompressedCommConfig cfg;
  cfg.codec.group_size = 20;
  absl::StatusOr<std::unique_ptr<CompressedCommunicator>> c =
      CompressedCommunicator::Create(local, cfg);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("group size 20"), std::string::npos) << c.status();
  cfg = {};
  cfg.min_elements = -1;
  EXPECT_FALSE(CompressedCommunicator::Create(local, cfg).ok());
  cfg = {};
  cfg.exact_layers = {3, -2};
  EXPECT_FALSE(CompressedCommunicator::Create(local, cfg).ok());
}

}  // namespace
}  // namespace quantkv
