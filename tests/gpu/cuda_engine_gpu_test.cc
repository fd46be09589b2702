// The model on the GPU (EngineConfig::device "cuda") against independent references: the
// tiny HF checkpoints against transformers' float64 logits, and SmolLM2 against the CPU
// engine (logits with exact fp32 weights; perplexity per KV preset with bf16 weights).
// Skips, saying why, without a GPU or without the default model.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/engine/device_forward.h"
#include "runtime/engine/engine.h"
#include "runtime/eval/perplexity.h"
#include "runtime/model/gguf_model.h"
#include "runtime/model/hf_model.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/testutil/fixture_text.h"
#include "tests/testutil/paths.h"

namespace quantkv {
namespace {

double RelativeL2(const std::vector<float>& got, const std::vector<double>& want) {
  double err = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    err += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  return std::sqrt(err / norm);
}

void CheckTinyModel(const std::string& dir, const nlohmann::json& ref,
                    const std::vector<int32_t>& tokens) {
  auto weights = OpenHfModelDir(testing::FixturePath("models/" + dir).string());
  ASSERT_TRUE(weights.ok()) << weights.status();
  EngineConfig cfg;
  cfg.device = "cuda";
  cfg.gpu_weights = "f32";
  cfg.kv_spec = "fp32";
  cfg.kv_max_bytes = 1 << 20;
  auto engine = Engine::Create(std::move(*weights), cfg);
  ASSERT_TRUE(engine.ok()) << engine.status();
  ASSERT_NE((*engine)->device(), nullptr);
  const int64_t V = (*engine)->model_config().vocab_size;
  std::vector<double> want;
  for (size_t t = 0; t < tokens.size(); ++t) {
    for (int64_t v = 0; v < V; ++v) want.push_back(ref[t][v].get<double>());
  }
  for (bool decode : {false, true}) {
    const SequenceId seq = (*engine)->NewSequence();
    std::vector<float> logits;
    if (decode) {
      for (const int32_t& t : tokens) {
        ASSERT_TRUE((*engine)->Forward(seq, {&t, 1}, true, &logits).ok());
      }
    } else {
      absl::Status s = (*engine)->Forward(seq, tokens, true, &logits);
      ASSERT_TRUE(s.ok()) << s;
    }
    ASSERT_EQ(logits.size(), want.size());
    EXPECT_LE(RelativeL2(logits, want), 1e-5) << dir << (decode ? " decode" : " prefill");
    ASSERT_TRUE((*engine)->Release(seq).ok());
  }
}

TEST(CudaEngineTest, TinyCheckpointsMatchTransformers) {
  QKV_SKIP_WITHOUT_CUDA_DEVICE();
  std::ifstream in(testing::FixturePath("models/tiny_llama_logits.json"));
  ASSERT_TRUE(in);
  const nlohmann::json fx = nlohmann::json::parse(in);
  CheckTinyModel(fx["tiny_llama"]["f32"]["dir"], fx["tiny_llama"]["f32"]["logits"],
                 fx["tokens"].get<std::vector<int32_t>>());
  // Qwen2: q/k/v biases and NeoX RoPE.
  CheckTinyModel(fx["tiny_qwen2"]["dir"], fx["tiny_qwen2"]["logits"],
                 fx["tiny_qwen2"]["tokens"].get<std::vector<int32_t>>());
}

std::unique_ptr<Engine> SmolEngine(const std::string& device, const std::string& kv,
                                   const std::string& gpu_weights) {
  auto model = GgufModel::Open(testing::DefaultModelPath().string());
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return nullptr;
  EngineConfig cfg;
  cfg.threads = 8;
  cfg.device = device;
  cfg.gpu_weights = gpu_weights;
  cfg.kv_spec = kv;
  cfg.kv_max_bytes = int64_t{256} << 20;
  cfg.max_chunk_tokens = 256;
  // The CPU reference keeps activations exact (no int8 quantization of GEMM inputs).
  cfg.decode_activations = kernels::ActivationPrecision::kFloat32;
  cfg.lm_head_activations = kernels::ActivationPrecision::kFloat32;
  auto e = Engine::Create(std::move(*model), cfg);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? std::move(*e) : nullptr;
}

#define SKIP_WITHOUT_MODEL()                                                             \
  do {                                                                                   \
    if (!std::filesystem::exists(testing::DefaultModelPath())) {                         \
      GTEST_SKIP() << "default model not in the cache: " << testing::DefaultModelPath(); \
    }                                                                                    \
  } while (0)

TEST(CudaEngineTest, SmolLm2LogitsMatchTheCpuWithExactWeights) {
  QKV_SKIP_WITHOUT_CUDA_DEVICE();
  SKIP_WITHOUT_MODEL();
  absl::StatusOr<std::vector<int32_t>> ids =
      testing::FixtureTextIds(testing::DefaultModelPath().string());
  ASSERT_TRUE(ids.ok()) << ids.status();
  ASSERT_GE(ids->size(), 300u);
  // 300 tokens: chunked prefill (256 + 44) over encoded int8 blocks, then 4 decode steps.
  const std::vector<int32_t> prompt(ids->begin(), ids->begin() + 300);
  std::vector<float> logits[2];
  for (int i = 0; i < 2; ++i) {
    std::unique_ptr<Engine> e = SmolEngine(i == 0 ? "cpu" : "cuda", "int8", "f32");
    ASSERT_NE(e, nullptr);
    const SequenceId seq = e->NewSequence();
    ASSERT_TRUE(e->Forward(seq, prompt, true, &logits[i]).ok());
    for (int j = 0; j < 4; ++j) {
      ASSERT_TRUE(e->Forward(seq, {&(*ids)[300 + j], 1}, true, &logits[i]).ok());
    }
  }
  ASSERT_EQ(logits[0].size(), logits[1].size());
  const std::vector<double> cpu(logits[0].begin(), logits[0].end());
  // Same weights and KV codes; only the summation order differs (and a KV code may round
  // the other way at an exact tie).
  EXPECT_LE(RelativeL2(logits[1], cpu), 2e-3);
}

TEST(CudaEngineTest, SmolLm2PerplexityMatchesTheCpuPerPreset) {
  QKV_SKIP_WITHOUT_CUDA_DEVICE();
  SKIP_WITHOUT_MODEL();
  absl::StatusOr<std::vector<int32_t>> ids =
      testing::FixtureTextIds(testing::DefaultModelPath().string());
  ASSERT_TRUE(ids.ok()) << ids.status();
  PerplexityOptions opt;
  opt.ctx = 256;
  opt.max_chunks = 3;
  for (const char* kv : {"fp16", "int8", "int4-comp", "int2-comp"}) {
    double ppl[3];
    int i = 0;
    for (const auto& [device, weights] :
         {std::pair{"cpu", "bf16"}, std::pair{"cuda", "f32"}, std::pair{"cuda", "bf16"}}) {
      std::unique_ptr<Engine> e = SmolEngine(device, kv, weights);
      ASSERT_NE(e, nullptr);
      absl::StatusOr<PerplexityResult> r = ComputePerplexity(*e, *ids, opt);
      ASSERT_TRUE(r.ok()) << r.status();
      ppl[i++] = r->ppl;
    }
    std::cout << kv << ": PPL cpu " << ppl[0] << ", cuda f32 weights " << ppl[1]
              << ", cuda bf16 weights " << ppl[2] << "\n";
    // Exact weights: within 0.3%; bf16 weights round every Q4_1 weight (8 bits of mantissa),
    // which moves SmolLM2's perplexity by well under 2%.
    EXPECT_NEAR(ppl[1] / ppl[0], 1.0, 3e-3) << kv;
    EXPECT_NEAR(ppl[2] / ppl[0], 1.0, 2e-2) << kv;
  }
}

}  // namespace
}  // namespace quantkv
