// LoRA adapters (--lora) on the tiny HF models against transformers run on the merged
// weights W + s B A (tools/fixtures/make_lora_fixtures.py; the adapters were written by PEFT),
// and the messages for adapters QuantKV cannot apply.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"
#include "kernels/dequantize.h"
#include "nlohmann/json.hpp"
#include "runtime/engine/engine.h"
#include "runtime/model/hf_model.h"
#include "runtime/model/lora.h"
#include "runtime/model/safetensors.h"
#include "runtime/model/safetensors_writer.h"
#include "tests/testutil/paths.h"

namespace quantkv {
namespace {

namespace fs = std::filesystem;

nlohmann::json Fixture() {
  std::ifstream in(testing::FixturePath("models/tiny_lora_logits.json"));
  EXPECT_TRUE(in);
  return nlohmann::json::parse(in);
}

void CheckAgainstReference(const nlohmann::json& fx, const std::string& lora_path) {
  const std::string base = fx["base_dir"];
  auto weights = OpenHfModelDir(testing::FixturePath("models/" + base).string());
  ASSERT_TRUE(weights.ok()) << weights.status();
  auto lora = LoadLoraAdapters(lora_path, (*weights)->config());
  ASSERT_TRUE(lora.ok()) << lora.status();
  EXPECT_NEAR(lora->scale, fx["scale"].get<double>(), 1e-6);
  EngineConfig cfg;
  cfg.kv_spec = "fp32";
  cfg.decode_activations = kernels::ActivationPrecision::kFloat32;
  cfg.lm_head_activations = kernels::ActivationPrecision::kFloat32;
  cfg.kv_max_bytes = 1 << 20;
  cfg.lora = std::make_shared<const LoraAdapters>(std::move(*lora));
  auto engine = Engine::Create(std::move(*weights), cfg);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const auto tokens = fx["tokens"].get<std::vector<int32_t>>();
  const int64_t V = (*engine)->model_config().vocab_size;
  for (bool decode : {false, true}) {
    const SequenceId seq = (*engine)->NewSequence();
    std::vector<float> logits;
    if (decode) {
      for (const int32_t& t : tokens)
        ASSERT_TRUE((*engine)->Forward(seq, {&t, 1}, true, &logits).ok());
    } else {
      ASSERT_TRUE((*engine)->Forward(seq, tokens, true, &logits).ok());
    }
    ASSERT_EQ(logits.size(), tokens.size() * V);
    double err = 0, norm = 0, max_abs = 0;
    for (size_t t = 0; t < tokens.size(); ++t) {
      for (int64_t v = 0; v < V; ++v) {
        const double want = fx["logits"][t][v].get<double>();
        const double d = logits[t * V + v] - want;
        err += d * d;
        norm += want * want;
        max_abs = std::max(max_abs, std::abs(d));
      }
    }
    std::printf(
        "[ info ] %s %s: max |logit - reference| %.3g (the adapter moves logits by up to "
        "%.3g), relative RMS %.3g\n",
        fx["dir"].get<std::string>().c_str(), decode ? "decode" : "prefill", max_abs,
        fx["max_logit_change"].get<double>(), std::sqrt(err / norm));
    EXPECT_LE(std::sqrt(err / norm), 1e-5);
    EXPECT_LT(max_abs, 1e-3 * fx["max_logit_change"].get<double>());
  }
}

TEST(LoraTest, MatchesTransformersOnMergedWeights) {
  const nlohmann::json fx = Fixture();
  // LLaMA: Q/K rows permuted to the engine's order; all layers, alpha / r.
  CheckAgainstReference(fx["tiny_llama"], testing::FixturePath("models/tiny_llama_lora").string());
  // The weights file itself, with adapter_config.json found beside it.
  CheckAgainstReference(
      fx["tiny_llama"],
      testing::FixturePath("models/tiny_llama_lora/adapter_model.safetensors").string());
  // Qwen2: NeoX RoPE (rows unpermuted), biases, rsLoRA scaling, layers_to_transform = [1].
  CheckAgainstReference(fx["tiny_qwen2"], testing::FixturePath("models/tiny_qwen2_lora").string());
}

// A copy of the tiny LLaMA adapter with its config edited and its tensors filtered or replaced.
class BadLoraTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / "quantkv_lora_test";
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    auto w = OpenHfModelDir(testing::FixturePath("models/tiny_llama_f32").string());
    ASSERT_TRUE(w.ok());
    config_ = (*w)->config();
    std::ifstream in(testing::FixturePath("models/tiny_llama_lora/adapter_config.json"));
    adapter_config_ = nlohmann::json::parse(in);
    auto st = SafetensorsFile::Open(
        testing::FixturePath("models/tiny_llama_lora/adapter_model.safetensors").string());
    ASSERT_TRUE(st.ok());
    for (const SafetensorsTensor& t : (*st)->tensors()) {
      std::vector<float> v(static_cast<size_t>(t.n_elements));
      ASSERT_TRUE(kernels::DequantizeRow(t.type, t.data, v.data(), t.n_elements).ok());
      tensors_.push_back({t.name, t.shape, std::move(v)});
    }
  }
  void TearDown() override { fs::remove_all(dir_); }

