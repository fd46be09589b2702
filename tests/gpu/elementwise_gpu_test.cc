// The element-wise CUDA ops of the GPU forward pass (embedding gather, RoPE, SwiGLU, row bias)
// against their CPU references on fresh random input. Tests that launch kernels skip, saying
// why, without a usable CUDA device; the CPU references (RopeTable::CosSin against Apply,
// EmbeddingGather) and argument checking are tested everywhere.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/activation.h"
#include "kernels/cuda/device.h"
#include "kernels/embedding.h"
#include "kernels/fp16.h"
#include "kernels/rope.h"
#include "tests/gpu/gpu_test_util.h"

namespace quantkv::kernels {
namespace {

using gpu_test::DeviceBuffer;
using gpu_test::FreshSeed;

std::vector<float> RandomFloats(int64_t n, float lo, float hi, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

// The RoPE variants the engine meets: plain, linear, YaRN (magnitude != 1) and llama3.
std::vector<RopeSpec> RopeSpecs(int64_t head_dim, bool neox) {
  std::vector<RopeSpec> specs;
  RopeSpec plain;
  plain.head_dim = head_dim;
  plain.theta = 1000000.0;
  plain.neox = neox;
  specs.push_back(plain);
  RopeSpec linear = plain;
  linear.theta = 10000.0;
  linear.scaling = RopeScaling::kLinear;
  linear.factor = 2.0;
  specs.push_back(linear);
  RopeSpec yarn = plain;
  yarn.scaling = RopeScaling::kYarn;
  yarn.factor = 4.0;
  yarn.original_context = 4096;
  specs.push_back(yarn);
  RopeSpec llama3 = plain;
  llama3.theta = 500000.0;
  llama3.scaling = RopeScaling::kLlama3;
  llama3.factor = 8.0;
  llama3.original_context = 8192;
  specs.push_back(llama3);
  return specs;
}

std::vector<int32_t> RandomPositions(int64_t n, int64_t n_positions, std::mt19937_64& rng) {
  std::uniform_int_distribution<int32_t> dist(0, static_cast<int32_t>(n_positions - 1));
  std::vector<int32_t> p(n);
  for (int32_t& x : p) x = dist(rng);
  // The ends of the table always take part.
  p[0] = 0;
  if (n > 1) p[n - 1] = static_cast<int32_t>(n_positions - 1);
  return p;
}

// ---- CPU references (run everywhere) ----

TEST(RopeCosSin, IsExactlyWhatApplyMultipliesBy) {
  std::mt19937_64 rng(FreshSeed());
  constexpr int64_t kPositions = 8192;
  for (const int64_t d : {64, 128, 80, 6, 7}) {
    for (const bool neox : {false, true}) {
      for (const RopeSpec& spec : RopeSpecs(d, neox)) {
        SCOPED_TRACE(::testing::Message() << "head_dim " << d << " neox " << neox << " scaling "
                                          << static_cast<int>(spec.scaling));
        const RopeTable rope(spec);
        std::vector<float> cos, sin;
        rope.CosSin(kPositions, &cos, &sin);
        const int64_t half = d / 2;
        ASSERT_EQ(cos.size(), static_cast<size_t>(kPositions * half));
        ASSERT_EQ(sin.size(), cos.size());
        if (spec.scaling == RopeScaling::kYarn) {
          EXPECT_GT(rope.magnitude(), 1.0);
          // Position 0: cos is the magnitude itself.
          EXPECT_EQ(cos[0], static_cast<float>(rope.magnitude()));
        }

        constexpr int64_t kTokens = 37, kHeads = 3;
        const std::vector<int32_t> pos = RandomPositions(kTokens, kPositions, rng);
        const std::vector<float> x = RandomFloats(kTokens * kHeads * d, -4.0f, 4.0f, rng);
        std::vector<float> want = x;
        rope.Apply(want.data(), kTokens, kHeads, pos.data());
        // The device kernel's computation, on the host, from the table.
        std::vector<float> got = x;
        for (int64_t t = 0; t < kTokens; ++t) {
          for (int64_t h = 0; h < kHeads; ++h) {
            float* v = got.data() + (t * kHeads + h) * d;
            for (int64_t i = 0; i < half; ++i) {
              const float c = cos[pos[t] * half + i], s = sin[pos[t] * half + i];
              float& a = neox ? v[i] : v[2 * i];
              float& b = neox ? v[i + half] : v[2 * i + 1];
              const float a0 = a, b0 = b;
              a = a0 * c - b0 * s;
              b = a0 * s + b0 * c;
            }
          }
        }
        for (size_t i = 0; i < x.size(); ++i) {
          ASSERT_EQ(Bits(got[i]), Bits(want[i]))
              << "element " << i << ": " << got[i] << " vs " << want[i];
        }
      }
    }
  }
}

TEST(RopeCosSin, CachedAndUncachedTablesAgree) {
  RopeSpec spec;
  spec.head_dim = 64;
  spec.scaling = RopeScaling::kYarn;
  spec.factor = 4.0;
  spec.original_context = 2048;
  const RopeTable plain(spec);
  RopeTable cached(spec);
  cached.Precompute(100);  // shorter than the request: the rest is computed
  std::vector<float> c0, s0, c1, s1;
  plain.CosSin(300, &c0, &s0);
  cached.CosSin(300, &c1, &s1);
  ASSERT_EQ(c0.size(), 300u * 32);
  for (size_t i = 0; i < c0.size(); ++i) {
    ASSERT_EQ(Bits(c0[i]), Bits(c1[i])) << i;
    ASSERT_EQ(Bits(s0[i]), Bits(s1[i])) << i;
  }
  plain.CosSin(0, &c0, &s0);
  EXPECT_TRUE(c0.empty());
  EXPECT_TRUE(s0.empty());
}

TEST(EmbeddingGatherCpu, CopiesF32AndWidensBf16Rows) {
  std::mt19937_64 rng(FreshSeed());
  constexpr int64_t kVocab = 50, kDim = 13;
  const std::vector<float> table = RandomFloats(kVocab * kDim, -2.0f, 2.0f, rng);
  std::vector<uint16_t> table16(table.size());
  for (size_t i = 0; i < table.size(); ++i) table16[i] = Fp32ToBf16(table[i]);
  const std::vector<int32_t> tokens = {0, 49, 7, 7, 23};
  const int64_t n = static_cast<int64_t>(tokens.size());
  std::vector<float> out(n * kDim, -1.0f), out16(n * kDim, -1.0f);
  EmbeddingGather(table.data(), EmbeddingTable::kF32, kDim, tokens.data(), n, out.data());
  EmbeddingGather(table16.data(), EmbeddingTable::kBF16, kDim, tokens.data(), n, out16.data());
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t i = 0; i < kDim; ++i) {
      EXPECT_EQ(out[r * kDim + i], table[tokens[r] * kDim + i]);
      EXPECT_EQ(out16[r * kDim + i], Bf16ToFp32(table16[tokens[r] * kDim + i]));
    }
  }
}

// ---- argument checking (no device needed: checked before any CUDA call) ----

TEST(ElementwiseArgs, NegativeSizesAreInvalidArgument) {
  float dummy[4] = {};
  int32_t ids[1] = {0};
  EXPECT_EQ(
      cuda::EmbeddingGather(dummy, EmbeddingTable::kF32, -1, 4, ids, 1, dummy, nullptr).code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      cuda::EmbeddingGather(dummy, EmbeddingTable::kF32, 1, -4, ids, 1, dummy, nullptr).code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      cuda::EmbeddingGather(dummy, EmbeddingTable::kBF16, 1, 4, ids, -1, dummy, nullptr).code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::RopeApply(dummy, -1, 1, 4, ids, dummy, dummy, 1, false, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::RopeApply(dummy, 1, -1, 4, ids, dummy, dummy, 1, true, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::RopeApply(dummy, 1, 1, -4, ids, dummy, dummy, 1, false, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::RopeApply(dummy, 1, 1, 4, ids, dummy, dummy, -1, false, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::SwiGlu(dummy, dummy, dummy, -1, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::AddRowBias(dummy, dummy, -1, 4, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::AddRowBias(dummy, dummy, 1, -4, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ElementwiseArgs, EmptyWorkIsOkAndNullPointersAreRejected) {
  EXPECT_TRUE(
      cuda::EmbeddingGather(nullptr, EmbeddingTable::kF32, 0, 4, nullptr, 0, nullptr, nullptr)
          .ok());
  EXPECT_TRUE(
      cuda::RopeApply(nullptr, 0, 8, 64, nullptr, nullptr, nullptr, 0, false, nullptr).ok());
  // head_dim 1 has no pair to rotate.
  EXPECT_TRUE(cuda::RopeApply(nullptr, 3, 8, 1, nullptr, nullptr, nullptr, 0, true, nullptr).ok());
  EXPECT_TRUE(cuda::SwiGlu(nullptr, nullptr, nullptr, 0, nullptr).ok());
  EXPECT_TRUE(cuda::AddRowBias(nullptr, nullptr, 0, 7, nullptr).ok());
  EXPECT_TRUE(cuda::AddRowBias(nullptr, nullptr, 7, 0, nullptr).ok());
  EXPECT_EQ(cuda::SwiGlu(nullptr, nullptr, nullptr, 5, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::AddRowBias(nullptr, nullptr, 2, 5, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::RopeApply(nullptr, 1, 1, 4, nullptr, nullptr, nullptr, 1, false, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::EmbeddingGather(nullptr, EmbeddingTable::kF32, 4, 4, nullptr, 1, nullptr, nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- CUDA against the CPU (skip without a device) ----

void SyncOk() {
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
}

TEST(EmbeddingGatherGpu, MatchesCpuAndZeroesBadIds) {
  QKV_SKIP_WITHOUT_CUDA_DEVICE();
  std::mt19937_64 rng(FreshSeed());
  struct Shape {
    int64_t vocab, dim, n;
  };
  const Shape shapes[] = {{1, 1, 1},    {37, 3, 5},     {1000, 4, 257}, {1000, 8, 64},
                          {500, 12, 9}, {300, 896, 33}, {64, 1023, 7},  {2000, 4096, 70}};
  for (const Shape& sh : shapes) {
    for (const EmbeddingTable type : {EmbeddingTable::kF32, EmbeddingTable::kBF16}) {
      // offset 0: the vector path where dim allows; 1: unaligned table and output, scalar.
      for (const int64_t offset : {0, 1}) {
        SCOPED_TRACE(::testing::Message()
                     << "vocab " << sh.vocab << " dim " << sh.dim << " n " << sh.n << " bf16 "
                     << (type == EmbeddingTable::kBF16) << " offset " << offset);
        const std::vector<float> values = RandomFloats(sh.vocab * sh.dim, -3.0f, 3.0f, rng);
        std::vector<uint8_t> table_bytes;
        const size_t elem = type == EmbeddingTable::kF32 ? 4 : 2;
        table_bytes.resize((values.size() + offset) * elem);
        for (size_t i = 0; i < values.size(); ++i) {
          if (type == EmbeddingTable::kF32) {
            std::memcpy(&table_bytes[(i + offset) * 4], &values[i], 4);
          } else {
            const uint16_t b = Fp32ToBf16(values[i]);
            std::memcpy(&table_bytes[(i + offset) * 2], &b, 2);
          }
        }
        std::uniform_int_distribution<int32_t> id_dist(0, static_cast<int32_t>(sh.vocab - 1));
        std::vector<int32_t> ids(sh.n);
        for (int32_t& id : ids) id = id_dist(rng);
        ids[sh.n - 1] = static_cast<int32_t>(sh.vocab - 1);
        // Bad ids where there is room: below zero and at / past the vocabulary.
        if (sh.n >= 5) {
          ids[1] = -1;
          ids[2] = static_cast<int32_t>(sh.vocab);
          ids[3] = std::numeric_limits<int32_t>::max();
          ids[4] = std::numeric_limits<int32_t>::min();
        }
        DeviceBuffer d_table(table_bytes);
        DeviceBuffer d_ids(ids);
        DeviceBuffer d_out((sh.n * sh.dim + offset) * sizeof(float));
        ASSERT_EQ(cudaMemset(d_out.get(), 0xff, d_out.bytes()), cudaSuccess);  // NaN fill
        const void* table = d_table.as<uint8_t>() + offset * elem;
        float* out = d_out.f32() + offset;
        ASSERT_TRUE(cuda::EmbeddingGather(table, type, sh.vocab, sh.dim, d_ids.as<int32_t>(), sh.n,
                                          out, nullptr)
                        .ok());
        SyncOk();
        const std::vector<float> got_all = d_out.ToHost<float>();
        std::vector<int32_t> safe_ids = ids;
        for (int32_t& id : safe_ids) {
          if (id < 0 || id >= sh.vocab) id = 0;
        }
        std::vector<float> want(sh.n * sh.dim);
        EmbeddingGather(table_bytes.data() + offset * elem, type, sh.dim, safe_ids.data(), sh.n,
                        want.data());
        for (int64_t r = 0; r < sh.n; ++r) {
          const bool bad = ids[r] < 0 || ids[r] >= sh.vocab;
          for (int64_t i = 0; i < sh.dim; ++i) {
            const float got = got_all[offset + r * sh.dim + i];
            const float expect = bad ? 0.0f : want[r * sh.dim + i];
            ASSERT_EQ(Bits(got), Bits(expect)) << "row " << r << " (id " << ids[r] << ") col " << i;
          }
        }
      }
    }
  }
}

TEST(RopeApplyGpu, MatchesRopeTableApply) {
  QKV_SKIP_WITHOUT_CUDA_DEVICE();
  std::mt19937_64 rng(FreshSeed());
  constexpr int64_t kPositions = 8192;
  struct Shape {
    int64_t tokens, heads, head_dim;
  };
  const Shape shapes[] = {{1, 1, 64}, {17, 14, 64}, {300, 2, 128},
                          {5, 3, 80}, {9, 5, 7},    {33, 1, 6}};
  int64_t inexact = 0, total = 0;
  for (const Shape& sh : shapes) {
    for (const bool neox : {false, true}) {
      for (const RopeSpec& spec : RopeSpecs(sh.head_dim, neox)) {
        SCOPED_TRACE(::testing::Message() << "tokens " << sh.tokens << " heads " << sh.heads
                                          << " head_dim " << sh.head_dim << " neox " << neox
                                          << " scaling " << static_cast<int>(spec.scaling));
        const RopeTable rope(spec);
        std::vector<float> cos, sin;
        rope.CosSin(kPositions, &cos, &sin);
        const std::vector<int32_t> pos = RandomPositions(sh.tokens, kPositions, rng);
        const std::vector<float> x =
            RandomFloats(sh.tokens * sh.heads * sh.head_dim, -4.0f, 4.0f, rng);
        std::vector<float> want = x;
        rope.Apply(want.data(), sh.tokens, sh.heads, pos.data());

        DeviceBuffer d_x(x), d_pos(pos), d_cos(cos), d_sin(sin);
        ASSERT_TRUE(cuda::RopeApply(d_x.f32(), sh.tokens, sh.heads, sh.head_dim,
                                    d_pos.as<int32_t>(), d_cos.f32(), d_sin.f32(), kPositions, neox,
                                    nullptr)
                        .ok());
        SyncOk();
        const std::vector<float> got = d_x.ToHost<float>();
        // Bound: one ulp of the products' magnitudes (the kernel rounds as the CPU does, so
        // the results are expected to be bit-identical; the count of those that are not is
        // printed).
        const float mag = static_cast<float>(rope.magnitude());
        for (size_t i = 0; i < x.size(); ++i) {
          const int64_t row = static_cast<int64_t>(i) / sh.head_dim;
          const int64_t col = static_cast<int64_t>(i) % sh.head_dim;
          const int64_t half = sh.head_dim / 2;
          const bool rotated = col < 2 * half;  // an odd head_dim's last element stays
          if (!rotated) {
            ASSERT_EQ(Bits(got[i]), Bits(x[i])) << "unrotated element " << i;
            continue;
          }
          int64_t ia, ib;
          if (neox) {
            ia = col < half ? col : col - half;
            ib = ia + half;
          } else {
            ia = col & ~int64_t{1};
            ib = ia + 1;
          }
          const float a = x[row * sh.head_dim + ia], b = x[row * sh.head_dim + ib];
          const float tol = (std::fabs(a) + std::fabs(b)) * mag * 0x1p-23f;
          ASSERT_LE(std::fabs(got[i] - want[i]), tol)
              << "element " << i << ": " << got[i] << " vs " << want[i];
          ++total;
          if (Bits(got[i]) != Bits(want[i])) ++inexact;
        }
      }
    }
  }
  std::cout << "[ rope ] " << inexact << " of " << total << " elements not bit-identical\n";
}

TEST(RopeApplyGpu, PositionOutsideTheTableLeavesTheRowUnrotated) {
  QKV_SKIP_WITHOUT_CUDA_DEVICE();
  std::mt19937_64 rng(FreshSeed());
  RopeSpec spec;
  spec.head_dim = 64;
  const RopeTable rope(spec);
  std::vector<float> cos, sin;
  rope.CosSin(16, &cos, &sin);
  const std::vector<int32_t> pos = {16, -1, 3};
  const std::vector<float> x = RandomFloats(3 * 2 * 64, -1.0f, 1.0f, rng);
  DeviceBuffer d_x(x), d_pos(pos), d_cos(cos), d_sin(sin);
  ASSERT_TRUE(cuda::RopeApply(d_x.f32(), 3, 2, 64, d_pos.as<int32_t>(), d_cos.f32(), d_sin.f32(),
                              16, false, nullptr)
                  .ok());
  SyncOk();
  const std::vector<float> got = d_x.ToHost<float>();
  for (int64_t i = 0; i < 2 * 2 * 64; ++i) ASSERT_EQ(Bits(got[i]), Bits(x[i])) << i;
  std::vector<float> want(x.begin() + 2 * 2 * 64, x.end());
  const int32_t p3 = 3;
  rope.Apply(want.data(), 1, 2, &p3);
  for (int64_t i = 0; i < 2 * 64; ++i) EXPECT_NEAR(got[2 * 2 * 64 + i], want[i], 1e-6f) << i;
}

// SwiGLU tolerance: |gpu - cpu| <= 2e-6 * |cpu| + 1e-35. CUDA's expf is within 2 ulp, the CPU's
// within 1; the add, divide and multiply round once each on both sides, so the two differ by
// at most about 6 ulp (7e-7 relative); the absolute term covers results near the subnormal
// range, where exp(-g) overflows on one side and not the other.
TEST(SwiGluGpu, MatchesCpu) {
  QKV_SKIP_WITHOUT_CUDA_DEVICE();
  std::mt19937_64 rng(FreshSeed());
  for (const int64_t n : {1, 3, 4, 5, 1000, 4097, (1 << 20) + 3}) {
    for (const bool in_place : {false, true}) {
      for (const int64_t offset : {0, 1}) {
        SCOPED_TRACE(::testing::Message()
                     << "n " << n << " in_place " << in_place << " offset " << offset);
        std::vector<float> gate = RandomFloats(n + offset, -20.0f, 20.0f, rng);
        const std::vector<float> up = RandomFloats(n + offset, -3.0f, 3.0f, rng);
        // Saturation and overflow of exp(-g).
        const float specials[] = {0.0f, -0.0f, 100.0f, -100.0f, -88.5f, -88.8f, -87.0f, 88.0f};
        for (size_t k = 0; k < std::size(specials) && k < static_cast<size_t>(n); ++k) {
          gate[offset + k * (n / std::size(specials) + 1) % n] = specials[k];
        }
        std::vector<float> want(n);
        SwiGlu(gate.data() + offset, up.data() + offset, want.data(), n);
        DeviceBuffer d_gate(gate), d_up(up), d_out((n + offset) * sizeof(float));
        float* out = in_place ? d_gate.f32() + offset : d_out.f32() + offset;
        ASSERT_TRUE(cuda::SwiGlu(d_gate.f32() + offset, d_up.f32() + offset, out, n, nullptr).ok());
        SyncOk();
        const std::vector<float> got_all =
            in_place ? d_gate.ToHost<float>() : d_out.ToHost<float>();
        for (int64_t i = 0; i < n; ++i) {
          const float got = got_all[offset + i];
          ASSERT_NEAR(got, want[i], 2e-6f * std::fabs(want[i]) + 1e-35f)
              << "element " << i << " gate " << gate[offset + i] << " up " << up[offset + i];
        }
      }
    }
  }
}

TEST(AddRowBiasGpu, MatchesHostLoopExactly) {
  QKV_SKIP_WITHOUT_CUDA_DEVICE();
  std::mt19937_64 rng(FreshSeed());
  struct Shape {
    int64_t rows, n;
  };
  const Shape shapes[] = {{1, 1}, {7, 3}, {300, 4}, {33, 896}, {5, 1001}, {1000, 128}};
  for (const Shape& sh : shapes) {
    // offset 1: unaligned x and bias, the scalar path.
    for (const int64_t offset : {0, 1}) {
      SCOPED_TRACE(::testing::Message()
                   << "rows " << sh.rows << " n " << sh.n << " offset " << offset);
      const std::vector<float> x = RandomFloats(sh.rows * sh.n + offset, -5.0f, 5.0f, rng);
      const std::vector<float> bias = RandomFloats(sh.n + offset, -1.0f, 1.0f, rng);
      DeviceBuffer d_x(x), d_bias(bias);
      ASSERT_TRUE(
          cuda::AddRowBias(d_x.f32() + offset, d_bias.f32() + offset, sh.rows, sh.n, nullptr).ok());
      SyncOk();
      const std::vector<float> got = d_x.ToHost<float>();
      if (offset) {
        ASSERT_EQ(Bits(got[0]), Bits(x[0])) << "wrote before x";
      }
      for (int64_t r = 0; r < sh.rows; ++r) {
        for (int64_t i = 0; i < sh.n; ++i) {
          const float want = x[offset + r * sh.n + i] + bias[offset + i];
          ASSERT_EQ(Bits(got[offset + r * sh.n + i]), Bits(want)) << "row " << r << " col " << i;
        }
      }
    }
  }
}

}  // namespace
}  // namespace quantkv::kernels
