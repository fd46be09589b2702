// "Measuring honestly": with a quantized cache, the NLL of a token scored inside a prefill
// chunk must equal its NLL when the text is decoded token by token, i.e. every scored token
// reads its context from the cache exactly as decode would.
#include <cmath>
#include <cstdlib>
#include <fstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/engine/engine.h"
#include "runtime/model/gguf_model.h"
#include "tests/testutil/paths.h"

namespace quantkv {
namespace {

double Nll(const float* row, int64_t V, int32_t target) {
  double mx = *std::max_element(row, row + V), z = 0;
  for (int64_t i = 0; i < V; ++i) z += std::exp(row[i] - mx);
  return mx + std::log(z) - row[target];
}

TEST(PrefillDecodeModelTest, QuantizedCacheScoresAlikeInPrefillAndDecode) {
  const auto path = testing::DefaultModelPath();
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "default model not in the cache: " << path;
  std::ifstream in(testing::FixturePath("smollm2/perplexity.json"));
  ASSERT_TRUE(in);
  auto ids = nlohmann::json::parse(in)["input_ids"].get<std::vector<int32_t>>();
  ids.resize(150);  // several blocks of 32, a partial tail, sinks and a window
  std::vector<double> means, diffs;
  const char* specs[] = {"fp32", "int4,block=32", "k=int2:chan,v=int2,sink=4,window=16,block=32"};
  for (const char* spec : specs) {
    auto model = GgufModel::Open(path.string());
    ASSERT_TRUE(model.ok());
    EngineConfig cfg;
    cfg.threads = 2;
    cfg.kv_spec = spec;
    // Same arithmetic in both modes (row-wise fp32 dots, no SGEMM), so only what the cache
    // shows each query could differ: a 1-ulp difference in K would otherwise flip int4
    // codes and hide real differences in noise.
    cfg.decode_activations = kernels::ActivationPrecision::kFloat32;
    cfg.lm_head_activations = kernels::ActivationPrecision::kFloat32;
    cfg.gemm_min_rows = int64_t{1} << 40;
    cfg.max_chunk_tokens = 64;  // prefill in chunks that end mid-block
    cfg.fused_decode_attention = false;  // the tiled kernel in both modes: same arithmetic
    auto engine = Engine::Create(std::move(*model), cfg);
    ASSERT_TRUE(engine.ok()) << engine.status();
    const int64_t V = (*engine)->model_config().vocab_size;
    const SequenceId a = (*engine)->NewSequence(), b = (*engine)->NewSequence();
    std::vector<float> prefill, decode;
    ASSERT_TRUE((*engine)->Forward(a, ids, true, &prefill).ok());
    for (const int32_t& t : ids) ASSERT_TRUE((*engine)->Forward(b, {&t, 1}, true, &decode).ok());
    double max_diff = 0, mean_p = 0;
    for (size_t t = 0; t + 1 < ids.size(); ++t) {
      const double np = Nll(prefill.data() + t * V, V, ids[t + 1]);
      const double nd = Nll(decode.data() + t * V, V, ids[t + 1]);
      max_diff = std::max(max_diff, std::fabs(np - nd));
      if (std::getenv("QUANTKV_DEBUG_NLL") && std::fabs(np - nd) > 1e-3) {
        std::printf("  t=%zu prefill %.4f decode %.4f\n", t, np, nd);
      }
      mean_p += np;
    }
    EXPECT_LT(max_diff, 1e-4) << spec;
    means.push_back(mean_p / (ids.size() - 1));
    diffs.push_back(max_diff);
    std::printf("%s: max |NLL prefill - NLL decode| = %.2e, mean NLL %.4f\n", spec, max_diff,
                means.back());
  }
  // The 2-bit cache moves the scores by far more than prefill and decode differ, so the
  // agreement above is not vacuous.
  EXPECT_GT(std::fabs(means[2] - means[0]), 10 * diffs[2]);
}

// With the fused decode kernels (the default), decode rounds differently from prefill: a
// last-bit difference in a layer's output can flip an fp16 or int4 code of a later K/V row,
// so single tokens may move, but the scores must agree on average, and exactly-stored
// (fp32) caches token by token.
TEST(PrefillDecodeModelTest, FusedDecodeKernelsAgreeWithPrefill) {
  const auto path = testing::DefaultModelPath();
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "default model not in the cache: " << path;
  std::ifstream in(testing::FixturePath("smollm2/perplexity.json"));
  ASSERT_TRUE(in);
  auto ids = nlohmann::json::parse(in)["input_ids"].get<std::vector<int32_t>>();
  ids.resize(150);
  for (const char* spec : {"fp32", "int4,block=32"}) {
    auto model = GgufModel::Open(path.string());
    ASSERT_TRUE(model.ok());
    EngineConfig cfg;
    cfg.threads = 2;
    cfg.kv_spec = spec;
    cfg.decode_activations = kernels::ActivationPrecision::kFloat32;
    cfg.lm_head_activations = kernels::ActivationPrecision::kFloat32;
    cfg.gemm_min_rows = int64_t{1} << 40;
    cfg.max_chunk_tokens = 64;
    auto engine = Engine::Create(std::move(*model), cfg);
    ASSERT_TRUE(engine.ok()) << engine.status();
    const int64_t V = (*engine)->model_config().vocab_size;
    const SequenceId a = (*engine)->NewSequence(), b = (*engine)->NewSequence();
    std::vector<float> prefill, decode;
    ASSERT_TRUE((*engine)->Forward(a, ids, true, &prefill).ok());
    for (const int32_t& t : ids) ASSERT_TRUE((*engine)->Forward(b, {&t, 1}, true, &decode).ok());
    double max_diff = 0, mean_p = 0, mean_d = 0;
    for (size_t t = 0; t + 1 < ids.size(); ++t) {
      const double np = Nll(prefill.data() + t * V, V, ids[t + 1]);
      const double nd = Nll(decode.data() + t * V, V, ids[t + 1]);
      max_diff = std::max(max_diff, std::fabs(np - nd));
      mean_p += np / (ids.size() - 1);
      mean_d += nd / (ids.size() - 1);
    }
    std::printf("%s fused decode: max |NLL diff| %.2e, mean NLL prefill %.5f decode %.5f\n",
                spec, max_diff, mean_p, mean_d);
    if (std::string(spec) == "fp32") EXPECT_LT(max_diff, 1e-3);
    EXPECT_LT(std::fabs(mean_p - mean_d), 0.01) << spec;
  }
}

}  // namespace
}  // namespace quantkv
