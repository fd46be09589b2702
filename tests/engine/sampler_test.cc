#include "runtime/engine/sampler.h"

#include <cmath>
#include <map>

#include "gtest/gtest.h"

namespace quantkv {
namespace {

TEST(SamplerTest, GreedyPicksArgmaxAndPenaltiesApply) {
  Sampler greedy({});
  std::vector<float> l = {0.1f, 2.0f, 1.9f, -1.0f};
  EXPECT_EQ(greedy.Sample(l, {}), 1);
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  Sampler rep(p);
  std::vector<float> l2 = {0.1f, 2.0f, 1.9f, -1.0f};
  const int32_t hist[] = {1};
  EXPECT_EQ(rep.Sample(l2, hist), 2);  // 2.0 / 2 = 1.0 < 1.9
  EXPECT_FLOAT_EQ(l2[1], 1.0f);
}

TEST(SamplerTest, SameSeedSameTokensAndTopKRestricts) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 2;
  p.seed = 42;
  Sampler a(p), b(p);
  std::map<int32_t, int> counts;
  for (int i = 0; i < 2000; ++i) {
    std::vector<float> la = {1.0f, 1.2f, 0.9f, 0.0f}, lb = la;
    const int32_t ta = a.Sample(la, {});
    EXPECT_EQ(ta, b.Sample(lb, {}));
    ++counts[ta];
  }
  EXPECT_EQ(counts.size(), 2u);  // only the two best logits (0 and 1)
  // p(1)/p(0) = e^0.2 = 1.22; with 2000 draws the ratio lands well inside [1.0, 1.5].
  const double ratio = double(counts[1]) / counts[0];
  EXPECT_GT(ratio, 1.0);
  EXPECT_LT(ratio, 1.5);
}

TEST(SamplerTest, TopPAndMinPKeepTheHead) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_p = 0.5f;
  p.seed = 1;
  Sampler s(p);
  for (int i = 0; i < 200; ++i) {
    std::vector<float> l = {5.0f, 0.0f, 0.0f, 0.0f};  // p(0) ~ 0.98 > top_p
    EXPECT_EQ(s.Sample(l, {}), 0);
  }
  p.top_p = 1.0f;
  p.min_p = 0.5f;
  Sampler m(p);
  for (int i = 0; i < 200; ++i) {
    std::vector<float> l = {1.0f, 0.9f, -3.0f, -3.0f};
    EXPECT_LT(m.Sample(l, {}), 2);
  }
}

TEST(SamplerTest, ValidationNamesTheField) {
  SamplingParams p;
  p.top_p = 0.0f;
  absl::Status s = ValidateSamplingParams(p);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("top_p"), std::string::npos);
  p = {};
  p.temperature = -1;
  EXPECT_NE(ValidateSamplingParams(p).message().find("temperature"), std::string::npos);
  p = {};
  p.temperature = NAN;
  EXPECT_FALSE(ValidateSamplingParams(p).ok());
  EXPECT_TRUE(ValidateSamplingParams({}).ok());
}

}  // namespace
}  // namespace quantkv
