// The NCCL communicator (runtime/comm/nccl_communicator.h), bootstrapped over MPI, against the
// collectives' definitions: run as `mpirun -np N nccl_comm_test`. ctest registers N = 1 only,
// since NCCL refuses two ranks on one GPU and CI machines have at most one; on a machine with
// N GPUs the same binary is correct at -np N (every check is written for any group size:
// every rank makes every rank's data from a seed and checks its result, and the ranks compare
// results through the MPI group).
//
// Without a CUDA device the collective tests skip, saying why; the tests that need no device
// still run: creation fails with a clear error on every rank (no crash, no hang), and bad
// options are refused on every rank.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/comm_codec.h"
#include "kernels/cuda/device.h"
#include "runtime/comm/communicator.h"
#include "runtime/comm/compressed_communicator.h"
#include "runtime/comm/mpi_communicator.h"
#include "runtime/comm/nccl_communicator.h"
#include "tests/tp/collective_test_data.h"

namespace quantkv {
namespace {

using testing::Byte;
using testing::Count;
using testing::RankData;
using testing::RankOrderedSum;

bool Has(const absl::Status& s, const std::string& needle) {
  return std::string(s.message()).find(needle) != std::string::npos;
}

// The bootstrap: one MPI communicator for the process (MPI initializes once and finalizes at
// exit, after this is destroyed).
Communicator& Mpi() {
  static std::unique_ptr<Communicator> comm = [] {
    absl::StatusOr<std::unique_ptr<Communicator>> c = CreateMpiCommunicator();
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : std::unique_ptr<Communicator>(new LocalCommunicator());
  }();
  return *comm;
}

// Whether every rank has a CUDA device, agreed over MPI so that all ranks take the same
// branch (a rank that skipped a collective test would leave the others in it): ok, or the
// first failing rank's reason.
const absl::Status& DevicesOnEveryRank() {
  static const absl::Status agreed = [] {
    absl::StatusOr<int> count = kernels::cuda::QueryCudaDeviceCount();
    absl::Status local = count.status();
    if (count.ok() && *count == 0) {
      local = absl::FailedPreconditionError("the driver reports 0 CUDA devices");
    }
    return AgreeOnStatus(Mpi(), local);
  }();
  return agreed;
}

// The NCCL communicator the collective tests share, made on first use (collectively: every
// rank gets here in the same test) and destroyed by the environment below before MPI ends.
struct Shared {
  std::unique_ptr<Communicator> nccl;
  std::string skip;      // why the collective tests skip, when they do
  absl::Status created;  // creation's result when devices are present
};

Shared* made = nullptr;  // set once State() has run, for the environment's teardown

Shared& State() {
  static Shared s = [] {
    Shared st;
    if (!DevicesOnEveryRank().ok()) {
      st.skip = absl::StrCat("no CUDA device: ", DevicesOnEveryRank().message());
      return st;
    }
    absl::StatusOr<std::unique_ptr<Communicator>> c = CreateNcclCommunicator(Mpi());
    st.created = c.status();
    if (c.ok()) {
      st.nccl = std::move(*c);
    } else if (Has(c.status(), "would share one CUDA device")) {
      // More ranks than GPUs on a node (every rank agreed on this error): not testable here.
      st.skip = absl::StrCat("NCCL needs a GPU per rank: ", c.status().message());
    }
    return st;
  }();
  made = &s;
  return s;
}

class ReleaseNccl : public ::testing::Environment {
 public:
  // NCCL's teardown before MPI's (at exit) and while every rank is still here.
  void TearDown() override {
    if (made != nullptr) made->nccl.reset();
  }
};
[[maybe_unused]] ::testing::Environment* const kReleaseNccl =
    ::testing::AddGlobalTestEnvironment(new ReleaseNccl);

#define NCCL_OR_SKIP(c)                                    \
  if (!State().skip.empty()) GTEST_SKIP() << State().skip; \
  ASSERT_TRUE(State().created.ok()) << State().created;    \
  ASSERT_NE(State().nccl, nullptr);                        \
  Communicator& c = *State().nccl

// Whether every rank holds the same bytes (compared through MPI).
bool SameOnEveryRank(const void* data, int64_t bytes) {
  Communicator& m = Mpi();
  std::vector<uint8_t> all(static_cast<size_t>(bytes) * m.size());
  EXPECT_TRUE(m.AllGather(data, bytes, all.data()).ok());
  for (int r = 0; r < m.size(); ++r) {
    if (std::memcmp(all.data() + r * bytes, data, static_cast<size_t>(bytes)) != 0) return false;
  }
  return true;
}

// This test binary exists only in builds with CUDA (tests/tp/CMakeLists.txt), so the build it
// runs in has the NCCL communicator.
TEST(NcclAvailableTest, MatchesTheBuild) { EXPECT_TRUE(NcclAvailable()); }

// No device on some rank: every rank gets the same clear error, quickly, from both forms.
TEST(NcclCreateTest, WithoutADeviceEveryRankGetsAClearError) {
  if (DevicesOnEveryRank().ok()) GTEST_SKIP() << "every rank has a CUDA device";
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<std::unique_ptr<Communicator>> c = CreateNcclCommunicator(Mpi());
  ASSERT_FALSE(c.ok());
  std::cout << "[ error ] " << c.status() << "\n";  // what a user without a GPU reads
  EXPECT_EQ(c.status().code(), absl::StatusCode::kFailedPrecondition) << c.status();
  EXPECT_TRUE(Has(c.status(), "no usable CUDA device")) << c.status();
  EXPECT_TRUE(Has(c.status(), "rank ")) << "names the rank: " << c.status();
  // The owning form, over a second MPI communicator, says the same.
  absl::StatusOr<std::unique_ptr<Communicator>> mpi = CreateMpiCommunicator();
  ASSERT_TRUE(mpi.ok()) << mpi.status();
  absl::StatusOr<std::unique_ptr<Communicator>> owned = CreateNcclCommunicator(std::move(*mpi));
  ASSERT_FALSE(owned.ok());
  EXPECT_EQ(owned.status().code(), absl::StatusCode::kFailedPrecondition) << owned.status();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(s, 20.0) << "refusing should not wait for anything";
  // The group is still in step after the refusals.
  std::vector<float> x(3, 1.0f);
  ASSERT_TRUE(Mpi().AllReduceSum(x.data(), 3).ok());
  EXPECT_EQ(x[0], static_cast<float>(Mpi().size()));
}

// Options are checked before any device is touched, and agreed: every rank refuses.
TEST(NcclCreateTest, BadTimeoutIsRefusedOnEveryRank) {
  NcclCommunicatorOptions o;
  o.timeout_s = std::nan("");
  absl::StatusOr<std::unique_ptr<Communicator>> c = CreateNcclCommunicator(Mpi(), o);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  EXPECT_TRUE(Has(c.status(), "timeout must be finite")) << c.status();

  setenv("QUANTKV_COMM_TIMEOUT_S", "soon", 1);
  c = CreateNcclCommunicator(Mpi());
  unsetenv("QUANTKV_COMM_TIMEOUT_S");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  EXPECT_TRUE(Has(c.status(), "QUANTKV_COMM_TIMEOUT_S='soon'")) << c.status();
}

TEST(NcclCreateTest, DeviceOutOfRangeIsRefusedOnEveryRank) {
  if (!DevicesOnEveryRank().ok()) GTEST_SKIP() << DevicesOnEveryRank().message();
  NcclCommunicatorOptions o;
  o.device = 1 << 20;
  absl::StatusOr<std::unique_ptr<Communicator>> c = CreateNcclCommunicator(Mpi(), o);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  EXPECT_TRUE(Has(c.status(), "device 1048576 requested")) << c.status();
}

TEST(NcclCollectivesTest, SpansTheBootstrapGroup) {
  NCCL_OR_SKIP(c);
  EXPECT_EQ(c.name(), "nccl");
  EXPECT_EQ(c.rank(), Mpi().rank());
  EXPECT_EQ(c.size(), Mpi().size());
}

// NCCL's all-reduce adds in its own order, so the check against the rank-ordered sum is
// within rounding (n values over six decades: a relative bound per element on the sum of
// magnitudes); across ranks the bits must be identical. Sizes cross the scratch buffers' 1 MiB
// steps.
TEST(NcclCollectivesTest, AllReduceSumIsTheSumWithTheSameBitsOnEveryRank) {
  NCCL_OR_SKIP(c);
  const int p = c.size();
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{7}, int64_t{1000}, int64_t{300001}}) {
    SCOPED_TRACE(::testing::Message() << "n " << n << ", rank " << c.rank() << " of " << p);
    const uint32_t seed = static_cast<uint32_t>(n) + 5;
    std::vector<float> x = RankData(c.rank(), n, seed);
    const std::vector<float> want = RankOrderedSum(p, n, seed);
    std::vector<double> magnitude(static_cast<size_t>(n), 0.0);
    for (int r = 0; r < p; ++r) {
      const std::vector<float> y = RankData(r, n, seed);
      for (int64_t i = 0; i < n; ++i) magnitude[i] += std::fabs(y[i]);
    }
    ASSERT_TRUE(c.AllReduceSum(x.data(), n).ok());
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_LE(std::fabs(double{x[i]} - want[i]), 2.0 * p * 0x1p-24 * magnitude[i])
          << "value " << i << ": " << x[i] << " vs " << want[i];
    }
    if (p == 1) {
      EXPECT_EQ(0, std::memcmp(x.data(), want.data(), n * sizeof(float))) << "one rank: itself";
    }
    EXPECT_TRUE(SameOnEveryRank(x.data(), n * static_cast<int64_t>(sizeof(float))));
  }
}