  struct Tensor {
    std::string name;
    std::vector<int64_t> shape;
    std::vector<float> values;
  };

  // Writes the adapter and loads it; returns the error message ("" on success).
  std::string Load(const nlohmann::json& cfg, const std::vector<Tensor>& tensors,
                   absl::StatusCode* code = nullptr) {
    std::ofstream(dir_ / "adapter_config.json") << cfg.dump();
    std::vector<SafetensorsOutTensor> out;
    for (const Tensor& t : tensors) out.push_back({t.name, t.shape, t.values});
    EXPECT_TRUE(WriteSafetensors((dir_ / "adapter_model.safetensors").string(), out).ok());
    auto r = LoadLoraAdapters(dir_.string(), config_);
    if (code != nullptr) *code = r.status().code();
    return std::string(r.status().message());
  }

  fs::path dir_;
  ModelConfig config_;
  nlohmann::json adapter_config_;
  std::vector<Tensor> tensors_;
};

TEST_F(BadLoraTest, TheUneditedCopyLoads) { EXPECT_EQ(Load(adapter_config_, tensors_), ""); }

TEST_F(BadLoraTest, UnsupportedOptionsAndTargetsAreNamed) {
  absl::StatusCode code;
  nlohmann::json c = adapter_config_;
  c["target_modules"] = {"q_proj", "gate_proj"};
  std::string msg = Load(c, tensors_, &code);
  EXPECT_EQ(code, absl::StatusCode::kUnimplemented);
  EXPECT_NE(msg.find("target module 'gate_proj' is not supported"), std::string::npos) << msg;
  EXPECT_NE(msg.find("adapter_config.json"), std::string::npos) << msg;
  for (const char* key : {"use_dora", "fan_in_fan_out"}) {
    c = adapter_config_;
    c[key] = true;
    msg = Load(c, tensors_, &code);
    EXPECT_EQ(code, absl::StatusCode::kUnimplemented) << key;
    EXPECT_NE(msg.find(key), std::string::npos) << msg;
  }
  c = adapter_config_;
  c["rank_pattern"] = {{"q_proj", 8}};
  EXPECT_NE(Load(c, tensors_).find("rank_pattern"), std::string::npos);
  c = adapter_config_;
  c["r"] = 0;
  EXPECT_NE(Load(c, tensors_).find("'r' must be a positive integer"), std::string::npos);
  c = adapter_config_;
  c.erase("lora_alpha");
  EXPECT_NE(Load(c, tensors_).find("lora_alpha"), std::string::npos);
  c = adapter_config_;
  c["peft_type"] = "IA3";
  EXPECT_NE(Load(c, tensors_).find("not LORA"), std::string::npos);
}

