// MoEfication of SmolLM2 on a short text: the split is valid and round-trips through its
// file, the router beats chance at finding the experts that matter, the MoEfied model with
// every expert selected is the dense model (fp32 activations: only the summation order of
// the down projection differs), and with two of eight it is measurably not. Skips without
// the default model.
#include <cmath>
#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/eval/moefy.h"
#include "runtime/model/gguf_model.h"
#include "runtime/tokenizer/tokenizer.h"
#include "tests/testutil/fixture_text.h"
#include "tests/testutil/paths.h"
#include "tests/testutil/relative_error.h"

namespace quantkv {
namespace {

class MoefyModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = testing::DefaultModelPath();
    if (!std::filesystem::exists(path_))
      GTEST_SKIP() << "default model not in the cache: " << path_;
    auto ids = testing::FixtureTextIds(path_.string());
    ASSERT_TRUE(ids.ok()) << ids.status();
    ids_ = *ids;
  }

  std::unique_ptr<WeightSource> Dense() const {
    auto m = GgufModel::Open(path_.string());
    EXPECT_TRUE(m.ok());
    return std::unique_ptr<WeightSource>(std::move(*m));
  }

  // Dense engines for FitMoeSplit, which fills in the rest of the config.
  std::function<absl::StatusOr<std::unique_ptr<Engine>>(const EngineConfig&)> DenseFactory() const {
    return [this](const EngineConfig& c) -> absl::StatusOr<std::unique_ptr<Engine>> {
      EngineConfig cc = c;
      cc.threads = 2;
      cc.pack_weights = false;
      return Engine::Create(Dense(), cc);
    };
  }

  static EngineConfig Exact() {
    EngineConfig c;
    c.kv_spec = "fp32";
    c.kv_max_bytes = 64 << 20;
    c.threads = 2;
    c.decode_activations = kernels::ActivationPrecision::kFloat32;
    c.lm_head_activations = kernels::ActivationPrecision::kFloat32;
    c.gemm_min_rows = 1 << 30;
    c.pack_weights = false;
    return c;
  }

  std::vector<float> Logits(std::unique_ptr<WeightSource> w, int64_t top_k) const {
    EngineConfig c = Exact();
    c.moe_top_k = top_k;
    auto e = Engine::Create(std::move(w), c);
    EXPECT_TRUE(e.ok()) << e.status();
    std::vector<float> logits;
    const std::span<const int32_t> prompt(ids_.data(), 48);
    EXPECT_TRUE((*e)->Forward((*e)->NewSequence(), prompt, true, &logits).ok());
    return logits;
  }

  std::filesystem::path path_;
  std::vector<int32_t> ids_;
};

using testing::RelativeL2Error;

TEST_F(MoefyModelTest, SplitReproducesTheDenseModelWithAllExpertsAndRoutesBetterThanChance) {
  MoefyOptions o;
  o.n_experts = 8;
  o.top_k = 2;
  o.ctx = 256;
  o.max_tokens = 1024;
  o.kmeans_iterations = 5;
  MoefyReport report;
  const std::string path = ::testing::TempDir() + "/split.safetensors";
  absl::StatusOr<MoeSplit> split = FitMoeSplit(DenseFactory(), ids_, o, &report);
  ASSERT_TRUE(split.ok()) << split.status();
  ASSERT_EQ(split->n_layers, 30);
  EXPECT_EQ(split->intermediate, 1536);
  ASSERT_EQ(report.layers.size(), 30u);
  double recall = 0, r2 = 0;
  for (const MoefyLayerReport& r : report.layers) {
    recall += r.oracle_recall / 30;
    r2 += r.router_r2 / 30;
    EXPECT_LE(r.oracle_rel_err, r.routed_rel_err + 1e-9);  // the oracle is the floor
  }
  // Chance picks 2 of the true top 2 among 8 experts a quarter of the time.
  EXPECT_GT(recall, 0.45) << "held-out recall of the router";
  EXPECT_GT(r2, 0.3);

  ASSERT_TRUE(WriteMoeSplit(path, *split).ok());
  absl::StatusOr<MoeSplit> back = ReadMoeSplit(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->neurons, split->neurons);
  EXPECT_EQ(back->router, split->router);
  EXPECT_EQ(back->top_k, 2);

  const std::vector<float> dense = Logits(Dense(), 0);
  auto moe8 = MoefiedSource(Dense(), *back);
  ASSERT_TRUE(moe8.ok()) << moe8.status();
  EXPECT_EQ((*moe8)->config().moe.n_experts, 8);
  EXPECT_EQ((*moe8)->config().moe.expert_intermediate, 192);
  const double all = RelativeL2Error(Logits(std::move(*moe8), 8), dense);
  EXPECT_LT(all, 1e-5) << "k = 8 must be the dense model";
  const double two = RelativeL2Error(Logits(*MoefiedSource(Dense(), *back), 2), dense);
  EXPECT_GT(two, 1e-2) << "k = 2 of 8 drops three quarters of the MLP";

  // A split for another model shape is refused, naming both shapes.
  MoeSplit other = *back;
  other.hidden = 64;
  for (auto& r : other.router) r.resize(8 * 64);
  auto refused = MoefiedSource(Dense(), other);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("the split is for a model of"), std::string::npos)
      << refused.status();
}

