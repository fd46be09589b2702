// Shard arithmetic (no model, no MPI) and the one-rank LocalCommunicator.
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/comm/communicator.h"
#include "runtime/comm/tensor_shard.h"

namespace quantkv {
namespace {

// SmolLM2-135M: 9 query heads over 3 KV heads, head_dim 64, intermediate 1536, Q4_1 blocks.
ShardShape Smol() {
  ShardShape s;
  s.n_heads = 9;
  s.n_kv_heads = 3;
  s.head_dim = 64;
  s.intermediate = 1536;
  s.intermediate_align = 32;
  s.o_align = 32;
  return s;
}

TEST(SplitEvenlyTest, EarlierRanksTakeTheRemainder) {
  EXPECT_EQ(SplitEvenly(3, 0, 2).begin, 0);
  EXPECT_EQ(SplitEvenly(3, 0, 2).size, 2);
  EXPECT_EQ(SplitEvenly(3, 1, 2).begin, 2);
  EXPECT_EQ(SplitEvenly(3, 1, 2).size, 1);
  for (int ranks = 1; ranks <= 7; ++ranks) {
    int64_t next = 0;
    for (int r = 0; r < ranks; ++r) {
      const ShardRange s = SplitEvenly(10, r, ranks);
      EXPECT_EQ(s.begin, next) << ranks;
      EXPECT_GE(s.size, 10 / ranks);
      EXPECT_LE(s.size, 10 / ranks + 1);
      next = s.end();
    }
    EXPECT_EQ(next, 10) << ranks;
  }
}

TEST(PlanTensorShardTest, OneRankHoldsEverything) {
  auto t = PlanTensorShard(Smol(), 0, 1);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_TRUE(t->whole());
  EXPECT_EQ(t->kv_heads.size, 3);
  EXPECT_EQ(t->heads.size, 9);
  EXPECT_EQ(t->intermediate.size, 1536);
}

TEST(PlanTensorShardTest, ThreeKvHeadsOverTwoRanksSplitTwoOne) {
  auto a = PlanTensorShard(Smol(), 0, 2);
  auto b = PlanTensorShard(Smol(), 1, 2);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->kv_heads.begin, 0);
  EXPECT_EQ(a->kv_heads.size, 2);
  EXPECT_EQ(a->heads.begin, 0);
  EXPECT_EQ(a->heads.size, 6);
  EXPECT_EQ(b->kv_heads.begin, 2);
  EXPECT_EQ(b->kv_heads.size, 1);
  EXPECT_EQ(b->heads.begin, 6);
  EXPECT_EQ(b->heads.size, 3);
  // 48 blocks of 32: 24 each.
  EXPECT_EQ(a->intermediate.begin, 0);
  EXPECT_EQ(a->intermediate.size, 768);
  EXPECT_EQ(b->intermediate.begin, 768);
  EXPECT_EQ(b->intermediate.size, 768);
}

TEST(PlanTensorShardTest, ThreeRanksTakeOneKvHeadEach) {
  for (int r = 0; r < 3; ++r) {
    auto t = PlanTensorShard(Smol(), r, 3);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->kv_heads.begin, r);
    EXPECT_EQ(t->kv_heads.size, 1);
    EXPECT_EQ(t->heads.begin, 3 * r);
    EXPECT_EQ(t->heads.size, 3);
    EXPECT_EQ(t->intermediate.begin, 512 * r);
    EXPECT_EQ(t->intermediate.size, 512);
  }
}

TEST(PlanTensorShardTest, IntermediateSplitsOnWholeBlocks) {
  ShardShape s = Smol();
  s.intermediate = 32 * 5;  // 5 blocks over 2 ranks: 3 + 2
  auto a = PlanTensorShard(s, 0, 2);
  auto b = PlanTensorShard(s, 1, 2);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->intermediate.size, 96);
  EXPECT_EQ(b->intermediate.begin, 96);
  EXPECT_EQ(b->intermediate.size, 64);
  s.intermediate_align = 256;  // K-quant super-blocks: 1536 = 6 x 256 over 3 ranks
  s.intermediate = 1536;
  auto c = PlanTensorShard(s, 2, 3);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->intermediate.begin, 1024);
  EXPECT_EQ(c->intermediate.size, 512);
}

TEST(PlanTensorShardTest, RefusesWhatDoesNotSplit) {
  auto more_ranks_than_kv_heads = PlanTensorShard(Smol(), 0, 4);
  EXPECT_FALSE(more_ranks_than_kv_heads.ok());
  EXPECT_NE(more_ranks_than_kv_heads.status().message().find("--tp 4 exceeds the model's 3 KV"),
            std::string::npos)
      << more_ranks_than_kv_heads.status();
  ShardShape s = Smol();
  s.intermediate = 1000;  // not whole blocks of 32
  EXPECT_FALSE(PlanTensorShard(s, 0, 2).ok());
  s = Smol();
  s.o_align = 256;  // 3 heads x 64 = 192 columns: not whole 256-blocks of attn_output
  EXPECT_FALSE(PlanTensorShard(s, 1, 3).ok());
  EXPECT_FALSE(PlanTensorShard(Smol(), 2, 2).ok());
}

TEST(LocalCommunicatorTest, CollectivesAreIdentities) {
  LocalCommunicator c;
  EXPECT_EQ(c.rank(), 0);
  EXPECT_EQ(c.size(), 1);
  std::vector<float> x = {1.5f, -2.0f};
  ASSERT_TRUE(c.AllReduceSum(x.data(), 2).ok());
  EXPECT_EQ(x, (std::vector<float>{1.5f, -2.0f}));
  const int send = 42;
  int recv = 0;
  ASSERT_TRUE(c.AllGather(&send, sizeof(send), &recv).ok());
  EXPECT_EQ(recv, 42);
  ASSERT_TRUE(c.Broadcast(&recv, sizeof(recv), 0).ok());
  EXPECT_FALSE(c.Broadcast(&recv, sizeof(recv), 1).ok());
  EXPECT_TRUE(c.Barrier().ok());
  EXPECT_TRUE(AgreeOnStatus(c, absl::OkStatus()).ok());
  const absl::Status s = AgreeOnStatus(c, absl::NotFoundError("no model"));
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(s.message(), "rank 0: no model");
}

}  // namespace
}  // namespace quantkv
