#include "runtime/kv/block_allocator.h"

#include <set>

#include "gtest/gtest.h"

namespace quantkv {
namespace {

TEST(BlockAllocatorTest, AllocatesEveryBlockOnceThenExhausts) {
  BlockAllocator a(4);
  std::set<int32_t> got;
  for (int i = 0; i < 4; ++i) {
    auto b = a.Allocate();
    ASSERT_TRUE(b.ok());
    EXPECT_TRUE(got.insert(*b).second);
    EXPECT_EQ(a.ref_count(*b), 1);
  }
  EXPECT_EQ(a.num_free(), 0);
  auto none = a.Allocate();
  EXPECT_EQ(none.status().code(), absl::StatusCode::kResourceExhausted);
}

TEST(BlockAllocatorTest, SharedBlocksFreeOnLastRelease) {
  BlockAllocator a(2);
  const int32_t b = *a.Allocate();
  ASSERT_TRUE(a.Retain(b).ok());
  EXPECT_EQ(a.ref_count(b), 2);
  ASSERT_TRUE(a.Release(b).ok());
  EXPECT_EQ(a.num_free(), 1);
  ASSERT_TRUE(a.Release(b).ok());
  EXPECT_EQ(a.num_free(), 2);
  EXPECT_EQ(a.Release(b).code(), absl::StatusCode::kFailedPrecondition);  // double free
  EXPECT_EQ(a.Retain(7).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(a.Release(-1).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace quantkv
