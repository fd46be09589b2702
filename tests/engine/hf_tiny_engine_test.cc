// The engine on tiny random HF checkpoints (LLaMA F32/BF16/sharded, Qwen2 with biases and
// NeoX RoPE) against transformers' float64 logits (tools/fixtures/make_model_fixtures.py).
#include <cmath>
#include <fstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/engine/engine.h"
#include "runtime/model/hf_model.h"
#include "tests/testutil/paths.h"

namespace quantkv {
namespace {

void CheckModel(const std::string& dir, const nlohmann::json& ref_logits,
                const std::vector<int32_t>& tokens, double tol) {
  auto weights = OpenHfModelDir(testing::FixturePath("models/" + dir).string());
  ASSERT_TRUE(weights.ok()) << weights.status();
  EngineConfig cfg;
  cfg.kv_spec = "fp32";
  cfg.decode_activations = kernels::ActivationPrecision::kFloat32;
  cfg.lm_head_activations = kernels::ActivationPrecision::kFloat32;
  cfg.kv_max_bytes = 1 << 20;
  auto engine = Engine::Create(std::move(*weights), cfg);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const int64_t V = (*engine)->model_config().vocab_size;
  // Prefill all at once, and decode token by token: both must match.
  for (bool decode : {false, true}) {
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
        const double want = ref_logits[t][v].get<double>();
        err += (logits[t * V + v] - want) * (logits[t * V + v] - want);
        norm += want * want;
      }
    }
    EXPECT_LE(std::sqrt(err / norm), tol) << dir << (decode ? " decode" : " prefill");
    ASSERT_TRUE((*engine)->Release(seq).ok());
  }
}

TEST(HfTinyEngineTest, MatchesTransformers) {
  std::ifstream in(testing::FixturePath("models/tiny_llama_logits.json"));
  ASSERT_TRUE(in);
  const nlohmann::json fx = nlohmann::json::parse(in);
  const auto tokens = fx["tokens"].get<std::vector<int32_t>>();
  CheckModel(fx["tiny_llama"]["f32"]["dir"], fx["tiny_llama"]["f32"]["logits"], tokens, 1e-5);
  CheckModel(fx["tiny_llama"]["bf16"]["dir"], fx["tiny_llama"]["bf16"]["logits"], tokens, 1e-5);
  CheckModel("tiny_llama_bf16_sharded", fx["tiny_llama"]["bf16"]["logits"], tokens, 1e-5);
  CheckModel(fx["tiny_qwen2"]["dir"], fx["tiny_qwen2"]["logits"],
             fx["tiny_qwen2"]["tokens"].get<std::vector<int32_t>>(), 1e-5);
}

}  // namespace
}  // namespace quantkv
