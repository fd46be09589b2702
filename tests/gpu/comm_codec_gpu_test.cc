// The compressed exchange's device pack / unpack (cuda::CommEncode / CommDecode) against
// CommCodec, bit for bit.
//
// Without a GPU: the host-side argument checks (bad configs, payloads shorter than a header,
// null pointers, bad counts) fail with the CPU's errors before any CUDA call.
// On a GPU: for int8 / int4 / fp8, group sizes 32, 40, 64 and 128, 0, 2 and 4 outliers, n
// from 1 to several segments of groups: the device payload equals the CPU's byte for byte
// (written at an odd address, nothing written around it), and decoding the CPU's payload on
// the device gives CommCodec::Decode's bits. The data are random with planted outliers, ties,
// subnormals, zero groups, values beyond the fp16 range and groups holding NaN (of either
// sign, with payload bits) or infinities. Malformed payloads fail as on the CPU, leaving the
// output untouched.
//
// Inputs are random per run (seed printed); QUANTKV_TEST_SEED replays one.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "kernels/comm_codec.h"
#include "tests/gpu/gpu_test_util.h"

namespace quantkv::kernels {
namespace {

using gpu_test::DeviceBuffer;

float FromBits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

CommCodecConfig Config(CommCodecType type, int gs, int k) {
  CommCodecConfig c;
  c.type = type;
  c.group_size = gs;
  c.outliers = k;
  return c;
}

std::unique_ptr<CommCodec> MakeCodec(const CommCodecConfig& c) {
  absl::StatusOr<std::unique_ptr<CommCodec>> codec = CommCodec::Create(c);
  EXPECT_TRUE(codec.ok()) << codec.status();
  return codec.ok() ? std::move(*codec) : nullptr;
}

// Random activations per group at scales from 1e-3 to 1e3, with what stresses the codec:
// planted outliers, equal magnitudes of both signs (the lower index must win), all-zero and
// subnormal groups, a value beyond 65504, and (given enough groups) NaN and infinities.
std::vector<float> MakeInput(int64_t n, int gs, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n));
  const int64_t groups = (n + gs - 1) / gs;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t first = g * gs;
    const int64_t len = std::min<int64_t>(gs, n - first);
    float* v = x.data() + first;
    const float scale = std::pow(10.0f, -3.0f + 6.0f * uni(rng));
    for (int64_t c = 0; c < len; ++c) v[c] = normal(rng) * scale;
    const int kind = static_cast<int>(g % 16);
    if (kind == 3) {  // planted outliers
      const int count = 1 + static_cast<int>(uni(rng) * 5);
      for (int i = 0; i < count; ++i) {
        v[static_cast<int64_t>(uni(rng) * len) % len] *= 50.0f + 450.0f * uni(rng);
      }
    } else if (kind == 5) {  // ties: the same |x| at several places, both signs
      const float t = 4.0f * scale;
      for (int64_t c = 1; c < len; c += 3) v[c] = (c & 2) ? -t : t;
    } else if (kind == 7) {
      for (int64_t c = 0; c < len; ++c) v[c] = 0.0f;
      if (len > 2) v[2] = -0.0f;
    } else if (kind == 9) {  // fp32 subnormals and fp16 subnormals
      for (int64_t c = 0; c < len; ++c) v[c] = normal(rng) * ((c & 1) ? 1e-40f : 1e-6f);
    } else if (kind == 11) {  // beyond fp16: an inf outlier, or a saturated scale
      v[len / 2] = 1e6f;
      if (len > 3) v[len / 3] = -7e4f;
    } else if (kind == 13) {  // a few huge values, more than the outliers taken
      for (int64_t c = 0; c < len; c += 5) v[c] *= 1000.0f;
    }
  }
  // Non-finite groups: the last (also the zero-padded one), then a few more when there are
  // enough groups that finite ones remain.
  if (groups >= 2) x[static_cast<size_t>(n - 1)] = std::numeric_limits<float>::quiet_NaN();
  if (groups >= 6) {
    x[static_cast<size_t>(1 * gs + 3)] = FromBits(0xffc12345u);  // -NaN with payload bits
    x[static_cast<size_t>(1 * gs + 7)] = std::numeric_limits<float>::infinity();
    x[static_cast<size_t>(2 * gs + 0)] = -std::numeric_limits<float>::infinity();
    x[static_cast<size_t>(2 * gs + 5)] = std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < gs; ++c) x[static_cast<size_t>(4 * gs + c)] = FromBits(0x7fa00001u);
  }
  return x;
}