TEST_F(BadLoraTest, TensorsThatDoNotFitAreNamed) {
  absl::StatusCode code;
  // r in the config disagrees with the tensors.
  nlohmann::json c = adapter_config_;
  c["r"] = 8;
  std::string msg = Load(c, tensors_, &code);
  EXPECT_EQ(code, absl::StatusCode::kInvalidArgument);
  EXPECT_NE(msg.find("has shape [4, 64], but r = 8"), std::string::npos) << msg;
  EXPECT_NE(msg.find("adapter_model.safetensors"), std::string::npos) << msg;
  // A factor of the wrong width (an adapter for another model).
  std::vector<Tensor> t = tensors_;
  for (Tensor& x : t) {
    if (x.name.find("layers.1.self_attn.v_proj.lora_B") != std::string::npos) {
      x.shape = {48, 4};
      x.values.resize(48 * 4);
    }
  }
  msg = Load(adapter_config_, t, &code);
  EXPECT_EQ(code, absl::StatusCode::kInvalidArgument);
  EXPECT_NE(msg.find("layers.1.self_attn.v_proj.lora_B.weight' has shape [48, 4]"),
            std::string::npos)
      << msg;
  // A missing factor.
  t.clear();
  for (const Tensor& x : tensors_) {
    if (x.name.find("layers.0.self_attn.o_proj.lora_B") == std::string::npos) t.push_back(x);
  }
  msg = Load(adapter_config_, t);
  EXPECT_NE(msg.find("layer 0 o_proj lacks its lora_B weight"), std::string::npos) << msg;
  // A tensor for a module QuantKV does not adapt, and one past the model's layers.
  t = tensors_;
  t.push_back({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
               {4, 64},
               std::vector<float>(256, 0.0f)});
  msg = Load(adapter_config_, t, &code);
  EXPECT_EQ(code, absl::StatusCode::kUnimplemented);
  EXPECT_NE(msg.find("mlp.up_proj.lora_A.weight' is not a lora_A/lora_B weight"), std::string::npos)
      << msg;
  t = tensors_;
  t.push_back({"base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight",
               {4, 64},
               std::vector<float>(256, 0.0f)});
  EXPECT_NE(Load(adapter_config_, t).find("is for layer 5, the model has 2"), std::string::npos);
  // A tensor for a projection target_modules does not list.
  c = adapter_config_;
  c["target_modules"] = {"q_proj", "k_proj", "v_proj"};
  EXPECT_NE(Load(c, tensors_).find("which adapter_config.json's target_modules does not list"),
            std::string::npos);
  // Non-finite values.
  t = tensors_;
  t[0].values[1] = NAN;
  EXPECT_NE(Load(adapter_config_, t).find("non-finite"), std::string::npos);
}

TEST_F(BadLoraTest, MissingAndCorruptFiles) {
  std::ofstream(dir_ / "adapter_model.safetensors") << "junk";
  auto r = LoadLoraAdapters(dir_.string(), config_);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(r.status().message().find("no adapter_config.json"), std::string::npos) << r.status();
  std::ofstream(dir_ / "adapter_config.json") << "{not json";
  r = LoadLoraAdapters(dir_.string(), config_);
  EXPECT_NE(r.status().message().find("not valid JSON"), std::string::npos) << r.status();
  std::ofstream(dir_ / "adapter_config.json") << adapter_config_.dump();
  r = LoadLoraAdapters(dir_.string(), config_);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("adapter_model.safetensors"), std::string::npos)
      << r.status();
  fs::remove(dir_ / "adapter_model.safetensors");
  r = LoadLoraAdapters(dir_.string(), config_);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  // An adapter loaded for another model is refused by the engine.
  auto lora = LoadLoraAdapters(testing::FixturePath("models/tiny_llama_lora").string(), config_);
  ASSERT_TRUE(lora.ok());
  auto other = OpenHfModelDir(testing::FixturePath("models/tiny_qwen2_f32").string());
  ASSERT_TRUE(other.ok());
  EXPECT_FALSE(
      LoadLoraAdapters(testing::FixturePath("models/tiny_llama_lora").string(), (*other)->config())
          .ok());
  EngineConfig cfg;
  cfg.kv_spec = "fp32";
  cfg.kv_max_bytes = 1 << 20;
  cfg.lora = std::make_shared<const LoraAdapters>(std::move(*lora));
  auto engine = Engine::Create(std::move(*other), cfg);
  ASSERT_FALSE(engine.ok());
  EXPECT_NE(engine.status().message().find("was loaded for another model"), std::string::npos)
      << engine.status();
}

}  // namespace
}  // namespace quantkv
