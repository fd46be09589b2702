// Tiny random Mixtral, Qwen2-MoE and Qwen3-MoE (q/k norm) checkpoints
// (tools/fixtures/make_moe_fixtures.py), from HF safetensors (per-expert tensors) and from GGUF
// (merged 3-D expert tensors), against transformers' float64 logits and its router's top-k choices.
#include <cmath>
#include <fstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/engine/engine.h"
#include "runtime/model/gguf_model.h"
#include "runtime/model/hf_model.h"
#include "tests/testutil/paths.h"

namespace quantkv {
namespace {

nlohmann::json Fixture() {
  std::ifstream in(testing::FixturePath("models/tiny_moe_logits.json"));
  EXPECT_TRUE(in);
  return nlohmann::json::parse(in);
}

absl::StatusOr<std::unique_ptr<WeightSource>> Open(const std::string& name, bool gguf) {
  const std::string path = testing::FixturePath("models/" + name).string();
  if (!gguf) return OpenHfModelDir(path);
  absl::StatusOr<std::unique_ptr<GgufModel>> m = GgufModel::Open(path);
  if (!m.ok()) return m.status();
  return std::unique_ptr<WeightSource>(std::move(*m));
}

void CheckModel(const nlohmann::json& ref, const std::vector<int32_t>& tokens, bool gguf) {
  const std::string name = gguf ? ref["gguf"].get<std::string>() : ref["dir"].get<std::string>();
  SCOPED_TRACE(name);
  auto weights = Open(name, gguf);
  ASSERT_TRUE(weights.ok()) << weights.status();
  const MoeConfig& m = (*weights)->config().moe;
  EXPECT_EQ(m.n_experts, ref["config"]["n_experts"].get<int64_t>());
  EXPECT_EQ(m.top_k, ref["config"]["top_k"].get<int64_t>());
  EXPECT_EQ(m.expert_intermediate, ref["config"]["intermediate"].get<int64_t>());
  EXPECT_EQ(m.shared_intermediate, ref["config"]["shared_intermediate"].get<int64_t>());
  EXPECT_EQ(moe::RouterWeightingName(m.weighting),
            ref["config"]["router_weighting"].get<std::string>());
  EngineConfig cfg;
  cfg.kv_spec = "fp32";
  cfg.decode_activations = kernels::ActivationPrecision::kFloat32;
  cfg.lm_head_activations = kernels::ActivationPrecision::kFloat32;
  cfg.kv_max_bytes = 1 << 20;
  // Prefill routes all tokens of a layer in one call: record them.
  std::vector<std::vector<int32_t>> routed;
  cfg.routing_observer = [&](int64_t layer, const moe::Routing& r) {
    if (static_cast<int64_t>(routed.size()) <= layer) routed.resize(layer + 1);
    routed[layer].insert(routed[layer].end(), r.expert.begin(), r.expert.end());
  };
  auto engine = Engine::Create(std::move(*weights), cfg);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const int64_t V = (*engine)->model_config().vocab_size;
  for (bool decode : {false, true}) {
    routed.clear();
    const SequenceId seq = (*engine)->NewSequence();
    std::vector<float> logits;
    if (decode) {
      for (const int32_t& t : tokens)
        ASSERT_TRUE((*engine)->Forward(seq, {&t, 1}, true, &logits).ok());
    } else {
      absl::Status s = (*engine)->Forward(seq, tokens, true, &logits);
      ASSERT_TRUE(s.ok()) << s;
    }
    ASSERT_EQ(logits.size(), tokens.size() * V);
    double err = 0, norm = 0;
    for (size_t t = 0; t < tokens.size(); ++t) {
      for (int64_t v = 0; v < V; ++v) {
        const double want = ref["logits"][t][v].get<double>();
        err += (logits[t * V + v] - want) * (logits[t * V + v] - want);
        norm += want * want;
      }
    }
    EXPECT_LE(std::sqrt(err / norm), 1e-5) << (decode ? "decode" : "prefill");
    const auto& want_routing = ref["routing"];
    ASSERT_EQ(routed.size(), want_routing.size());
    for (size_t l = 0; l < routed.size(); ++l) {
      std::vector<int32_t> want;
      for (const auto& tok : want_routing[l]) {
        for (const auto& e : tok) want.push_back(e.get<int32_t>());
      }
      EXPECT_EQ(routed[l], want) << "layer " << l << (decode ? " decode" : " prefill");
    }
    ASSERT_TRUE((*engine)->Release(seq).ok());
  }
}

TEST(MoeModelTest, MixtralMatchesTransformersFromSafetensorsAndGguf) {
  const nlohmann::json fx = Fixture();
  const auto tokens = fx["tokens"].get<std::vector<int32_t>>();
  CheckModel(fx["tiny_mixtral"], tokens, false);
  CheckModel(fx["tiny_mixtral"], tokens, true);
}

TEST(MoeModelTest, Qwen2MoeWithSharedExpertMatchesTransformers) {
  const nlohmann::json fx = Fixture();
  const auto tokens = fx["tokens"].get<std::vector<int32_t>>();
  CheckModel(fx["tiny_qwen2_moe"], tokens, false);
  CheckModel(fx["tiny_qwen2_moe"], tokens, true);
}

TEST(MoeModelTest, TopKOverrideIsCheckedAndChangesTheOutput) {
  const nlohmann::json fx = Fixture();
  auto weights = Open("tiny_mixtral", false);
  ASSERT_TRUE(weights.ok());
  EngineConfig cfg;
  cfg.kv_spec = "fp32";
  cfg.kv_max_bytes = 1 << 20;
  cfg.moe_top_k = 5;  // 4 experts
  auto bad = Engine::Create(std::move(*weights), cfg);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("--moe-top-k"), std::string::npos) << bad.status();
  cfg.moe_top_k = 4;
  auto engine = Engine::Create(*Open("tiny_mixtral", false), cfg);
  ASSERT_TRUE(engine.ok()) << engine.status();
  EXPECT_EQ((*engine)->router().top_k, 4);
  const auto tokens = fx["tokens"].get<std::vector<int32_t>>();
  std::vector<float> logits;
  ASSERT_TRUE((*engine)->Forward((*engine)->NewSequence(), tokens, false, &logits).ok());
  const double want = fx["tiny_mixtral"]["logits"][tokens.size() - 1][0].get<double>();
  double diff = 0;
  for (int v = 0; v < 256; ++v) {
    diff = std::max(
        diff,
        std::fabs(logits[v] - fx["tiny_mixtral"]["logits"][tokens.size() - 1][v].get<double>()));
  }
  EXPECT_GT(diff, 1e-3) << "top-4 routing should differ from the model's top-2 (" << want << ")";
  // A dense model refuses the flag.
  auto dense = OpenHfModelDir(testing::FixturePath("models/tiny_llama_f32").string());
  ASSERT_TRUE(dense.ok());
  cfg.moe_top_k = 2;
  auto refused = Engine::Create(std::move(*dense), cfg);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("not a mixture-of-experts"), std::string::npos);
}

}  // namespace
}  // namespace quantkv

namespace quantkv {
namespace {

TEST(MoeModelTest, Qwen3MoeWithQkNormMatchesTransformers) {
  const nlohmann::json fx = Fixture();
  const auto tokens = fx["tokens"].get<std::vector<int32_t>>();
  CheckModel(fx["tiny_qwen3_moe"], tokens, false);
  CheckModel(fx["tiny_qwen3_moe"], tokens, true);
}

}  // namespace
}  // namespace quantkv
