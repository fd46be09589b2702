#include "runtime/kv/paged_kv_cache.h"

#include "gtest/gtest.h"

namespace quantkv {
namespace {

TEST(PagedKvCacheTest, ReportsSizesAndBudget) {
  // SmolLM2 shape: 30 layers, 3 KV heads of 64: fp16 stores 2*30*3*64*2 = 23040 B/token.
  KvCacheConfig c{30, 3, 64, 16, KvFormat::kF16, int64_t{100} << 20};
  auto cache = PagedKvCache::Create(c);
  ASSERT_TRUE(cache.ok());
  EXPECT_EQ((*cache)->bytes_per_token(), 23040);
  EXPECT_EQ((*cache)->bits_per_element(), 16.0);
  EXPECT_EQ((*cache)->capacity_tokens(), (int64_t{100} << 20) / 23040 / 16 * 16);
  c.format = KvFormat::kF32;
  EXPECT_EQ((*PagedKvCache::Create(c))->bytes_per_token(), 46080);
}

TEST(PagedKvCacheTest, ReserveFailsWithoutLeakingBlocks) {
  KvCacheConfig c{1, 1, 32, 4, KvFormat::kF32, 4 * 2 * 4 * 32 * 4};  // exactly 4 blocks
  auto cache = PagedKvCache::Create(c);
  ASSERT_TRUE(cache.ok());
  SequenceBlocks a, b;
  ASSERT_TRUE((*cache)->Reserve(a, 10).ok());  // 3 blocks
  EXPECT_EQ(a.blocks.size(), 3u);
  absl::Status s = (*cache)->Reserve(b, 8);  // needs 2, 1 free
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(b.blocks.empty());
  EXPECT_EQ((*cache)->allocator().num_free(), 1);
  (*cache)->Free(a);
  EXPECT_EQ((*cache)->allocator().num_free(), 4);
}

TEST(PagedKvCacheTest, WritesLandInTheRightBlockSlots) {
  KvCacheConfig c{2, 2, 4, 2, KvFormat::kF32, 1 << 16};
  auto cache = PagedKvCache::Create(c);
  ASSERT_TRUE(cache.ok());
  SequenceBlocks pad, seq;
  ASSERT_TRUE((*cache)->Reserve(pad, 2).ok());
  ASSERT_TRUE((*cache)->Reserve(seq, 5).ok());
  std::vector<float> k(5 * 8), v(5 * 8);
  for (int i = 0; i < 40; ++i) k[i] = i, v[i] = -i;
  (*cache)->Write(seq, 1, 0, 5, k.data(), v.data());
  const kernels::PagedKvLayerView view = (*cache)->View(seq, 1, 5);
  for (int t = 0; t < 5; ++t) {
    for (int h = 0; h < 2; ++h) {
      const float* kk = reinterpret_cast<const float*>(
          view.k_base + view.block_table[t / 2] * view.k_block_bytes) + (h * 2 + t % 2) * 4;
      const float* vv = reinterpret_cast<const float*>(
          view.v_base + view.block_table[t / 2] * view.v_block_bytes) + (h * 2 + t % 2) * 4;
      for (int e = 0; e < 4; ++e) {
        EXPECT_EQ(kk[e], k[t * 8 + h * 4 + e]);
        EXPECT_EQ(vv[e], v[t * 8 + h * 4 + e]);
      }
    }
  }
}

TEST(PagedKvCacheTest, RejectsBadConfig) {
  EXPECT_FALSE(PagedKvCache::Create({0, 3, 64, 16, KvFormat::kF16, 1 << 20}).ok());
  EXPECT_FALSE(PagedKvCache::Create({30, 3, 64, 16, KvFormat::kF16, 100}).ok());
  EXPECT_FALSE(ParseKvFormat("int5").ok());
  EXPECT_EQ(*ParseKvFormat("fp32"), KvFormat::kF32);
}

}  // namespace
}  // namespace quantkv
