// The compressed all-reduce over MPI; run as `mpirun -np N tp_compressed_comm_test` (ctest
// runs N = 2 and 3). Every rank can compute every rank's input (seeded by rank), so each
// checks its result against the exact rank-order sum, and the ranks compare their results
// bit for bit.
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "kernels/comm_codec.h"
#include "runtime/comm/communicator.h"
#include "runtime/comm/compressed_communicator.h"
#include "tests/tp/test_comm.h"

namespace quantkv {
namespace {

Communicator& Comm() { return testing::TestComm(); }

// Rank r's partial sums: N(0, 1) with an outlier channel every 97 values (as LLM hidden
// states have), different per rank.
std::vector<float> Partial(int rank, int64_t n, uint32_t salt) {
  std::mt19937 rng(1000 * rank + salt);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) x[i] = normal(rng) * (i % 97 == 13 ? 30.0f : 1.0f);
  return x;
}

std::unique_ptr<CompressedCommunicator> Compressed(const CompressedCommConfig& cfg) {
  absl::StatusOr<std::unique_ptr<CompressedCommunicator>> c =
      CompressedCommunicator::Create(Comm(), cfg);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(*c) : nullptr;
}

// Whether every rank holds the same n floats (bitwise).
bool SameOnEveryRank(const std::vector<float>& x) {
  Communicator& c = Comm();
  const int64_t bytes = static_cast<int64_t>(x.size() * sizeof(float));
  std::vector<float> all(x.size() * c.size());
  EXPECT_TRUE(c.AllGather(x.data(), bytes, all.data()).ok());
  for (int r = 0; r < c.size(); ++r) {
    if (std::memcmp(all.data() + r * x.size(), x.data(), static_cast<size_t>(bytes)) != 0) {
      return false;
    }
  }
  return true;
}

struct Expected {
  std::vector<float> sum;     // exact, in rank order (what the MPI communicator returns)
  std::vector<double> bound;  // on |compressed - sum|
};

// The exact sum and the error bound: every rank's decode error (the owner of a chunk adds
// its own exactly, so this over-counts by one rank), one requantization of a sum that may
// already be off by that much, and the fp32 rounding of two rank-order sums.
Expected Expect(const kernels::CommCodec& codec, int ranks, int64_t n, uint32_t salt) {
  Expected e;
  e.sum.assign(static_cast<size_t>(n), 0.0f);
  std::vector<double> decode_err(n, 0.0), abs_sum(n, 0.0), bound(n);
  for (int r = 0; r < ranks; ++r) {
    const std::vector<float> x = Partial(r, n, salt);
    codec.ErrorBounds(x.data(), n, bound.data());
    for (int64_t i = 0; i < n; ++i) {
      e.sum[i] = r == 0 ? x[i] : e.sum[i] + x[i];
      decode_err[i] += bound[i];
      abs_sum[i] += std::fabs(x[i]) + bound[i];
    }
  }
  const int gs = codec.config().group_size;
  e.bound.resize(n);
  for (int64_t g0 = 0; g0 < n; g0 += gs) {
    const int64_t g1 = std::min(n, g0 + gs);
    double amax = 0.0;  // of the reduced values the owner requantizes, at most
    for (int64_t i = g0; i < g1; ++i) amax = std::max(amax, std::fabs(e.sum[i]) + decode_err[i]);
    for (int64_t i = g0; i < g1; ++i) {
      const double requant =
          codec.ElementErrorBound(amax, std::fabs(e.sum[i]) + decode_err[i], false);
      e.bound[i] = decode_err[i] + requant + 2.0 * ranks * 0x1p-24 * abs_sum[i];
    }
  }
  return e;
}

TEST(CompressedAllReduceTest, IsMpiWithTheLaunchersWorld) {
  ASSERT_GT(LauncherWorldSize(), 1) << "run under mpirun -np 2 (ctest does)";
  EXPECT_EQ(Comm().size(), LauncherWorldSize());
}

// Each codec, on sizes with a padded last group, with empty chunks (fewer groups than
// ranks) and past one codec segment: bit-identical on every rank, within the bound of the
// exact sum, actually compressed (not exact), and fewer bytes sent.
TEST(CompressedAllReduceTest, BitIdenticalAcrossRanksAndWithinTheBound) {
  const int p = Comm().size();
  for (const char* spec : {"int8:g64:out0", "fp8:g64", "int4:g32:out2", "int8:g128:out4"}) {
    CompressedCommConfig cfg;
    cfg.codec = *kernels::ParseCommCodecConfig(spec);
    cfg.min_elements = 0;
    std::unique_ptr<CompressedCommunicator> comm = Compressed(cfg);
    ASSERT_NE(comm, nullptr);
    std::unique_ptr<kernels::CommCodec> codec = *kernels::CommCodec::Create(cfg.codec);
    for (int64_t n : {int64_t{70}, int64_t{576 * 9 + 1}, int64_t{576 * 512}}) {
      SCOPED_TRACE(absl::StrFormat("%s, n = %d, %d ranks", spec, n, p));
      const uint32_t salt = static_cast<uint32_t>(n);
      std::vector<float> x = Partial(comm->rank(), n, salt);
      comm->ResetStats();
      ASSERT_TRUE(comm->AllReduceSum(x.data(), n).ok());
      EXPECT_TRUE(SameOnEveryRank(x));
      const Expected want = Expect(*codec, p, n, salt);
      int64_t differ = 0;
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_LE(std::fabs(double{x[i]} - want.sum[i]), want.bound[i])
            << "value " << i << ": " << x[i] << " vs exact " << want.sum[i];
        differ += x[i] != want.sum[i];
      }
      EXPECT_GT(differ, n / 10) << "looks exact: was it compressed?";
      EXPECT_EQ(comm->stats().calls, 1);
      EXPECT_EQ(comm->stats().compressed_calls, 1);
      EXPECT_EQ(comm->stats().raw_bytes, (p - 1) * n * 4);
      if (n > 10000) {
        EXPECT_LT(comm->stats().wire_bytes, comm->stats().raw_bytes / 2);
      }
    }
  }
}