// The interface's exact contract: this rank's chunk of the rank-ordered fp32 sum, bit for bit
// (SumGatheredInRankOrder on every rank's input), in place too, nothing written past it.
TEST(NcclCollectivesTest, ReduceScatterSumIsTheRankOrderedSumOfItsChunk) {
  NCCL_OR_SKIP(c);
  const int p = c.size();
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{p - 1}, int64_t{p}, int64_t{p + 1},
                    int64_t{1000}, int64_t{1001}, int64_t{4099}, int64_t{300001}}) {
    SCOPED_TRACE(::testing::Message() << "n " << n << ", rank " << c.rank() << " of " << p);
    const uint32_t seed = static_cast<uint32_t>(n) + 1;
    const std::vector<float> mine = RankData(c.rank(), n, seed);
    std::vector<float> gathered;
    for (int r = 0; r < p; ++r) {
      const std::vector<float> y = RankData(r, n, seed);
      gathered.insert(gathered.end(), y.begin(), y.end());
    }
    std::vector<float> want(static_cast<size_t>(n));
    SumGatheredInRankOrder(gathered.data(), n, p, want.data());
    const ChunkRange chunk = ReduceScatterChunk(n, p, c.rank());
    std::vector<float> got(static_cast<size_t>(chunk.size()) + 1, -7.0f);
    ASSERT_TRUE(c.ReduceScatterSum(mine.data(), n, got.data()).ok());
    EXPECT_EQ(0, std::memcmp(got.data(), want.data() + chunk.begin, chunk.size() * sizeof(float)))
        << "not SumGatheredInRankOrder's bits";
    EXPECT_EQ(got.back(), -7.0f) << "wrote past its chunk";
    std::vector<float> x = mine;
    ASSERT_TRUE(c.ReduceScatterSum(x.data(), n, x.data() + chunk.begin).ok());
    EXPECT_EQ(0, std::memcmp(x.data() + chunk.begin, want.data() + chunk.begin,
                             chunk.size() * sizeof(float)))
        << "in place";
  }
}