// Names the part of a payload a byte offset falls in (for failure messages).
std::string Where(const CommCodecConfig& c, int64_t n, int64_t offset) {
  if (offset < kCommCodecHeaderBytes) return "header";
  const int64_t groups = (n + c.group_size - 1) / c.group_size;
  const int64_t code_bytes = c.group_size * (c.type == CommCodecType::kInt4 ? 4 : 8) / 8;
  const int64_t record = code_bytes + 2;
  int64_t o = offset - kCommCodecHeaderBytes;
  if (o < groups * record) {
    const int64_t seg = o / (kCommCodecSegmentGroups * record);
    const int64_t m = std::min(kCommCodecSegmentGroups, groups - seg * kCommCodecSegmentGroups);
    const int64_t in = o - seg * kCommCodecSegmentGroups * record;
    const int64_t g0 = seg * kCommCodecSegmentGroups;
    if (in < m * code_bytes) {
      return absl::StrFormat("codes of group %d, byte %d", g0 + in / code_bytes, in % code_bytes);
    }
    return absl::StrFormat("scale of group %d", g0 + (in - m * code_bytes) / 2);
  }
  o -= groups * record;
  if (o < groups * c.outliers) {
    return absl::StrFormat("outlier index %d of group %d", o % c.outliers, o / c.outliers);
  }
  o -= groups * c.outliers;
  return absl::StrFormat("outlier value %d of group %d", (o / 2) % c.outliers,
                         (o / 2) / c.outliers);
}

// ---------------------------------------------------------------- host-only argument checks

TEST(CommCodecGpuHostTest, BadConfigsFailAsCreateDoesBeforeAnyCudaCall) {
  const CommCodecConfig bad[] = {
      Config(CommCodecType::kInt8, 30, 0),  Config(CommCodecType::kInt8, 136, 0),
      Config(CommCodecType::kInt4, 60, 0),  Config(CommCodecType::kFp8E4M3, 128, 17),
      Config(CommCodecType::kInt8, 64, -1), Config(static_cast<CommCodecType>(9), 64, 2),
  };
  uint8_t payload[64] = {};
  float x[4] = {};
  for (const CommCodecConfig& c : bad) {
    SCOPED_TRACE(c.ToString());
    const absl::Status want = CommCodec::Create(c).status();
    ASSERT_FALSE(want.ok());
    // Host pointers: nothing may be dereferenced or handed to CUDA.
    EXPECT_EQ(cuda::CommEncode(c, x, 4, payload, nullptr), want);
    EXPECT_EQ(cuda::CommDecode(c, payload, sizeof(payload), x, 4, nullptr), want);
  }
}

TEST(CommCodecGpuHostTest, ShortPayloadsFailAsOnTheCpu) {
  const CommCodecConfig c = Config(CommCodecType::kInt8, 64, 2);
  std::unique_ptr<CommCodec> codec = MakeCodec(c);
  ASSERT_NE(codec, nullptr);
  uint8_t payload[16] = {'Q', 'K', 'V', 'A', 1, 1, 64, 2};
  float out[4] = {};
  for (const int64_t bytes : {int64_t{0}, int64_t{1}, int64_t{15}, int64_t{-3}}) {
    SCOPED_TRACE(bytes);
    const absl::Status want = codec->Decode(payload, bytes, out, 4);
    ASSERT_FALSE(want.ok());
    EXPECT_EQ(cuda::CommDecode(c, payload, bytes, out, 4, nullptr), want);
  }
}