// Below the threshold, and in exact layers, the call is the wrapped communicator's: the
// exact rank-order sum, bit for bit.
TEST(CompressedAllReduceTest, BelowThresholdAndExactLayersAreExact) {
  const int p = Comm().size();
  CompressedCommConfig cfg;
  cfg.min_elements = 4096;
  cfg.exact_layers = {0, 7};
  std::unique_ptr<CompressedCommunicator> comm = Compressed(cfg);
  ASSERT_NE(comm, nullptr);
  std::unique_ptr<kernels::CommCodec> codec = *kernels::CommCodec::Create(cfg.codec);
  auto exact = [&](int64_t n) {
    std::vector<float> s = Partial(0, n, 5);
    for (int r = 1; r < p; ++r) {
      const std::vector<float> x = Partial(r, n, 5);
      for (int64_t i = 0; i < n; ++i) s[i] += x[i];
    }
    return s;
  };
  std::vector<float> small = Partial(comm->rank(), 4095, 5);
  ASSERT_TRUE(comm->AllReduceSumForLayer(small.data(), 4095, 3).ok());
  EXPECT_EQ(small, exact(4095));
  std::vector<float> layer7 = Partial(comm->rank(), 8000, 5);
  ASSERT_TRUE(comm->AllReduceSumForLayer(layer7.data(), 8000, 7).ok());
  EXPECT_EQ(layer7, exact(8000));
  EXPECT_EQ(comm->stats().compressed_calls, 0);
  EXPECT_EQ(comm->stats().wire_bytes, comm->stats().raw_bytes);
  // The same size in another layer is compressed.
  std::vector<float> layer3 = Partial(comm->rank(), 8000, 5);
  ASSERT_TRUE(comm->AllReduceSumForLayer(layer3.data(), 8000, 3).ok());
  EXPECT_NE(layer3, exact(8000));
  EXPECT_TRUE(SameOnEveryRank(layer3));
  EXPECT_EQ(comm->stats().calls, 3);
  EXPECT_EQ(comm->stats().compressed_calls, 1);
  EXPECT_LT(comm->stats().wire_bytes, comm->stats().raw_bytes);
}