TEST(NcclCollectivesTest, AllGatherPlacesEveryRanksBytes) {
  NCCL_OR_SKIP(c);
  const int p = c.size();
  for (int64_t bytes : {int64_t{0}, int64_t{1}, int64_t{13}, int64_t{100000}}) {
    SCOPED_TRACE(::testing::Message() << "bytes " << bytes << ", rank " << c.rank());
    std::vector<uint8_t> send(static_cast<size_t>(bytes));
    for (int64_t i = 0; i < bytes; ++i) send[i] = Byte(c.rank(), 0, i);
    std::vector<uint8_t> recv(static_cast<size_t>(bytes * p) + 1, 0xee);
    const int64_t sent_before = c.bytes_sent();
    ASSERT_TRUE(c.AllGather(send.data(), bytes, recv.data()).ok());
    EXPECT_EQ(c.bytes_sent() - sent_before, (p - 1) * bytes);
    for (int r = 0; r < p; ++r) {
      for (int64_t i = 0; i < bytes; ++i) {
        ASSERT_EQ(recv[r * bytes + i], Byte(r, 0, i)) << "rank " << r << " byte " << i;
      }
    }
    EXPECT_EQ(recv.back(), 0xee) << "wrote past the end";
  }
}

TEST(NcclCollectivesTest, AllToAllVDeliversUnevenAndEmptyPieces) {
  NCCL_OR_SKIP(c);
  const int p = c.size(), me = c.rank();
  for (int64_t scale : {0, 1, 37, 5000, 300000}) {
    SCOPED_TRACE(::testing::Message() << "scale " << scale << ", rank " << me << " of " << p);
    std::vector<int64_t> counts(p);
    std::vector<uint8_t> send;
    int64_t to_others = 0;
    for (int q = 0; q < p; ++q) {
      counts[q] = Count(me, q, p, scale);
      for (int64_t i = 0; i < counts[q]; ++i) send.push_back(Byte(me, q, i));
      if (q != me) to_others += counts[q];
    }
    std::vector<uint8_t> recv(3, 0xee);  // resized by the call
    std::vector<int64_t> recv_counts;
    const int64_t sent_before = c.bytes_sent();
    ASSERT_TRUE(c.AllToAllV(send.data(), counts, &recv, &recv_counts).ok());
    // The pieces for other ranks, plus the all-gather of the counts.
    EXPECT_EQ(c.bytes_sent() - sent_before,
              to_others + (p - 1) * p * static_cast<int64_t>(sizeof(int64_t)));
    ASSERT_EQ(recv_counts.size(), static_cast<size_t>(p));
    int64_t at = 0;
    for (int from = 0; from < p; ++from) {
      ASSERT_EQ(recv_counts[from], Count(from, me, p, scale)) << "from " << from;
      for (int64_t i = 0; i < recv_counts[from]; ++i) {
        ASSERT_EQ(recv[at + i], Byte(from, me, i)) << "from " << from << " byte " << i;
      }
      at += recv_counts[from];
    }
    EXPECT_EQ(static_cast<int64_t>(recv.size()), at);
  }
}