TEST_F(MoefyModelTest, SharedNeuronsAreASharedExpertAndAllExpertsStillGiveTheDenseModel) {
  MoefyOptions o;
  o.n_experts = 6;
  o.shared_neurons = 384;  // the 384 neurons contributing most, always on
  o.top_k = 2;
  o.ctx = 128;
  o.max_tokens = 256;
  o.kmeans_iterations = 2;
  absl::StatusOr<MoeSplit> split = FitMoeSplit(DenseFactory(), ids_, o, nullptr);
  ASSERT_TRUE(split.ok()) << split.status();
  EXPECT_EQ(split->shared, 384);
  const std::string path = ::testing::TempDir() + "/shared_split.safetensors";
  ASSERT_TRUE(WriteMoeSplit(path, *split).ok());
  absl::StatusOr<MoeSplit> back = ReadMoeSplit(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->shared, 384);
  auto moe = MoefiedSource(Dense(), *back);
  ASSERT_TRUE(moe.ok()) << moe.status();
  EXPECT_EQ((*moe)->config().moe.shared_intermediate, 384);
  EXPECT_EQ((*moe)->config().moe.expert_intermediate, 192);
  const std::vector<float> dense = Logits(Dense(), 0);
  EXPECT_LT(RelativeL2Error(Logits(std::move(*moe), 6), dense), 1e-5);
  const double two = RelativeL2Error(Logits(*MoefiedSource(Dense(), *back), 2), dense);
  EXPECT_GT(two, 1e-2);
  MoeSplit bad = *back;
  bad.shared = 100;  // 1436 neurons do not split into 6 experts
  EXPECT_NE(CheckMoeSplit(bad).message().find("intermediate - shared"), std::string::npos);
}

TEST(MoeSplitFileTest, BrokenSplitsAreRefusedWithWhatIsWrong) {
  MoeSplit s;
  s.n_layers = 1;
  s.hidden = 2;
  s.intermediate = 4;
  s.n_experts = 2;
  s.top_k = 1;
  s.neurons = {{0, 1, 2, 2}};
  s.router = {{0, 0, 0, 0}};
  s.router_bias = {{0, 0}};
  absl::Status st = CheckMoeSplit(s);
  EXPECT_NE(st.message().find("not a permutation"), std::string::npos) << st;
  s.neurons = {{0, 1, 3, 2}};
  EXPECT_TRUE(CheckMoeSplit(s).ok());
  s.router = {{0, NAN, 0, 0}};
  EXPECT_NE(CheckMoeSplit(s).message().find("non-finite"), std::string::npos);
  s.router = {{0, 0, 0, 0}};
  s.top_k = 3;
  EXPECT_FALSE(CheckMoeSplit(s).ok());
  s.top_k = 1;
  const std::string path = ::testing::TempDir() + "/s.safetensors";
  ASSERT_TRUE(WriteMoeSplit(path, s).ok());
  ASSERT_TRUE(ReadMoeSplit(path).ok());
  // A safetensors file that is not a split.
  const std::string lora =
      testing::FixturePath("models/tiny_llama_lora/adapter_model.safetensors").string();
  auto bad = ReadMoeSplit(lora);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("not a MoE split file"), std::string::npos) << bad.status();
}

}  // namespace
}  // namespace quantkv