// The compressed reduce-scatter: this rank's chunk (ReduceScatterChunk's split, not
// group-aligned) is the rank-ordered sum of its own exact partial and the others' decoded
// ones: within their decode bounds plus fp32 rounding; exact below the threshold; the
// all-to-all of bytes passes through.
TEST(CompressedAllReduceTest, ReduceScatterWithinTheDecodeBound) {
  const int p = Comm().size(), me = Comm().rank();
  for (const char* spec : {"int8:g64:out2", "fp8:g32", "int4:g64:out0"}) {
    CompressedCommConfig cfg;
    cfg.codec = *kernels::ParseCommCodecConfig(spec);
    cfg.min_elements = 100;
    std::unique_ptr<CompressedCommunicator> comm = Compressed(cfg);
    ASSERT_NE(comm, nullptr);
    std::unique_ptr<kernels::CommCodec> codec = *kernels::CommCodec::Create(cfg.codec);
    for (int64_t n : {int64_t{99}, int64_t{1001}, int64_t{576 * 7}}) {
      SCOPED_TRACE(absl::StrFormat("%s, n = %d, rank %d of %d", spec, n, me, p));
      const uint32_t salt = static_cast<uint32_t>(n) + 3;
      const ChunkRange chunk = ReduceScatterChunk(n, p, me);
      const int64_t len = chunk.size();
      std::vector<float> exact(static_cast<size_t>(len), 0.0f);
      std::vector<double> bound(static_cast<size_t>(len), 0.0), abs_sum(len, 0.0);
      for (int r = 0; r < p; ++r) {
        const std::vector<float> x = Partial(r, n, salt);
        // The sender encodes its chunk for this rank alone: its groups start at chunk.begin.
        std::vector<double> b(static_cast<size_t>(len));
        codec->ErrorBounds(x.data() + chunk.begin, len, b.data());
        for (int64_t i = 0; i < len; ++i) {
          const float v = x[chunk.begin + i];
          exact[i] = r == 0 ? v : exact[i] + v;
          if (r != me) bound[i] += b[i];
          abs_sum[i] += std::fabs(v) + b[i];
        }
      }
      const std::vector<float> mine = Partial(me, n, salt);
      std::vector<float> got(static_cast<size_t>(len));
      ASSERT_TRUE(comm->ReduceScatterSum(mine.data(), n, got.data()).ok());
      int64_t differ = 0;
      for (int64_t i = 0; i < len; ++i) {
        if (n < cfg.min_elements) {
          ASSERT_EQ(got[i], exact[i]) << i << ": below the threshold it must be exact";
          continue;
        }
        ASSERT_LE(std::fabs(double{got[i]} - exact[i]), bound[i] + p * 0x1p-24 * abs_sum[i])
            << "value " << i << ": " << got[i] << " vs exact " << exact[i];
        differ += got[i] != exact[i];
      }
      if (n >= cfg.min_elements) {
        EXPECT_GT(differ, len / 10) << "looks exact: compressed?";
      }
    }
    std::vector<int64_t> counts(p, 3);
    std::vector<uint8_t> send(3 * p, static_cast<uint8_t>(me)), recv;
    std::vector<int64_t> recv_counts;
    ASSERT_TRUE(comm->AllToAllV(send.data(), counts, &recv, &recv_counts).ok());
    ASSERT_EQ(recv.size(), static_cast<size_t>(3 * p));
    for (int r = 0; r < p; ++r) EXPECT_EQ(recv[3 * r], r);
  }
}

// Ranks that disagree on what to compress would exchange payloads of different sizes:
// creation fails on every rank instead, naming the rank that differs.
TEST(CompressedAllReduceTest, DifferentSettingsFailOnEveryRank) {
  const int odd = Comm().size() - 1;
  CompressedCommConfig cfg;
  if (Comm().rank() == odd) cfg.codec.group_size = 32;
  absl::StatusOr<std::unique_ptr<CompressedCommunicator>> c =
      CompressedCommunicator::Create(Comm(), cfg);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find(absl::StrFormat("rank %d's settings differ", odd)),
            std::string::npos)
      << c.status();
  // A locally invalid setting on one rank also reaches every rank.
  CompressedCommConfig bad;
  if (Comm().rank() == odd) bad.codec.group_size = 20;
  c = CompressedCommunicator::Create(Comm(), bad);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find(absl::StrFormat("rank %d: ", odd)), std::string::npos)
      << c.status();
}

}  // namespace
}  // namespace quantkv
