// The MPI communicator's collectives; run as `mpirun -np 2 tp_comm_test` (ctest does).
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "runtime/comm/communicator.h"
#include "tests/tp/test_comm.h"

namespace quantkv {
namespace {

Communicator& Comm() { return testing::TestComm(); }

TEST(MpiCommunicatorTest, IsMpiWithTheLaunchersWorld) {
  ASSERT_GT(LauncherWorldSize(), 1) << "run under mpirun -np 2 (ctest does)";
  EXPECT_EQ(Comm().name(), "mpi");
  EXPECT_EQ(Comm().size(), LauncherWorldSize());
}

TEST(MpiCommunicatorTest, AllReduceSumAddsEveryRanksValues) {
  Communicator& c = Comm();
  const int n = 1000;
  std::vector<float> x(n);
  for (int i = 0; i < n; ++i) x[i] = static_cast<float>((c.rank() + 1) * 1000 + i) * 0.1f;
  ASSERT_TRUE(c.AllReduceSum(x.data(), n).ok());
  for (int i = 0; i < n; ++i) {
    float want = 0;
    for (int r = 0; r < c.size(); ++r) want += static_cast<float>((r + 1) * 1000 + i) * 0.1f;
    ASSERT_EQ(x[i], want) << i;  // rank order, as the implementation promises: exact
  }
  // And every rank holds the same bits.
  std::vector<float> all(static_cast<size_t>(n) * c.size());
  ASSERT_TRUE(c.AllGather(x.data(), n * sizeof(float), all.data()).ok());
  for (int r = 1; r < c.size(); ++r) {
    EXPECT_EQ(std::memcmp(all.data(), all.data() + r * n, n * sizeof(float)), 0) << r;
  }
}

TEST(MpiCommunicatorTest, AllGatherIsRankMajor) {
  Communicator& c = Comm();
  const int mine[2] = {c.rank(), 100 + c.rank()};
  std::vector<int> all(2 * c.size());
  ASSERT_TRUE(c.AllGather(mine, sizeof(mine), all.data()).ok());
  for (int r = 0; r < c.size(); ++r) {
    EXPECT_EQ(all[2 * r], r);
    EXPECT_EQ(all[2 * r + 1], 100 + r);
  }
}

TEST(MpiCommunicatorTest, BroadcastCopiesTheRootsBytes) {
  Communicator& c = Comm();
  const int root = c.size() - 1;
  char text[16] = {};
  if (c.rank() == root) std::strcpy(text, "from the root");
  ASSERT_TRUE(c.Broadcast(text, sizeof(text), root).ok());
  EXPECT_STREQ(text, "from the root");
  EXPECT_FALSE(c.Broadcast(text, sizeof(text), c.size()).ok());  // checked before any MPI call
  EXPECT_TRUE(c.Barrier().ok());
}

TEST(MpiCommunicatorTest, OneRanksErrorReachesEveryRank) {
  Communicator& c = Comm();
  const int bad = c.size() - 1;
  const absl::Status mine =
      c.rank() == bad ? absl::NotFoundError("cannot open model.gguf") : absl::OkStatus();
  const absl::Status agreed = AgreeOnStatus(c, mine);
  EXPECT_EQ(agreed.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(agreed.message(), absl::StrCat("rank ", bad, ": cannot open model.gguf"));
  EXPECT_TRUE(AgreeOnStatus(c, absl::OkStatus()).ok());
}

}  // namespace
}  // namespace quantkv
