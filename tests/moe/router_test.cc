#include "moe/router.h"

#include <cmath>
#include <random>

#include "gtest/gtest.h"

namespace quantkv::moe {
namespace {

TEST(RouterTest, WeightingsFollowTheirDefinitions) {
  // Logits of one token over 4 experts: softmax p = exp(z) / sum.
  const float z[4] = {1.0f, 3.0f, 2.0f, -1.0f};
  double sum = 0;
  for (float v : z) sum += std::exp(static_cast<double>(v));
  const double p1 = std::exp(3.0) / sum, p2 = std::exp(2.0) / sum;
  Routing r;
  Route({.n_experts = 4, .top_k = 2, .weighting = RouterWeighting::kSoftmaxTopKNormalized}, z, 1,
        &r);
  ASSERT_EQ(r.expert.size(), 2u);
  EXPECT_EQ(r.expert[0], 1);
  EXPECT_EQ(r.expert[1], 2);
  EXPECT_NEAR(r.weight[0], p1 / (p1 + p2), 1e-7);
  EXPECT_NEAR(r.weight[1], p2 / (p1 + p2), 1e-7);
  Route({.n_experts = 4, .top_k = 2, .weighting = RouterWeighting::kSoftmaxTopK}, z, 1, &r);
  EXPECT_NEAR(r.weight[0], p1, 1e-7);
  EXPECT_NEAR(r.weight[1], p2, 1e-7);
  Route({.n_experts = 4, .top_k = 2, .weighting = RouterWeighting::kOnes}, z, 1, &r);
  EXPECT_EQ(r.weight[0], 1.0f);
  EXPECT_EQ(r.weight[1], 1.0f);
  double entropy = 0;
  for (float v : z) {
    const double p = std::exp(static_cast<double>(v)) / sum;
    entropy -= p * std::log(p);
  }
  EXPECT_NEAR(r.entropy[0], entropy, 1e-6);
}

TEST(RouterTest, TiesGoToTheLowerExpertAndUniformLogitsHaveMaximalEntropy) {
  const float z[2][6] = {{0, 0, 0, 0, 0, 0}, {5, 1, 5, 1, 5, 0}};
  Routing r;
  Route({.n_experts = 6, .top_k = 3, .weighting = RouterWeighting::kSoftmaxTopKNormalized},
        &z[0][0], 2, &r);
  EXPECT_EQ((std::vector<int32_t>(r.expert.begin(), r.expert.begin() + 3)),
            (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ((std::vector<int32_t>(r.expert.begin() + 3, r.expert.end())),
            (std::vector<int32_t>{0, 2, 4}));
  EXPECT_NEAR(r.entropy[0], std::log(6.0), 1e-6);
  for (int j = 0; j < 3; ++j) EXPECT_NEAR(r.weight[3 + j], 1.0 / 3, 1e-6);
}

TEST(RouterTest, GroupByExpertListsEveryTokenSlotOnceInTokenOrder) {
  std::mt19937 rng(7);
  std::normal_distribution<float> d;
  const int E = 8, K = 3, T = 50;
  std::vector<float> logits(T * E);
  for (float& v : logits) v = d(rng);
  Routing r;
  Route({.n_experts = E, .top_k = K, .weighting = RouterWeighting::kSoftmaxTopK}, logits.data(), T,
        &r);
  ExpertGroups g;
  GroupByExpert(r, E, &g);
  std::vector<int> seen(T * K, 0);
  for (int e = 0; e < E; ++e) {
    ASSERT_EQ(g.rows[e].size(), g.slots[e].size());
    for (size_t i = 0; i < g.rows[e].size(); ++i) {
      if (i > 0) EXPECT_LT(g.rows[e][i - 1], g.rows[e][i]);  // a token picks an expert once
      EXPECT_EQ(r.expert[g.slots[e][i]], e);
      EXPECT_EQ(g.slots[e][i] / K, g.rows[e][i]);
      ++seen[g.slots[e][i]];
    }
  }
  for (int c : seen) EXPECT_EQ(c, 1);
  // Choices are in decreasing logit order.
  for (int t = 0; t < T; ++t) {
    for (int j = 1; j < K; ++j) {
      EXPECT_GE(logits[t * E + r.expert[t * K + j - 1]], logits[t * E + r.expert[t * K + j]]);
    }
  }
}

TEST(RouterTest, BadConfigsAndNamesAreErrorsThatSayWhy) {
  absl::Status s = CheckRouterConfig({.n_experts = 4, .top_k = 5});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("top_k = 5"), std::string::npos) << s;
  EXPECT_FALSE(CheckRouterConfig({.n_experts = 0, .top_k = 1}).ok());
  EXPECT_FALSE(CheckRouterConfig({.n_experts = 4, .top_k = 0}).ok());
  EXPECT_TRUE(CheckRouterConfig({.n_experts = 4, .top_k = 4}).ok());
  EXPECT_EQ(*ParseRouterWeighting("ones"), RouterWeighting::kOnes);
  absl::StatusOr<RouterWeighting> bad = ParseRouterWeighting("sigmoid");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'sigmoid'"), std::string::npos);
}

}  // namespace
}  // namespace quantkv::moe
