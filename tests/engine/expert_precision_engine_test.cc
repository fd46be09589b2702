// Elastic expert precision in the engine: the expert store's copies, the policy's decisions
// applied between steps under the byte budget, fixed levels, and the errors.
#include <cmath>

#include "gtest/gtest.h"
#include "kernels/dequantize.h"
#include "runtime/engine/engine.h"
#include "runtime/model/hf_model.h"
#include "tests/testutil/paths.h"
#include "tests/testutil/relative_error.h"

namespace quantkv {
namespace {

using kernels::GgmlType;

std::unique_ptr<WeightSource> TinyMixtral() {
  auto w = OpenHfModelDir(testing::FixturePath("models/tiny_mixtral").string());
  EXPECT_TRUE(w.ok()) << w.status();
  return std::move(*w);
}

EngineConfig BaseConfig() {
  EngineConfig c;
  c.kv_spec = "fp32";
  c.kv_max_bytes = 1 << 20;
  c.decode_activations = kernels::ActivationPrecision::kFloat32;
  c.lm_head_activations = kernels::ActivationPrecision::kFloat32;
  return c;
}

std::vector<float> Logits(Engine& e, const std::vector<int32_t>& tokens) {
  std::vector<float> logits;
  const SequenceId seq = e.NewSequence();
  EXPECT_TRUE(e.Forward(seq, tokens, true, &logits).ok());
  EXPECT_TRUE(e.Release(seq).ok());
  return logits;
}

using testing::RelativeL2Error;

const std::vector<int32_t> kTokens = {1, 17, 200, 3, 99, 42, 255, 0, 5, 130, 7, 64, 128, 9};

TEST(ExpertPrecisionEngineTest, StoreCopiesAreTheWeightsAtEachPrecision) {
  auto exact = Engine::Create(TinyMixtral(), BaseConfig());
  ASSERT_TRUE(exact.ok());
  const std::vector<float> want = Logits(**exact, kTokens);
  double prev_err = 1e9;
  // Coarser copies are further from the loaded (F32) weights, and F32 is the same model.
  for (GgmlType t : {GgmlType::kQ4_0, GgmlType::kQ8_0, GgmlType::kF32}) {
    EngineConfig c = BaseConfig();
    c.expert_levels = {t};
    auto e = Engine::Create(TinyMixtral(), c);
    ASSERT_TRUE(e.ok()) << e.status();
    const double err = RelativeL2Error(Logits(**e, kTokens), want);
    SCOPED_TRACE(kernels::GgmlTypeInfoOf(t).name);
    if (t == GgmlType::kF32) {
      EXPECT_EQ(err, 0.0);
    } else {
      EXPECT_GT(err, 0.0);
      EXPECT_LT(err, t == GgmlType::kQ4_0 ? 0.2 : 0.01);
    }
    EXPECT_LT(err, prev_err);
    prev_err = err;
  }
}

TEST(ExpertPrecisionEngineTest, PolicyUpgradesTheBusiestExpertsWithinTheBudget) {
  EngineConfig c = BaseConfig();
  c.expert_levels = {GgmlType::kQ4_0, GgmlType::kQ8_0};
  // Room for exactly two upgrades of 8 experts (2 layers x 4).
  auto probe = Engine::Create(TinyMixtral(), c);
  ASSERT_TRUE(probe.ok()) << probe.status();
  const int64_t low = (*probe)->active_expert_bytes();
  c.expert_levels = {GgmlType::kQ8_0};
  const int64_t high = (*Engine::Create(TinyMixtral(), c))->active_expert_bytes();
  const int64_t upgrade = (high - low) / 8;
  c.expert_levels = {GgmlType::kQ4_0, GgmlType::kQ8_0};
  c.expert_budget_bytes = low + 2 * upgrade;
  c.expert_decide_every_tokens = 4;
  c.expert_half_life_tokens = 64;
  std::vector<std::vector<int>> counts(2, std::vector<int>(4, 0));
  c.routing_observer = [&](int64_t layer, const moe::Routing& r) {
    for (int32_t e : r.expert) ++counts[layer][e];
  };
  auto e = Engine::Create(TinyMixtral(), c);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->active_expert_bytes(), low);  // all low before any traffic
  const SequenceId seq = (*e)->NewSequence();
  std::vector<float> logits;
  for (int round = 0; round < 4; ++round) {
    for (int32_t t : kTokens) {
      ASSERT_TRUE((*e)->Forward(seq, {&t, 1}, false, &logits).ok());
      EXPECT_LE((*e)->active_expert_bytes(), c.expert_budget_bytes);
    }
  }
  const moe::ExpertPrecisionStats st = (*e)->expert_policy()->Stats();
  EXPECT_GT(st.decisions, 10);
  EXPECT_EQ((*e)->active_expert_bytes(), low + 2 * upgrade);
  // The two upgraded experts are the two most-routed (by the EMA, which with a half-life of
  // 64 over 56 tokens ranks like the counts unless two are close: then either is right).
  std::vector<std::pair<int, int>> by_count;
  for (int l = 0; l < 2; ++l) {
    for (int x = 0; x < 4; ++x) by_count.push_back({counts[l][x], l * 4 + x});
  }
  std::sort(by_count.rbegin(), by_count.rend());
  int upgraded = 0;
  for (int i = 0; i < 8; ++i) {
    const int level = (*e)->expert_level(by_count[i].second / 4, by_count[i].second % 4);
    if (level == 1) {
      ++upgraded;
      EXPECT_GE(by_count[i].first, by_count[2].first) << "expert " << by_count[i].second;
    }
  }
  EXPECT_EQ(upgraded, 2);
}

TEST(ExpertPrecisionEngineTest, BadSettingsAreRefusedWithTheirNames) {
  EngineConfig c = BaseConfig();
  c.expert_levels = {GgmlType::kQ4_0, GgmlType::kQ8_0};
  c.expert_budget_bytes = 1000;  // below all-Q4_0
  auto e = Engine::Create(TinyMixtral(), c);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("minimum budget"), std::string::npos) << e.status();
  c.expert_budget_bytes = 0;
  c.expert_fixed_levels = {0, 1, 2};
  e = Engine::Create(TinyMixtral(), c);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("expert_fixed_levels has 3 entries"), std::string::npos)
      << e.status();
  c.expert_fixed_levels = {0, 1, 0, 1, 0, 1, 0, 5};
  e = Engine::Create(TinyMixtral(), c);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("level 5"), std::string::npos) << e.status();
  c.expert_fixed_levels = {0, 1, 0, 1, 0, 1, 0, 1};
  e = Engine::Create(TinyMixtral(), c);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->expert_level(1, 3), 1);
  EXPECT_EQ((*e)->expert_policy(), nullptr);
  c.expert_levels = {GgmlType::kQ4_K};
  c.expert_fixed_levels = {};
  e = Engine::Create(TinyMixtral(), c);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("Q4_K"), std::string::npos) << e.status();
  auto dense = OpenHfModelDir(testing::FixturePath("models/tiny_llama_f32").string());
  c.expert_levels = {GgmlType::kQ4_0};
  e = Engine::Create(std::move(*dense), c);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("not a mixture-of-experts"), std::string::npos);
}

}  // namespace
}  // namespace quantkv
