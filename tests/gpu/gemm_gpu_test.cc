// cuda::Gemm (cuBLAS) against a float64 reference computed on the CPU from the same inputs
// (bf16-rounded where the GPU rounds them). Tests that launch work skip, saying why, without
// a usable CUDA device; argument checking runs everywhere, without touching the GPU.
//
// Tolerances, relative to S = sum_t |x_t w_t| (+ |old y| when accumulating), k terms:
//  - fp32 weights: any fp32 summation order of k exact-in-double products makes an error of at
//    most about (k + 1) u S with u = 2^-24 (one rounding per product and per addition). We
//    allow (k + 2) u S. TF32 would round each input to 10 mantissa bits, ~2^-11 S; a dedicated
//    test also checks a case that only true fp32 gets exactly right.
//  - bf16 weights: products of bf16 values are exact in fp32, but tensor cores may align the
//    addends of a few products to the largest exponent and truncate instead of rounding, so we
//    allow 4x the fp32 bound, 4 (k + 2) u S. A layout or conversion bug errs by ~S / sqrt(k).
//    The rounding of x to bf16 itself is checked bit-exactly through an identity weight.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/device.h"
#include "kernels/fp16.h"
#include "kernels/matmul.h"
#include "tests/gpu/gpu_test_util.h"

namespace quantkv::kernels {
namespace {

using cuda::GemmWeights;
using gpu_test::DeviceBuffer;

constexpr double kU = 1.0 / (1 << 24);  // fp32 unit roundoff

// absl::Status messages are absl::string_view, which Debian's absl keeps distinct from std's.
bool MessageHas(const absl::Status& s, std::string_view needle) {
  return std::string(s.message()).find(needle) != std::string::npos;
}

const char* Name(GemmWeights w) { return w == GemmWeights::kF32 ? "f32" : "bf16"; }

// ---------------------------------------------------------------------------------------------
// Without a GPU: scratch sizes and argument errors (checked before any CUDA call, so a dummy
// handle and host pointers are never used).

int fake_handle_storage = 0;
void* FakeHandle() { return &fake_handle_storage; }

TEST(GemmScratchBytes, Bf16NeedsTwoBytesPerActivation) {
  EXPECT_EQ(cuda::GemmScratchBytes(GemmWeights::kBF16, 3, 576), 3 * 576 * 2);
  EXPECT_EQ(cuda::GemmScratchBytes(GemmWeights::kBF16, 1, 1), 2);
  EXPECT_EQ(cuda::GemmScratchBytes(GemmWeights::kBF16, 0, 576), 0);
  EXPECT_EQ(cuda::GemmScratchBytes(GemmWeights::kBF16, 64, 0), 0);
  EXPECT_EQ(cuda::GemmScratchBytes(GemmWeights::kF32, 64, 1536), 0);
  EXPECT_EQ(cuda::GemmScratchBytes(GemmWeights::kBF16, int64_t{1} << 40, int64_t{1} << 40),
            std::numeric_limits<int64_t>::max());
}

class GemmArgs : public ::testing::Test {
 protected:
  absl::Status Call(GemmWeights weights, int64_t n, int64_t k, int64_t m, void* scratch,
                    int64_t scratch_bytes, void* handle = FakeHandle()) {
    return cuda::Gemm(handle, x_, w_, weights, y_, n, k, m, /*accumulate=*/false, scratch,
                      scratch_bytes);
  }
  float x_[4] = {}, w_[4] = {}, y_[4] = {};
  alignas(16) char scratch_[64] = {};
};

TEST_F(GemmArgs, NegativeShapes) {
  for (GemmWeights weights : {GemmWeights::kF32, GemmWeights::kBF16}) {
    absl::Status s = Call(weights, -1, 4, 4, scratch_, sizeof(scratch_));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_TRUE(MessageHas(s, "Gemm") && MessageHas(s, "n=-1 k=4 m=4")) << s;
    s = Call(weights, 2, -3, 4, scratch_, sizeof(scratch_));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_TRUE(MessageHas(s, "k=-3")) << s;
    s = Call(weights, 2, 4, -5, scratch_, sizeof(scratch_));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_TRUE(MessageHas(s, "m=-5")) << s;
  }
}

TEST_F(GemmArgs, DimensionsBeyondCublasInts) {
  const int64_t big = int64_t{1} << 31;
  absl::Status s = Call(GemmWeights::kF32, 1, big, 1, nullptr, 0);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_TRUE(MessageHas(s, "int range")) << s;
  s = Call(GemmWeights::kF32, big, 1, 1, nullptr, 0);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  s = Call(GemmWeights::kF32, 1, 1, big, nullptr, 0);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
}

TEST_F(GemmArgs, ScratchTooSmallNullOrMisaligned) {
  // bf16: n * k * 2 = 30 bytes.
  absl::Status s = Call(GemmWeights::kBF16, 3, 5, 2, scratch_, 29);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_TRUE(MessageHas(s, "scratch of 29 bytes, need 30") && MessageHas(s, "bf16")) << s;
  s = Call(GemmWeights::kBF16, 3, 5, 2, nullptr, 30);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_TRUE(MessageHas(s, "null scratch")) << s;
  s = Call(GemmWeights::kBF16, 3, 5, 2, scratch_ + 1, 40);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_TRUE(MessageHas(s, "aligned")) << s;
  s = Call(GemmWeights::kF32, 3, 5, 2, scratch_, -1);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
}

TEST_F(GemmArgs, NullPointersAndUnknownWeights) {
  absl::Status s = Call(GemmWeights::kF32, 2, 4, 4, nullptr, 0, /*handle=*/nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_TRUE(MessageHas(s, "handle")) << s;
  s = cuda::Gemm(FakeHandle(), nullptr, w_, GemmWeights::kF32, y_, 2, 4, 4, false, nullptr, 0);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  s = cuda::Gemm(FakeHandle(), x_, nullptr, GemmWeights::kF32, y_, 2, 4, 4, false, nullptr, 0);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  s = cuda::Gemm(FakeHandle(), x_, w_, GemmWeights::kF32, nullptr, 2, 4, 4, false, nullptr, 0);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  s = Call(static_cast<GemmWeights>(7), 2, 4, 4, scratch_, sizeof(scratch_));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_TRUE(MessageHas(s, "unknown weight type 7")) << s;
}

TEST_F(GemmArgs, EmptyOutputsAreNoOps) {
  // Nothing to compute: OK without using the handle or any pointer (and without a GPU).
  EXPECT_TRUE(Call(GemmWeights::kBF16, 0, 576, 1536, nullptr, 0).ok());
  EXPECT_TRUE(Call(GemmWeights::kF32, 16, 576, 0, nullptr, 0).ok());
  EXPECT_TRUE(
      cuda::Gemm(nullptr, nullptr, nullptr, GemmWeights::kBF16, nullptr, 0, 0, 0, true, nullptr, 0)
          .ok());
}

TEST(CublasHandle, FailsCleanlyWithoutADeviceAndWorksWithOne) {
  cuda::DestroyCublasHandle(nullptr);  // a no-op
  absl::StatusOr<void*> handle = cuda::CreateCublasHandle(nullptr);
  if (cuda::CudaDeviceCount() == 0) {
    EXPECT_FALSE(handle.ok());
    if (!handle.ok()) std::cout << "without a device: " << handle.status() << "\n";
    return;
  }
  ASSERT_TRUE(handle.ok()) << handle.status();
  EXPECT_NE(*handle, nullptr);
  cuda::DestroyCublasHandle(*handle);
}

// ---------------------------------------------------------------------------------------------
// On a GPU.

class GemmGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    QKV_SKIP_WITHOUT_CUDA_DEVICE();
    ASSERT_EQ(cudaStreamCreate(&stream_), cudaSuccess);
    absl::StatusOr<void*> handle = cuda::CreateCublasHandle(stream_);
    ASSERT_TRUE(handle.ok()) << handle.status();
    handle_ = *handle;
  }
  void TearDown() override {
    cuda::DestroyCublasHandle(handle_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  void Sync() { ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess); }

  cudaStream_t stream_ = nullptr;
  void* handle_ = nullptr;
};

struct Case {
  int64_t n, k, m;
  GemmWeights weights;
  bool accumulate;
  // Offsets (in elements) of x and the scratch from their allocations' 256-byte alignment, to
  // run the converter's unaligned path and cuBLAS's unaligned kernels.
  int64_t x_offset = 0, scratch_offset = 0;
};

std::string Describe(const Case& c) {
  return std::string(Name(c.weights)) + " n=" + std::to_string(c.n) + " k=" + std::to_string(c.k) +
         " m=" + std::to_string(c.m) + (c.accumulate ? " accumulate" : "") +
         (c.x_offset || c.scratch_offset ? " unaligned" : "");
}

// Runs one case on random data and compares with the float64 reference.
void RunCase(void* handle, cudaStream_t stream, const Case& c, std::mt19937_64& rng) {
  SCOPED_TRACE(Describe(c));
  const bool bf16 = c.weights == GemmWeights::kBF16;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  // Activations with a per-row scale spread, like hidden states; weights like a trained layer.
  std::vector<float> x(c.n * c.k), w(c.m * c.k);
  for (int64_t i = 0; i < c.n; ++i) {
    const float scale = std::exp2(static_cast<float>(i % 7) - 3.0f);
    for (int64_t t = 0; t < c.k; ++t) x[i * c.k + t] = scale * normal(rng);
  }
  for (float& v : w) v = 0.05f * uniform(rng);
  // What the GPU multiplies: bf16 weights as uploaded, x rounded the same way as Gemm does.
  std::vector<float> x_ref = x, w_ref = w;
  std::vector<uint16_t> w16;
  if (bf16) {
    w16.resize(w.size());
    for (size_t i = 0; i < w.size(); ++i) {
      w16[i] = Fp32ToBf16(w[i]);
      w_ref[i] = Bf16ToFp32(w16[i]);
    }
    for (float& v : x_ref) v = Bf16ToFp32(Fp32ToBf16(v));
  }
  // Old y: random when accumulating; NaN otherwise, which beta = 0 must never read.
  std::vector<float> y0(c.n * c.m);
  for (float& v : y0) v = c.accumulate ? normal(rng) : std::numeric_limits<float>::quiet_NaN();

  std::vector<float> x_padded(c.x_offset, 0.0f);
  x_padded.insert(x_padded.end(), x.begin(), x.end());
  DeviceBuffer x_dev(x_padded);
  DeviceBuffer w_dev(bf16 ? w16.size() * sizeof(uint16_t) : w.size() * sizeof(float));
  if (bf16) {
    w_dev.Upload(w16.data());
  } else {
    w_dev.Upload(w.data());
  }
  DeviceBuffer y_dev(y0);
  const int64_t scratch_bytes = cuda::GemmScratchBytes(c.weights, c.n, c.k);
  DeviceBuffer scratch(scratch_bytes + c.scratch_offset * 2);
  if (::testing::Test::HasFatalFailure()) return;

  const absl::Status s =
      cuda::Gemm(handle, x_dev.f32() + c.x_offset, w_dev.get(), c.weights, y_dev.f32(), c.n, c.k,
                 c.m, c.accumulate, scratch.as<uint16_t>() + c.scratch_offset, scratch_bytes);
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  const std::vector<float> y = y_dev.ToHost<float>();

  const double per_term = (bf16 ? 4.0 : 1.0) * static_cast<double>(c.k + 2) * kU;
  double worst_ratio = 0.0, worst_rel = 0.0;
  int64_t failures = 0;
  for (int64_t i = 0; i < c.n; ++i) {
    const float* xr = x_ref.data() + i * c.k;
    for (int64_t j = 0; j < c.m; ++j) {
      const float* wr = w_ref.data() + j * c.k;
      double dot = 0.0, abs_sum = 0.0;
      for (int64_t t = 0; t < c.k; ++t) {
        const double p = static_cast<double>(xr[t]) * static_cast<double>(wr[t]);
        dot += p;
        abs_sum += std::fabs(p);
      }
      double expected = dot;
      if (c.accumulate) {
        expected += y0[i * c.m + j];
        abs_sum += std::fabs(y0[i * c.m + j]);
      }
      const double got = y[i * c.m + j];
      const double err = std::fabs(got - expected);
      const double tol = per_term * abs_sum + std::numeric_limits<float>::denorm_min();
      const double ratio = std::isfinite(got) ? err / tol : std::numeric_limits<double>::infinity();
      worst_ratio = std::max(worst_ratio, ratio);
      if (abs_sum > 0) worst_rel = std::max(worst_rel, err / abs_sum);
      if (!(ratio <= 1.0) && failures++ < 5) {
        ADD_FAILURE() << "y[" << i << "][" << j << "] = " << got << ", expected " << expected
                      << " (error " << err << ", tolerance " << tol << ")";
      }
    }
  }
  EXPECT_EQ(failures, 0) << "of " << c.n * c.m << " outputs";
  std::cout << "  " << Describe(c) << ": max error / sum|xw| = " << worst_rel
            << ", max error / tolerance = " << worst_ratio << "\n";
}

TEST_F(GemmGpuTest, SmolLm2ShapesMatchFloat64Reference) {
  std::mt19937_64 rng(gpu_test::FreshSeed());
  const int64_t shapes[][2] = {{576, 1536}, {1536, 576}, {576, 576}};
  for (GemmWeights weights : {GemmWeights::kF32, GemmWeights::kBF16}) {
    for (int64_t n : {1, 3, 16, 64}) {
      for (const auto& [k, m] : shapes) {
        for (bool accumulate : {false, true}) {
          RunCase(handle_, stream_, {n, k, m, weights, accumulate}, rng);
          if (HasFatalFailure()) return;
        }
      }
    }
  }
}

TEST_F(GemmGpuTest, VocabularyProjection) {
  std::mt19937_64 rng(gpu_test::FreshSeed());
  for (GemmWeights weights : {GemmWeights::kF32, GemmWeights::kBF16}) {
    RunCase(handle_, stream_, {3, 576, 49152, weights, false}, rng);
    if (HasFatalFailure()) return;
  }
}

TEST_F(GemmGpuTest, OddShapesAndUnalignedPointers) {
  std::mt19937_64 rng(gpu_test::FreshSeed());
  const Case shapes[] = {
      {1, 1, 1, GemmWeights::kF32, false},       {2, 3, 5, GemmWeights::kF32, false},
      {7, 33, 3, GemmWeights::kF32, false},      {5, 577, 1001, GemmWeights::kF32, false},
      {17, 1023, 129, GemmWeights::kF32, false}, {65, 130, 67, GemmWeights::kF32, false},
  };
  for (GemmWeights weights : {GemmWeights::kF32, GemmWeights::kBF16}) {
    for (bool accumulate : {false, true}) {
      for (Case c : shapes) {
        c.weights = weights;
        c.accumulate = accumulate;
        RunCase(handle_, stream_, c, rng);
        if (HasFatalFailure()) return;
        c.x_offset = 1;
        c.scratch_offset = 1;
        RunCase(handle_, stream_, c, rng);
        if (HasFatalFailure()) return;
      }
    }
  }
}

// x = 1 + 2^-12 (or w = 1 + 2^-12) is exact in fp32 but rounds to 1 in TF32 (and in bf16), and
// with these values every partial sum of every order is exact in fp32: so true fp32 gets these
// outputs exactly right and TF32 gets them wrong by 2^-12 relative.
TEST_F(GemmGpuTest, F32WeightsUseFullFp32NotTf32) {
  const int64_t n = 2, k = 256, m = 2;
  const float e = 1.0f + std::ldexp(1.0f, -12);
  std::vector<float> x(n * k), w(m * k);
  for (int64_t t = 0; t < k; ++t) {
    x[t] = e;         // row 0
    x[k + t] = 1.0f;  // row 1
    w[t] = 1.0f;      // row 0
    w[k + t] = e;     // row 1
  }
  DeviceBuffer x_dev(x), w_dev(w), y_dev(n * m * sizeof(float));
  ASSERT_FALSE(HasFatalFailure());
  const absl::Status s = cuda::Gemm(handle_, x_dev.f32(), w_dev.get(), GemmWeights::kF32,
                                    y_dev.f32(), n, k, m, false, nullptr, 0);
  ASSERT_TRUE(s.ok()) << s;
  Sync();
  const std::vector<float> y = y_dev.ToHost<float>();
  const float exact = 256.0f + 0.0625f;
  EXPECT_EQ(y[0 * m + 0], exact) << "x side rounded: TF32?";
  EXPECT_EQ(y[1 * m + 1], exact) << "w side rounded: TF32?";
  EXPECT_EQ(y[1 * m + 0], 256.0f);
  // y[0][1] = 256 (1 + 2^-12)^2 needs a rounded product; it is covered by the random tests.
}

// Through an identity weight, y is x as the GPU rounded it to bf16: compare bit for bit with
// Fp32ToBf16, including ties to even both ways and values that round up into a new binade.
TEST_F(GemmGpuTest, Bf16ActivationRoundingMatchesFp32ToBf16) {
  std::mt19937_64 rng(gpu_test::FreshSeed());
  const int64_t n = 16, k = 64;
  const std::vector<uint32_t> special = {
      0x3f808000u,  // tie, even below: rounds down to 0x3f80
      0x3f818000u,  // tie, odd below: rounds up to 0x3f82
      0x3f808001u,  // just above a tie: up
      0x3f807fffu,  // just below a tie: down
      0x3fffffffu,  // rounds up into the next binade (2.0)
      0xbf818000u,  // negative tie, odd: away from zero in magnitude
      0x00800000u,  // smallest normal
      0x7f7f0000u,  // large but finite after rounding
      0x00000000u, 0x80000000u,
  };
  std::uniform_int_distribution<uint32_t> exponent(100, 150), mantissa(0, (1u << 23) - 1),
      sign(0, 1);
  std::vector<float> x(n * k);
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = i < special.size()
               ? Fp32FromBits(special[i])
               : Fp32FromBits((sign(rng) << 31) | (exponent(rng) << 23) | mantissa(rng));
  }
  std::vector<uint16_t> identity(k * k, 0);
  for (int64_t j = 0; j < k; ++j) identity[j * k + j] = Fp32ToBf16(1.0f);
  const int64_t scratch_bytes = cuda::GemmScratchBytes(GemmWeights::kBF16, n, k);
  DeviceBuffer x_dev(x), w_dev(identity), y_dev(n * k * sizeof(float)), scratch(scratch_bytes);
  ASSERT_FALSE(HasFatalFailure());
  const absl::Status s = cuda::Gemm(handle_, x_dev.f32(), w_dev.get(), GemmWeights::kBF16,
                                    y_dev.f32(), n, k, k, false, scratch.get(), scratch_bytes);
  ASSERT_TRUE(s.ok()) << s;
  Sync();
  const std::vector<float> y = y_dev.ToHost<float>();
  const std::vector<uint16_t> x16 = scratch.ToHost<uint16_t>();
  for (size_t i = 0; i < x.size(); ++i) {
    const uint16_t want = Fp32ToBf16(x[i]);
    EXPECT_EQ(x16[i], want) << "scratch[" << i << "] from x bits " << std::hex
                            << BitsFromFp32(x[i]);
    // +0 and -0 both come out as a sum with +0 terms; compare values there.
    if (Bf16ToFp32(want) == 0.0f) {
      EXPECT_EQ(y[i], 0.0f) << i;
    } else {
      EXPECT_EQ(BitsFromFp32(y[i]), BitsFromFp32(Bf16ToFp32(want)))
          << "y[" << i << "] from x bits " << std::hex << BitsFromFp32(x[i]);
    }
  }
}

TEST_F(GemmGpuTest, EmptySumZeroesOrKeepsY) {
  const int64_t n = 3, m = 5;
  const std::vector<float> y0 = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (GemmWeights weights : {GemmWeights::kF32, GemmWeights::kBF16}) {
    for (bool accumulate : {false, true}) {
      DeviceBuffer y_dev(y0);
      ASSERT_FALSE(HasFatalFailure());
      const absl::Status s = cuda::Gemm(handle_, nullptr, nullptr, weights, y_dev.f32(), n, 0, m,
                                        accumulate, nullptr, 0);
      ASSERT_TRUE(s.ok()) << s;
      Sync();
      const std::vector<float> y = y_dev.ToHost<float>();
      for (size_t i = 0; i < y.size(); ++i) {
        EXPECT_EQ(y[i], accumulate ? y0[i] : 0.0f) << Name(weights) << " " << i;
      }
    }
  }
}

TEST_F(GemmGpuTest, EmptyOutputsLeaveYAlone) {
  const std::vector<float> y0 = {1, 2, 3};
  DeviceBuffer y_dev(y0), x_dev(y0), w_dev(y0);
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_TRUE(cuda::Gemm(handle_, x_dev.f32(), w_dev.get(), GemmWeights::kF32, y_dev.f32(), 0, 1, 3,
                         false, nullptr, 0)
                  .ok());
  EXPECT_TRUE(cuda::Gemm(handle_, x_dev.f32(), w_dev.get(), GemmWeights::kF32, y_dev.f32(), 3, 1, 0,
                         false, nullptr, 0)
                  .ok());
  Sync();
  EXPECT_EQ(y_dev.ToHost<float>(), y0);
}

}  // namespace
}  // namespace quantkv::kernels
