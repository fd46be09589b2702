// The reduce-scatter and the all-to-all of the MPI communicator (and its reduce-scatter form
// of the sum all-reduce), against their definitions: run as `mpirun -np N tp_collectives_test`
// with N = 1, 2, 3 (ctest does). Every rank makes every rank's data from a seed, so each can
// check its result against the plain float sum in rank order, bit for bit. Bad arguments on
// one rank must give every rank an error naming them, not a hang.
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "runtime/comm/communicator.h"
#include "runtime/comm/mpi_communicator.h"
#include "tests/tp/collective_test_data.h"
#include "tests/tp/test_comm.h"

namespace quantkv {
namespace {

using testing::Byte;
using testing::Count;
using testing::RankData;
using testing::RankOrderedSum;

Communicator& Comm() { return testing::TestComm(); }

TEST(ReduceScatterChunkTest, SplitsEvenlyFirstChunksLonger) {
  for (int ranks : {1, 2, 3, 4, 7}) {
    for (int64_t n : {0, 1, 2, 3, 5, 6, 7, 100, 1001}) {
      int64_t next = 0;
      for (int r = 0; r < ranks; ++r) {
        const ChunkRange c = ReduceScatterChunk(n, ranks, r);
        EXPECT_EQ(c.begin, next) << n << " over " << ranks << ", rank " << r;
        EXPECT_EQ(c.size(), n / ranks + (r < n % ranks ? 1 : 0));
        next = c.end;
      }
      EXPECT_EQ(next, n);
    }
  }
}

TEST(MpiCollectivesTest, ReduceScatterSumIsTheRankOrderedSumOfItsChunk) {
  Communicator& c = Comm();
  ASSERT_EQ(c.name(), "mpi");
  const int p = c.size();
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{p - 1}, int64_t{p}, int64_t{p + 1},
                    int64_t{1000}, int64_t{1001}, int64_t{4099}}) {
    SCOPED_TRACE(::testing::Message() << "n " << n << ", rank " << c.rank() << " of " << p);
    const uint32_t seed = static_cast<uint32_t>(n) + 1;
    const std::vector<float> mine = RankData(c.rank(), n, seed);
    const std::vector<float> want = RankOrderedSum(p, n, seed);
    const ChunkRange chunk = ReduceScatterChunk(n, p, c.rank());
    std::vector<float> got(static_cast<size_t>(chunk.size()) + 1, -7.0f);
    ASSERT_TRUE(c.ReduceScatterSum(mine.data(), n, got.data()).ok());
    EXPECT_EQ(0, std::memcmp(got.data(), want.data() + chunk.begin, chunk.size() * sizeof(float)))
        << "not the float sum in rank order, bit for bit";
    EXPECT_EQ(got.back(), -7.0f) << "wrote past its chunk";
    // In place: the chunk lands where it was.
    std::vector<float> x = mine;
    ASSERT_TRUE(c.ReduceScatterSum(x.data(), n, x.data() + chunk.begin).ok());
    EXPECT_EQ(0, std::memcmp(x.data() + chunk.begin, want.data() + chunk.begin,
                             chunk.size() * sizeof(float)));
  }
}

// Both paths of AllReduceSum (one all-gather below the threshold, reduce-scatter plus
// all-gather from it) give the rank-ordered sum's bits on every rank.
TEST(MpiCollectivesTest, AllReduceSumThroughReduceScatterHasTheSameBits) {
  Communicator& c = Comm();
  MpiCommunicatorOptions always, never;
  always.reduce_scatter_min_elements = 0;
  never.reduce_scatter_min_elements = -1;
  auto rs = CreateMpiCommunicator(always);
  auto gather = CreateMpiCommunicator(never);
  ASSERT_TRUE(rs.ok()) << rs.status();
  ASSERT_TRUE(gather.ok()) << gather.status();
  for (int64_t n : {int64_t{1}, int64_t{c.size() + 1}, int64_t{577}, int64_t{20000}}) {
    SCOPED_TRACE(::testing::Message() << "n " << n << ", rank " << c.rank());
    const uint32_t seed = static_cast<uint32_t>(n) + 99;
    const std::vector<float> want = RankOrderedSum(c.size(), n, seed);
    for (Communicator* comm : {rs->get(), gather->get(), &c}) {
      std::vector<float> x = RankData(c.rank(), n, seed);
      ASSERT_TRUE(comm->AllReduceSum(x.data(), n).ok());
      EXPECT_EQ(0, std::memcmp(x.data(), want.data(), n * sizeof(float)));
    }
  }
}

TEST(MpiCollectivesTest, AllToAllVDeliversUnevenAndEmptyPieces) {
  Communicator& c = Comm();
  const int p = c.size(), me = c.rank();
  for (int64_t scale : {0, 1, 37, 5000}) {
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

// One rank's bad argument: every rank gets INVALID_ARGUMENT (the bad one naming the argument,
// the others the rank), and the group stays usable: no data moved.
TEST(MpiCollectivesTest, BadArgumentsFailOnEveryRankWithoutAHang) {
  Communicator& c = Comm();
  const int p = c.size(), bad = p - 1;
  const bool is_bad = c.rank() == bad;
  std::vector<uint8_t> recv;
  std::vector<int64_t> recv_counts;
  {
    std::vector<int64_t> counts(p, 4);
    if (is_bad) counts.push_back(4);  // one entry too many
    std::vector<uint8_t> send(static_cast<size_t>(4 * (p + 1)));
    const absl::Status s = c.AllToAllV(send.data(), counts, &recv, &recv_counts);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    const std::string want = is_bad ? absl::StrCat("send_bytes has ", p + 1, " entries")
                                    : absl::StrCat("rank ", bad, " passed invalid send counts");
    EXPECT_NE(std::string(s.message()).find(want), std::string::npos) << s;
  }
  {
    std::vector<int64_t> counts(p, 2);
    if (is_bad) counts[0] = -3;
    std::vector<uint8_t> send(static_cast<size_t>(2 * p));
    const absl::Status s = c.AllToAllV(send.data(), counts, &recv, &recv_counts);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    const std::string want = is_bad ? "send_bytes[0] = -3 is negative"
                                    : absl::StrCat("rank ", bad, " passed invalid send counts");
    EXPECT_NE(std::string(s.message()).find(want), std::string::npos) << s;
  }
  {
    std::vector<float> x(11, 1.0f), out(11);
    const absl::Status s = c.ReduceScatterSum(x.data(), is_bad ? -1 : 10, out.data());
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(std::string(s.message()).find(absl::StrCat("rank ", bad, "'s count -1")),
              std::string::npos)
        << s;
  }
  if (p > 1) {
    std::vector<float> x(11, 1.0f), out(11);
    const absl::Status s = c.ReduceScatterSum(x.data(), is_bad ? 11 : 10, out.data());
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(std::string(s.message()).find(absl::StrCat("rank ", bad, " passed n = 11")),
              std::string::npos)
        << s;
  }
  // Still in step: a good collective after the refused ones.
  std::vector<float> x(5, 1.0f);
  ASSERT_TRUE(c.AllReduceSum(x.data(), 5).ok());
  EXPECT_EQ(x[4], static_cast<float>(p));
}

}  // namespace
}  // namespace quantkv