TEST(NcclCollectivesTest, BroadcastCopiesTheRootsBytesFromEveryRoot) {
  NCCL_OR_SKIP(c);
  const int p = c.size();
  for (int root = 0; root < p; ++root) {
    for (int64_t bytes : {int64_t{0}, int64_t{1}, int64_t{4097}}) {
      SCOPED_TRACE(::testing::Message() << "root " << root << ", bytes " << bytes);
      std::vector<uint8_t> data(static_cast<size_t>(bytes), 0);
      if (c.rank() == root) {
        for (int64_t i = 0; i < bytes; ++i) data[i] = Byte(root, 1, i);
      }
      ASSERT_TRUE(c.Broadcast(data.data(), bytes, root).ok());
      for (int64_t i = 0; i < bytes; ++i) ASSERT_EQ(data[i], Byte(root, 1, i)) << "byte " << i;
    }
  }
}

TEST(NcclCollectivesTest, BarrierCompletes) {
  NCCL_OR_SKIP(c);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(c.Barrier().ok());
}

// Bad arguments: INVALID_ARGUMENT naming them. The local checks (every rank passes the same bad
// argument here, since a rank that refuses alone leaves the others to their timeout) and the
// collective ones (one rank's bad count reaches every rank); the group stays usable after all.
TEST(NcclCollectivesTest, BadArgumentsAreRefusedAndTheGroupStaysInStep) {
  NCCL_OR_SKIP(c);
  const int p = c.size(), bad = p - 1;
  const bool is_bad = c.rank() == bad;
  std::vector<float> x(11, 1.0f), out(11);
  auto refused = [](const absl::Status& s, const std::string& what) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_TRUE(Has(s, what)) << "want '" << what << "' in: " << s;
  };
  refused(c.AllReduceSum(x.data(), -1), "NCCL AllReduceSum: count -1 outside");
  refused(c.AllReduceSum(nullptr, 4), "NCCL AllReduceSum: data is null");
  refused(c.AllGather(x.data(), -2, out.data()), "NCCL AllGather: count -2 outside");
  refused(c.AllGather(nullptr, 8, out.data()), "NCCL AllGather: send is null");
  refused(c.AllGather(x.data(), 8, nullptr), "NCCL AllGather: recv is null");
  refused(c.Broadcast(x.data(), 4, p), absl::StrCat("Broadcast: root ", p, " outside"));
  refused(c.Broadcast(x.data(), 4, -1), "Broadcast: root -1 outside");
  refused(c.Broadcast(nullptr, 4, 0), "NCCL Broadcast: data is null");
  refused(c.ReduceScatterSum(nullptr, 4, out.data()), "NCCL ReduceScatterSum: send is null");
  refused(c.ReduceScatterSum(x.data(), is_bad ? -1 : 10, out.data()),
          absl::StrCat("rank ", bad, "'s count -1"));
  if (p > 1) {
    refused(c.ReduceScatterSum(x.data(), is_bad ? 11 : 10, out.data()),
            absl::StrCat("rank ", bad, " passed n = 11"));
  }
  {
    std::vector<int64_t> counts(p, 2);
    if (is_bad) counts[0] = -3;
    std::vector<uint8_t> send(static_cast<size_t>(2 * p)), recv;
    std::vector<int64_t> recv_counts;
    refused(c.AllToAllV(send.data(), counts, &recv, &recv_counts),
            is_bad ? "send_bytes[0] = -3 is negative"
                   : absl::StrCat("rank ", bad, " passed invalid send counts"));
  }
  std::vector<float> y(5, 1.0f);
  ASSERT_TRUE(c.AllReduceSum(y.data(), 5).ok());
  EXPECT_EQ(y[4], static_cast<float>(p));
}