TEST(CommCodecGpuHostTest, NullPointersAndBadCountsFailOnTheHost) {
  const CommCodecConfig c = Config(CommCodecType::kFp8E4M3, 32, 2);
  uint8_t payload[64] = {};
  float x[4] = {};
  EXPECT_EQ(cuda::CommEncode(c, x, -1, payload, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::CommEncode(c, x, (int64_t{1} << 40) + 1, payload, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::CommEncode(c, nullptr, 4, payload, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::CommEncode(c, x, 4, nullptr, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::CommDecode(c, nullptr, 64, x, 4, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::CommDecode(c, payload, 64, nullptr, 4, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------- on the device

class Stream {
 public:
  Stream() { EXPECT_EQ(cudaStreamCreate(&s_), cudaSuccess); }
  ~Stream() { cudaStreamDestroy(s_); }
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

using Param = std::tuple<CommCodecType, int, int>;

class CommCodecGpuTest : public ::testing::TestWithParam<Param> {};

TEST_P(CommCodecGpuTest, PayloadBytesAndDecodedBitsEqualTheCpus) {
  QKV_SKIP_WITHOUT_CUDA_DEVICE();
  const auto [type, gs, k] = GetParam();
  const CommCodecConfig c = Config(type, gs, k);
  std::unique_ptr<CommCodec> codec = MakeCodec(c);
  ASSERT_NE(codec, nullptr);
  std::mt19937_64 rng(gpu_test::FreshSeed());
  Stream stream;
  constexpr uint8_t kFill = 0xa5;
  const int64_t seg_values = kCommCodecSegmentGroups * gs;
  for (const int64_t n : {int64_t{1}, int64_t{63}, int64_t{64}, int64_t{1000},
                          kCommCodecSegmentGroups * 64 + 5, 2 * seg_values + 7}) {
    SCOPED_TRACE(absl::StrFormat("%s, n = %d", c.ToString(), n));
    const std::vector<float> x = MakeInput(n, gs, rng);
    const int64_t bytes = codec->PayloadBytes(n);
    std::vector<uint8_t> want(static_cast<size_t>(bytes));
    codec->Encode(x.data(), n, want.data());

    // Encode at an odd address between fill bytes.
    const DeviceBuffer dx(x);
    DeviceBuffer dpay(static_cast<size_t>(bytes) + 2);
    ASSERT_EQ(cudaMemset(dpay.get(), kFill, dpay.bytes()), cudaSuccess);
    uint8_t* dp = dpay.as<uint8_t>() + 1;
    ASSERT_TRUE(cuda::CommEncode(c, dx.f32(), n, dp, stream.get()).ok());
    ASSERT_EQ(cudaStreamSynchronize(stream.get()), cudaSuccess);
    const std::vector<uint8_t> got = dpay.ToHost<uint8_t>();
    EXPECT_EQ(got.front(), kFill) << "written before the payload";
    EXPECT_EQ(got.back(), kFill) << "written after the payload";
    for (int64_t i = 0; i < bytes; ++i) {
      if (got[static_cast<size_t>(i) + 1] != want[static_cast<size_t>(i)]) {
        ADD_FAILURE() << "payload byte " << i << " (" << Where(c, n, i) << "): device "
                      << int{got[static_cast<size_t>(i) + 1]} << ", CPU "
                      << int{want[static_cast<size_t>(i)]};
        break;
      }
    }

    // Decode the CPU's payload (so that a decoder bug shows apart from an encoder one),
    // again at an odd address, into a buffer with a fill float after the n values.
    std::vector<float> want_out(static_cast<size_t>(n));
    ASSERT_TRUE(codec->Decode(want.data(), bytes, want_out.data(), n).ok());
    ASSERT_EQ(cudaMemcpy(dp, want.data(), static_cast<size_t>(bytes), cudaMemcpyHostToDevice),
              cudaSuccess);
    DeviceBuffer dout(static_cast<size_t>(n + 1) * sizeof(float));
    ASSERT_EQ(cudaMemset(dout.get(), kFill, dout.bytes()), cudaSuccess);
    const absl::Status st = cuda::CommDecode(c, dp, bytes, dout.f32(), n, stream.get());
    ASSERT_TRUE(st.ok()) << st;
    ASSERT_EQ(cudaStreamSynchronize(stream.get()), cudaSuccess);
    const std::vector<float> out = dout.ToHost<float>();
    EXPECT_EQ(Bits(out.back()), 0xa5a5a5a5u) << "written after the output";
    int64_t bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t g = Bits(out[static_cast<size_t>(i)]);
      const uint32_t w = Bits(want_out[static_cast<size_t>(i)]);
      if (g != w && ++bad <= 5) {
        ADD_FAILURE() << absl::StrFormat(
            "value %d (group %d, channel %d): device %g (0x%08x), CPU %g (0x%08x)", i, i / gs,
            i % gs, out[static_cast<size_t>(i)], g, want_out[static_cast<size_t>(i)], w);
      }
    }
    EXPECT_EQ(bad, 0) << "decoded values differ";
  }
}

INSTANTIATE_TEST_SUITE_P(
    All, CommCodecGpuTest,
    ::testing::Combine(::testing::Values(CommCodecType::kInt8, CommCodecType::kInt4,
                                         CommCodecType::kFp8E4M3),
                       ::testing::Values(32, 40, 64, 128), ::testing::Values(0, 2, 4)),
    [](const ::testing::TestParamInfo<Param>& info) {
      std::string name =
          Config(std::get<0>(info.param), std::get<1>(info.param), std::get<2>(info.param))
              .ToString();
      for (char& ch : name) {
        if (ch == ':') ch = '_';
      }
      return name;
    });

// Decoding a damaged payload fails with the CPU's status and leaves the output alone.
TEST(CommCodecGpuErrorTest, MalformedPayloadsFailAsOnTheCpu) {
  QKV_SKIP_WITHOUT_CUDA_DEVICE();
  const CommCodecConfig c = Config(CommCodecType::kInt4, 32, 2);
  std::unique_ptr<CommCodec> codec = MakeCodec(c);
  ASSERT_NE(codec, nullptr);
  std::mt19937_64 rng(gpu_test::FreshSeed());
  const int64_t n = 1000;
  const std::vector<float> x = MakeInput(n, c.group_size, rng);
  const int64_t bytes = codec->PayloadBytes(n);
  std::vector<uint8_t> good(static_cast<size_t>(bytes));
  codec->Encode(x.data(), n, good.data());
  const int64_t groups = (n + c.group_size - 1) / c.group_size;
  const int64_t idx0 = kCommCodecHeaderBytes + groups * (c.group_size / 2 + 2);

  struct Case {
    std::string what;
    std::vector<uint8_t> payload;
    int64_t bytes;
    CommCodecConfig config;
    int64_t n;
  };
  std::vector<Case> cases;
  cases.push_back({"truncated", good, bytes - 1, c, n});
  cases.push_back({"header only", good, kCommCodecHeaderBytes, c, n});
  cases.push_back({"bad magic", good, bytes, c, n});
  cases.back().payload[1] = 'X';
  cases.push_back({"bad version", good, bytes, c, n});
  cases.back().payload[4] = 2;
  cases.push_back({"bad header group size", good, bytes, c, n});
  cases.back().payload[6] = 33;
  cases.push_back({"other config", good, bytes, Config(CommCodecType::kInt8, 32, 2), n});
  cases.push_back({"other outliers", good, bytes, Config(CommCodecType::kInt4, 32, 1), n});
  cases.push_back({"other n", good, bytes, c, n - 1});
  cases.push_back({"negative n", good, bytes, c, -5});
  cases.push_back({"bad outlier index", good, bytes, c, n});
  cases.back().payload[static_cast<size_t>(idx0 + 7)] = 32;
  cases.back().payload[static_cast<size_t>(idx0 + 11)] = 200;
  cases.push_back({"bad last outlier index", good, bytes, c, n});
  cases.back().payload[static_cast<size_t>(idx0 + groups * c.outliers - 1)] = 255;

  Stream stream;
  for (const Case& t : cases) {
    SCOPED_TRACE(t.what);
    std::unique_ptr<CommCodec> cpu = MakeCodec(t.config);
    ASSERT_NE(cpu, nullptr);
    std::vector<float> cpu_out(static_cast<size_t>(n) + 1);
    const absl::Status want = cpu->Decode(t.payload.data(), t.bytes, cpu_out.data(), t.n);
    ASSERT_FALSE(want.ok());
    const DeviceBuffer dpay(t.payload);
    DeviceBuffer dout(static_cast<size_t>(n + 1) * sizeof(float));
    ASSERT_EQ(cudaMemset(dout.get(), 0xa5, dout.bytes()), cudaSuccess);
    EXPECT_EQ(
        cuda::CommDecode(t.config, dpay.as<uint8_t>(), t.bytes, dout.f32(), t.n, stream.get()),
        want);
    ASSERT_EQ(cudaStreamSynchronize(stream.get()), cudaSuccess);
    for (const float f : dout.ToHost<float>()) {
      ASSERT_EQ(Bits(f), 0xa5a5a5a5u) << "output written on error";
    }
  }
}

// n = 0: a header alone, as the CPU writes it, which decodes to nothing.
TEST(CommCodecGpuErrorTest, EmptyPayloadIsTheHeader) {
  QKV_SKIP_WITHOUT_CUDA_DEVICE();
  const CommCodecConfig c = Config(CommCodecType::kFp8E4M3, 64, 2);
  std::unique_ptr<CommCodec> codec = MakeCodec(c);
  ASSERT_NE(codec, nullptr);
  std::vector<uint8_t> want(static_cast<size_t>(codec->PayloadBytes(0)));
  ASSERT_EQ(want.size(), static_cast<size_t>(kCommCodecHeaderBytes));
  codec->Encode(nullptr, 0, want.data());
  DeviceBuffer dpay(want.size());
  ASSERT_TRUE(cuda::CommEncode(c, nullptr, 0, dpay.as<uint8_t>(), nullptr).ok());
  EXPECT_EQ(dpay.ToHost<uint8_t>(), want);
  EXPECT_TRUE(cuda::CommDecode(c, dpay.as<uint8_t>(), want.size(), nullptr, 0, nullptr).ok());
}

}  // namespace
}  // namespace quantkv::kernels
