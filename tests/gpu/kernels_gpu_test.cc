// CUDA kernels against their CPU references on fresh random input. Tests that launch kernels
// skip, saying why, without a usable CUDA device; argument checking and the runtime helpers are
// tested everywhere.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/device.h"
#include "kernels/dequantize.h"
#include "kernels/fp16.h"
#include "kernels/ggml_types.h"
#include "kernels/moe_grouped_gemm.h"
#include "kernels/rmsnorm.h"
#include "tests/gpu/gpu_test_util.h"

namespace quantkv::kernels {
namespace {

// absl::Status messages are absl::string_view, which Debian's absl keeps distinct from std's.
bool MessageHas(const absl::Status& s, std::string_view needle) {
  return std::string(s.message()).find(needle) != std::string::npos;
}

using gpu_test::DeviceBuffer;
using gpu_test::FreshSeed;

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
  QKV_SKIP_WITHOUT_CUDA_DEVICE();
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
  QKV_SKIP_WITHOUT_CUDA_DEVICE();
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
  QKV_SKIP_WITHOUT_CUDA_DEVICE();
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
  QKV_SKIP_WITHOUT_CUDA_DEVICE();
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

// Grouped expert GEMM. Host arrays of one problem, with random x ~ N(0, 1), weights ~
// N(0, 1/fan_in) (every stage O(1)) and router weights in (0.05, 1).
struct MoeProblem {
  MoeGroupedFfnShape shape;
  std::vector<int64_t> offsets;
  std::vector<float> x, gate, up, down, row_weight, y;