// --comm-compress wraps whatever group it is given: over NCCL it moves its payloads with
// AllToAllV and AllGather and sums in rank order, so it must give the bits it gives over MPI.
TEST(NcclCollectivesTest, CompressedAllReduceOnTopMatchesItOverMpi) {
  NCCL_OR_SKIP(c);
  CompressedCommConfig cfg;
  cfg.codec = *kernels::ParseCommCodecConfig("int8:g64:out2");
  cfg.min_elements = 0;
  absl::StatusOr<std::unique_ptr<CompressedCommunicator>> over_nccl =
      CompressedCommunicator::Create(c, cfg);
  absl::StatusOr<std::unique_ptr<CompressedCommunicator>> over_mpi =
      CompressedCommunicator::Create(Mpi(), cfg);
  ASSERT_TRUE(over_nccl.ok()) << over_nccl.status();
  ASSERT_TRUE(over_mpi.ok()) << over_mpi.status();
  EXPECT_EQ((*over_nccl)->name(), "nccl+int8:g64:out2");
  for (int64_t n : {int64_t{70}, int64_t{576 * 9 + 1}, int64_t{20000}}) {
    SCOPED_TRACE(::testing::Message() << "n " << n);
    std::vector<float> a = RankData(c.rank(), n, 77), b = a;
    ASSERT_TRUE((*over_nccl)->AllReduceSum(a.data(), n).ok());
    ASSERT_TRUE((*over_mpi)->AllReduceSum(b.data(), n).ok());
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), n * sizeof(float)));
    EXPECT_EQ((*over_nccl)->stats().compressed_calls, (*over_mpi)->stats().compressed_calls);
  }
}

}  // namespace
}  // namespace quantkv
