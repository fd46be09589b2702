// CUDA kernels against their CPU references on fresh random input. Tests that launch kernels
// skip, saying why, without a usable CUDA device; argument checking and the runtime helpers are
// tested everywhere.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/device.h"
#include "kernels/dequantize.h"
#include "kernels/fp16.h"
#include "kernels/ggml_types.h"
#include "kernels/rmsnorm.h"

namespace quantkv::kernels {
namespace {

#define SKIP_WITHOUT_CUDA_DEVICE()                                                   \
  do {                                                                               \
    const absl::StatusOr<int> count = cuda::QueryCudaDeviceCount();                  \
    if (!count.ok()) GTEST_SKIP() << "no CUDA device: " << count.status().message(); \
    if (*count == 0) GTEST_SKIP() << "no CUDA device: the driver reports 0 devices"; \
  } while (0)

// absl::Status messages are absl::string_view, which Debian's absl keeps distinct from std's.
bool MessageHas(const absl::Status& s, std::string_view needle) {
  return std::string(s.message()).find(needle) != std::string::npos;
}

uint64_t FreshSeed() {
  const uint64_t seed =
      (static_cast<uint64_t>(std::random_device{}()) << 32) | std::random_device{}();
  std::cout << "[ seed ] " << seed << "\n";
  return seed;
}

// Owns a device allocation for the length of a test.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    EXPECT_EQ(cudaMalloc(&ptr_, bytes_ == 0 ? 1 : bytes_), cudaSuccess) << bytes_ << " bytes";
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return ptr_; }
  float* f32() const { return static_cast<float*>(ptr_); }
  void Upload(const void* src) {
    ASSERT_EQ(cudaMemcpy(ptr_, src, bytes_, cudaMemcpyHostToDevice), cudaSuccess);
  }
  void Download(void* dst) const {
    ASSERT_EQ(cudaMemcpy(dst, ptr_, bytes_, cudaMemcpyDeviceToHost), cudaSuccess);
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};

// Offsets and ranges of each block type's fp16 scale fields; the rest is random bytes.
std::vector<uint8_t> RandomBlocks(GgmlType type, int64_t blocks, std::mt19937_64& rng) {
  struct Field {
    int offset;
    float lo, hi;
  };
  std::vector<Field> fields;
  switch (type) {
    case GgmlType::kQ4_0:
    case GgmlType::kQ5_0:
    case GgmlType::kQ8_0:
      fields = {{0, -2.0f, 2.0f}};
      break;
    case GgmlType::kQ4_1:
    case GgmlType::kQ5_1:
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K:
      fields = {{0, -2.0f, 2.0f}, {2, 0.0f, 0.1f}};
      break;
    case GgmlType::kQ6_K:
      fields = {{208, -2.0f, 2.0f}};
      break;
    default:
      break;  // F32 / F16 / BF16: any bit pattern
  }
  const GgmlTypeInfo& info = GgmlTypeInfoOf(type);
  std::vector<uint8_t> bytes(blocks * info.type_size);
  std::uniform_int_distribution<int> byte(0, 255);
  for (uint8_t& b : bytes) b = static_cast<uint8_t>(byte(rng));
  for (const Field& f : fields) {
    std::uniform_real_distribution<float> value(f.lo, f.hi);
    for (int64_t i = 0; i < blocks; ++i) {
      const uint16_t h = Fp32ToFp16(value(rng));
      std::memcpy(&bytes[i * info.type_size + f.offset], &h, 2);
    }
  }
  return bytes;
}

bool SameFloat(float got, float want) {
  if (std::isnan(want)) return std::isnan(got);
  return BitsFromFp32(got) == BitsFromFp32(want);
}

TEST(CudaDeviceTest, CountNeverFails) {
  const absl::StatusOr<int> count = cuda::QueryCudaDeviceCount();
  EXPECT_EQ(cuda::CudaDeviceCount(), count.ok() ? *count : 0);
  EXPECT_GE(cuda::CudaDeviceCount(), 0);
  if (!count.ok()) {
    EXPECT_TRUE(MessageHas(count.status(), "cudaGetDeviceCount")) << count.status();
  }
}

TEST(CudaDeviceTest, CudaCheckNamesTheCallAndError) {
  EXPECT_TRUE(cuda::CudaCheck(cudaSuccess, "x").ok());
  const absl::Status oom = cuda::CudaCheck(cudaErrorMemoryAllocation, "cudaMalloc(weights)");
  EXPECT_EQ(oom.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(MessageHas(oom, "cudaMalloc(weights)")) << oom;
  EXPECT_TRUE(MessageHas(oom, "cudaErrorMemoryAllocation")) << oom;
  EXPECT_EQ(cuda::CudaCheck(cudaErrorInvalidValue, "x").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::CudaCheck(cudaErrorLaunchFailure, "x").code(), absl::StatusCode::kInternal);
}

TEST(CudaDequantizeTest, RejectsBadArgumentsBeforeLaunching) {
  using cuda::DequantizeRowsToBf16OrF32;
  auto code = [](const absl::Status& s) { return s.code(); };
  const absl::Status bad_n =
      DequantizeRowsToBf16OrF32(GgmlType::kQ4_K, nullptr, 1, 255, GgmlType::kF32, nullptr, nullptr);
  EXPECT_EQ(code(bad_n), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(MessageHas(bad_n, "Q4_K")) << bad_n;
  EXPECT_EQ(code(DequantizeRowsToBf16OrF32(GgmlType::kQ8_0, nullptr, -1, 32, GgmlType::kF32,
                                           nullptr, nullptr)),
            absl::StatusCode::kInvalidArgument);
  const absl::Status bad_out =
      DequantizeRowsToBf16OrF32(GgmlType::kQ8_0, nullptr, 1, 32, GgmlType::kF16, nullptr, nullptr);
  EXPECT_EQ(code(bad_out), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(MessageHas(bad_out, "F16")) << bad_out;
  EXPECT_EQ(code(DequantizeRowsToBf16OrF32(static_cast<GgmlType>(4), nullptr, 1, 32, GgmlType::kF32,
                                           nullptr, nullptr)),
            absl::StatusCode::kInvalidArgument);
  const absl::Status q2k =
      DequantizeRowsToBf16OrF32(GgmlType::kQ2_K, nullptr, 1, 256, GgmlType::kF32, nullptr, nullptr);
  EXPECT_EQ(code(q2k), absl::StatusCode::kUnimplemented);
  EXPECT_TRUE(MessageHas(q2k, "Q2_K")) << q2k;
  // Nothing to do: no launch, so fine without a device.
  EXPECT_TRUE(
      DequantizeRowsToBf16OrF32(GgmlType::kQ6_K, nullptr, 0, 256, GgmlType::kBF16, nullptr, nullptr)
          .ok());
}

class CudaDequantizeTypeTest : public ::testing::TestWithParam<GgmlType> {};

// rows x n elements to fp32 and bf16 on the device against DequantizeRows on the host.
void CheckDequantize(GgmlType type, int64_t rows, int64_t n, std::mt19937_64& rng) {
  const GgmlTypeInfo& info = GgmlTypeInfoOf(type);
  SCOPED_TRACE(std::string(info.name) + " " + std::to_string(rows) + "x" + std::to_string(n));
  const int64_t total = rows * n;
  const std::vector<uint8_t> raw = RandomBlocks(type, total / info.block_size, rng);
  std::vector<float> want(total);
  ASSERT_TRUE(DequantizeRows(type, raw.data(), want.data(), rows, n).ok());

  DeviceBuffer src(raw.size()), out32(total * sizeof(float)), out16(total * sizeof(uint16_t));
  src.Upload(raw.data());
  ASSERT_TRUE(cuda::DequantizeRowsToBf16OrF32(type, src.get(), rows, n, GgmlType::kF32, out32.get(),
                                              nullptr)
                  .ok());
  ASSERT_TRUE(cuda::DequantizeRowsToBf16OrF32(type, src.get(), rows, n, GgmlType::kBF16,
                                              out16.get(), nullptr)
                  .ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> got32(total);
  std::vector<uint16_t> got16(total);
  out32.Download(got32.data());
  out16.Download(got16.data());
  int reported = 0;
  for (int64_t i = 0; i < total && reported < 8; ++i) {
    if (!SameFloat(got32[i], want[i])) {
      ADD_FAILURE() << "fp32 element " << i << ": got " << got32[i] << ", want " << want[i];
      ++reported;
    }
    const uint16_t want16 = Fp32ToBf16(want[i]);
    const bool nan16 = std::isnan(want[i]) && std::isnan(Bf16ToFp32(got16[i]));
    if (!nan16 && got16[i] != want16) {
      ADD_FAILURE() << "bf16 element " << i << ": got 0x" << std::hex << got16[i] << ", want 0x"
                    << want16 << std::dec;
      ++reported;
    }
  }
}

TEST_P(CudaDequantizeTypeTest, MatchesCpuOnFreshRandomBlocks) {
  SKIP_WITHOUT_CUDA_DEVICE();
  std::mt19937_64 rng(FreshSeed());
  const int64_t bs = GgmlTypeInfoOf(GetParam()).block_size;
  CheckDequantize(GetParam(), 1, bs, rng);
  CheckDequantize(GetParam(), 7, bs == 1 ? 1000 : 12 * bs, rng);
}

INSTANTIATE_TEST_SUITE_P(AllTypes, CudaDequantizeTypeTest,
                         ::testing::Values(GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16,
                                           GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ5_0,
                                           GgmlType::kQ5_1, GgmlType::kQ8_0, GgmlType::kQ4_K,
                                           GgmlType::kQ5_K, GgmlType::kQ6_K),
                         [](const ::testing::TestParamInfo<GgmlType>& p) {
                           return std::string(GgmlTypeInfoOf(p.param).name);
                         });

TEST(CudaDequantizeTest, LargeTensorCoversGridStrideLoop) {
  SKIP_WITHOUT_CUDA_DEVICE();
  std::mt19937_64 rng(FreshSeed());
  // 18.9M elements: more than the 2^16 blocks x 256 threads of one grid pass.
  CheckDequantize(GgmlType::kQ4_0, 4096, 4608, rng);
}

std::vector<float> RandomFloats(int64_t n, float scale, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

void ExpectClose(const std::vector<float>& got, const std::vector<float>& want,
                 const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  int reported = 0;
  for (size_t i = 0; i < got.size() && reported < 8; ++i) {
    // fp32 tree reduction on the device vs a double sum on the host: a few ulp of the scale.
    if (!(std::fabs(got[i] - want[i]) <= 1e-5f * std::fabs(want[i]) + 1e-6f)) {
      ADD_FAILURE() << what << " element " << i << ": got " << got[i] << ", want " << want[i];
      ++reported;
    }
  }
}

TEST(CudaRmsNormTest, RejectsNegativeShapesBeforeLaunching) {
  EXPECT_EQ(cuda::RmsNorm(nullptr, nullptr, nullptr, -1, 8, 1e-5f, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::AddRmsNorm(nullptr, nullptr, nullptr, nullptr, 2, -8, 1e-5f, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(cuda::RmsNorm(nullptr, nullptr, nullptr, 0, 8, 1e-5f, nullptr).ok());
}

TEST(CudaRmsNormTest, MatchesCpuOnFreshRandomInput) {
  SKIP_WITHOUT_CUDA_DEVICE();
  std::mt19937_64 rng(FreshSeed());
  const float eps = 1e-5f;
  for (auto [rows, n] :
       {std::pair<int64_t, int64_t>{1, 1}, {3, 31}, {5, 576}, {2, 2049}, {70000, 8}}) {
    SCOPED_TRACE(std::to_string(rows) + "x" + std::to_string(n));
    const std::vector<float> x = RandomFloats(rows * n, 3.0f, rng);
    const std::vector<float> w = RandomFloats(n, 1.0f, rng);
    std::vector<float> want(rows * n);
    RmsNorm(x.data(), w.data(), want.data(), rows, n, eps);

    DeviceBuffer dx(x.size() * 4), dw(w.size() * 4), dy(x.size() * 4);
    dx.Upload(x.data());
    dw.Upload(w.data());
    ASSERT_TRUE(cuda::RmsNorm(dx.f32(), dw.f32(), dy.f32(), rows, n, eps, nullptr).ok());
    std::vector<float> got(x.size());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    dy.Download(got.data());
    ExpectClose(got, want, "RmsNorm");

    // In place (x == y), as the CPU version allows.
    ASSERT_TRUE(cuda::RmsNorm(dx.f32(), dw.f32(), dx.f32(), rows, n, eps, nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    dx.Download(got.data());
    ExpectClose(got, want, "RmsNorm in place");
  }
}

TEST(CudaRmsNormTest, AddRmsNormMatchesCpuOnFreshRandomInput) {
  SKIP_WITHOUT_CUDA_DEVICE();
  std::mt19937_64 rng(FreshSeed());
  const float eps = 1e-6f;
  for (auto [rows, n] : {std::pair<int64_t, int64_t>{1, 7}, {4, 576}, {3, 1500}}) {
    SCOPED_TRACE(std::to_string(rows) + "x" + std::to_string(n));
    std::vector<float> residual = RandomFloats(rows * n, 2.0f, rng);
    const std::vector<float> delta = RandomFloats(rows * n, 0.5f, rng);
    const std::vector<float> w = RandomFloats(n, 1.0f, rng);

    DeviceBuffer dres(residual.size() * 4), ddelta(delta.size() * 4), dw(w.size() * 4),
        dy(residual.size() * 4);
    dres.Upload(residual.data());
    ddelta.Upload(delta.data());
    dw.Upload(w.data());
    std::vector<float> want_y(rows * n);
    AddRmsNorm(residual.data(), delta.data(), w.data(), want_y.data(), rows, n, eps);

    ASSERT_TRUE(
        cuda::AddRmsNorm(dres.f32(), ddelta.f32(), dw.f32(), dy.f32(), rows, n, eps, nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<float> got_res(residual.size()), got_y(residual.size());
    dres.Download(got_res.data());
    dy.Download(got_y.data());
    // The residual update is one fp32 add per element: identical on both sides.
    for (size_t i = 0; i < residual.size(); ++i) {
      ASSERT_EQ(BitsFromFp32(got_res[i]), BitsFromFp32(residual[i])) << "residual " << i;
    }
    ExpectClose(got_y, want_y, "AddRmsNorm");
  }
}

}  // namespace
}  // namespace quantkv::kernels