  MoeGroupedFfnConfig Config() {
    MoeGroupedFfnConfig c;
    c.shape = shape;
    c.x = x;
    c.group_offsets = offsets;
    c.gate = gate;
    c.up = up;
    c.down = down;
    c.row_weight = row_weight;
    c.y = absl::MakeSpan(y);
    return c;
  }
};

MoeProblem RandomMoeProblem(const std::vector<int64_t>& groups, int64_t hidden,
                            int64_t intermediate, std::mt19937_64& rng) {
  MoeProblem p;
  p.offsets = {0};
  for (int64_t g : groups) p.offsets.push_back(p.offsets.back() + g);
  const int64_t m = p.offsets.back(), E = static_cast<int64_t>(groups.size());
  p.shape = {m, hidden, intermediate, E};
  p.x = RandomFloats(m * hidden, 1.0f, rng);
  p.gate = RandomFloats(E * intermediate * hidden, 1.0f / std::sqrt(float(hidden)), rng);
  p.up = RandomFloats(E * intermediate * hidden, 1.0f / std::sqrt(float(hidden)), rng);
  p.down = RandomFloats(E * hidden * intermediate, 1.0f / std::sqrt(float(intermediate)), rng);
  std::uniform_real_distribution<float> w(0.05f, 1.0f);
  p.row_weight.resize(m);
  for (float& f : p.row_weight) f = w(rng);
  p.y.assign(m * hidden, NAN);
  return p;
}

// Per output, in float64, the first-order magnitude that rounding errors scale with:
//   M[r, i] = |w_r| sum_j |down_ij| (|act_j| + |silu'(g_j) u_j| S_gate,j + |silu(g_j)| S_up,j)
// with g_j, u_j the gate and up products of row r and S_gate,j = sum_k |gate_jk x_rk| (S_up
// likewise). Relative errors of at most eps in every weight (and every product's terms) move
// y[r, i] by at most eps * M[r, i] to first order.
std::vector<double> MoeErrorMagnitude(const MoeProblem& p) {
  const int64_t H = p.shape.hidden, I = p.shape.intermediate;
  std::vector<double> mag(p.shape.rows * H), a(I);
  for (int64_t e = 0; e < p.shape.n_experts; ++e) {
    for (int64_t r = p.offsets[e]; r < p.offsets[e + 1]; ++r) {
      for (int64_t j = 0; j < I; ++j) {
        double g = 0, u = 0, sg = 0, su = 0;
        for (int64_t k = 0; k < H; ++k) {
          const double x = p.x[r * H + k];
          const double tg = p.gate[(e * I + j) * H + k] * x, tu = p.up[(e * I + j) * H + k] * x;
          g += tg;
          u += tu;
          sg += std::fabs(tg);
          su += std::fabs(tu);
        }
        const double sig = 1.0 / (1.0 + std::exp(-g)), silu = g * sig;
        const double dsilu = sig * (1.0 + g * (1.0 - sig));
        a[j] = std::fabs(silu * u) + std::fabs(dsilu * u) * sg + std::fabs(silu) * su;
      }
      for (int64_t i = 0; i < H; ++i) {
        double sum = 0;
        for (int64_t j = 0; j < I; ++j) sum += std::fabs(p.down[(e * H + i) * I + j]) * a[j];
        mag[r * H + i] = std::fabs(p.row_weight[r]) * sum;
      }
    }
  }
  return mag;
}

// |got - want| <= factor * magnitude, element by element; returns the worst ratio.
double ExpectWithinMagnitude(const std::vector<float>& got, const std::vector<float>& want,
                             const std::vector<double>& magnitude, double factor, int64_t hidden,
                             const std::string& what) {
  int reported = 0;
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    const double tol = factor * magnitude[i];
    worst = std::max(worst, err / tol);
    if (!(err <= tol) && reported < 8) {
      ADD_FAILURE() << what << " row " << i / hidden << " col " << i % hidden << ": got " << got[i]
                    << ", want " << want[i] << ", tolerance " << tol;
      ++reported;
    }
  }
  return worst;
}

TEST(CudaMoeGroupedFfnTest, RejectsBadArgumentsBeforeLaunching) {
  std::mt19937_64 rng(1);
  MoeProblem good = RandomMoeProblem({2, 0, 3}, 8, 4, rng);
  // Host offsets are checked as on the CPU, before anything touches the device.
  {
    MoeProblem p = good;
    p.offsets = {0, 3, 2, 5};
    const absl::Status s = cuda::MoeGroupedFfnFromHost(p.Config());
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_TRUE(MessageHas(s, "non-decreasing")) << s;
    p.offsets = {0, 2, 2, 4};
    EXPECT_TRUE(MessageHas(cuda::MoeGroupedFfnFromHost(p.Config()), "want rows = 5"));
    MoeGroupedFfnConfig c = good.Config();
    c.x = {};
    EXPECT_TRUE(MessageHas(cuda::MoeGroupedFfnFromHost(c), "x is null"));
  }
  // The device entry checks sizes and pointers; these spans only stand in for device arrays
  // (every case is refused before a launch could dereference them).
  std::vector<uint16_t> w16(good.gate.size());
  std::vector<float> workspace(cuda::MoeGroupedFfnWorkspaceFloats(good.shape));
  auto device_config = [&] {
    cuda::MoeGroupedFfnDeviceConfig d;
    d.shape = good.shape;
    d.x = good.x;
    d.group_offsets = good.offsets;
    d.gate = w16;
    d.up = w16;
    d.down = w16;
    d.row_weight = good.row_weight;
    d.y = absl::MakeSpan(good.y);
    d.workspace = absl::MakeSpan(workspace);
    return d;
  };
  EXPECT_EQ(cuda::MoeGroupedFfnWorkspaceFloats(good.shape), 5 * 4);
  {
    cuda::MoeGroupedFfnDeviceConfig d = device_config();
    d.workspace = d.workspace.subspan(1);
    const absl::Status s = cuda::MoeGroupedFfn(d);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_TRUE(MessageHas(s, "workspace")) << s;
  }
  {
    cuda::MoeGroupedFfnDeviceConfig d = device_config();
    d.down = d.down.subspan(1);
    EXPECT_TRUE(MessageHas(cuda::MoeGroupedFfn(d), "down has 95 elements, want 96"));
    d = device_config();
    d.y = {};
    EXPECT_TRUE(MessageHas(cuda::MoeGroupedFfn(d), "y is null"));
    d = device_config();
    d.shape.hidden = -1;
    EXPECT_TRUE(MessageHas(cuda::MoeGroupedFfn(d), "negative shape"));
  }
  // No rows: nothing to launch, so fine without a device.
  cuda::MoeGroupedFfnDeviceConfig empty;
  empty.shape = {0, 8, 4, 3};
  EXPECT_TRUE(cuda::MoeGroupedFfn(empty).ok());
  MoeGroupedFfnConfig empty_host;
  empty_host.shape = {0, 8, 4, 3};
  EXPECT_TRUE(cuda::MoeGroupedFfnFromHost(empty_host).ok());
}

// Two checks per problem, against the CPU op (fp32 weights, fp32 accumulation):
// - weights that bf16 holds exactly: then the two differ only in fp32 rounding (summation
//   order, fmaf, expf). Worst case, each side is off by (k + 2) * 2^-24 relative to the
//   magnitudes of its three chained products, k = hidden + intermediate summed terms: so
//   |gpu - cpu| <= 2 (hidden + intermediate + 4) 2^-24 M. The CPU emulation of these kernels
//   stayed below 5% of that; any indexing, grouping or epilogue slip is O(|y|), far above.
// - plain fp32 weights, which the upload rounds to bf16 (nearest even, relative error at most
//   2^-9 per weight): to first order |gpu - cpu| <= 2^-9 M, and 2^-8 M leaves room for the
//   second-order and fp32 terms (the emulation reached 0.83 * 2^-9 M on 8-term dots, where one
//   term dominates; typical errors are far smaller). This is the bf16-level accuracy the
//   engine would see with bf16 weights dequantized at load.
TEST(CudaMoeGroupedFfnTest, MatchesCpuOnFreshRandomInput) {
  QKV_SKIP_WITHOUT_CUDA_DEVICE();
  std::mt19937_64 rng(FreshSeed());
  struct Case {
    std::vector<int64_t> groups;
    int64_t hidden, intermediate;
  };
  std::vector<Case> cases = {
      {{5}, 8, 4},                     // one expert, one partial tile
      {{0, 3, 0, 2}, 40, 24},          // empty first and middle groups
      {{1, 1, 1, 1, 1}, 17, 33},       // one-row groups, k not a multiple of 16
      {{70, 0, 1}, 72, 100},           // a group over two row tiles
      {{0, 0, 0, 0, 0, 7}, 64, 64},    // all rows in the last group, exact tiles
      {{130, 64, 0, 65, 1}, 96, 136},  // tile boundaries inside and at group ends
      {{2, 4, 0}, 130, 17},            // empty last group, 3 column tiles
  };
  Case big{{}, 256, 512};  // 16 experts of 0..150 rows: many tiles in both dimensions
  std::uniform_int_distribution<int64_t> size(0, 150);
  for (int e = 0; e < 16; ++e) big.groups.push_back(size(rng));
  big.groups[7] = std::max<int64_t>(big.groups[7], 1);
  cases.push_back(big);

  double worst_exact = 0, worst_bf16 = 0;
  for (const Case& cs : cases) {
    std::ostringstream name;
    name << "groups";
    for (int64_t g : cs.groups) name << ' ' << g;
    name << ", hidden " << cs.hidden << ", intermediate " << cs.intermediate;
    const std::string what = name.str();
    SCOPED_TRACE(what);
    MoeProblem p = RandomMoeProblem(cs.groups, cs.hidden, cs.intermediate, rng);
    const double fp32_factor = 2.0 * (cs.hidden + cs.intermediate + 4) * std::ldexp(1.0, -24);

    // Plain fp32 weights: bf16-level agreement.
    std::vector<float> want(p.y.size());
    {
      MoeGroupedFfnConfig c = p.Config();
      c.y = absl::MakeSpan(want);
      ASSERT_TRUE(MoeGroupedFfn(c).ok());
    }
    const absl::Status s = cuda::MoeGroupedFfnFromHost(p.Config());
    ASSERT_TRUE(s.ok()) << s;
    worst_bf16 =
        std::max(worst_bf16, ExpectWithinMagnitude(p.y, want, MoeErrorMagnitude(p),
                                                   std::ldexp(1.0, -8), cs.hidden, what + " bf16"));

    // The same weights rounded to bf16 first: fp32-level agreement.
    for (std::vector<float>* w : {&p.gate, &p.up, &p.down}) {
      for (float& f : *w) f = Bf16ToFp32(Fp32ToBf16(f));
    }
    {
      MoeGroupedFfnConfig c = p.Config();
      c.y = absl::MakeSpan(want);
      ASSERT_TRUE(MoeGroupedFfn(c).ok());
    }
    p.y.assign(p.y.size(), NAN);
    ASSERT_TRUE(cuda::MoeGroupedFfnFromHost(p.Config()).ok());
    worst_exact =
        std::max(worst_exact, ExpectWithinMagnitude(p.y, want, MoeErrorMagnitude(p), fp32_factor,
                                                    cs.hidden, what + " exact"));
  }
  std::cout << "[ worst ] |gpu - cpu| / tolerance: bf16 weights " << worst_bf16
            << ", bf16-exact weights " << worst_exact << "\n";
}

}  // namespace
}  // namespace quantkv::kernels
