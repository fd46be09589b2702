// SmolLM2-135M on the CPU engine against HF transformers' logits on the same GGUF
// (fixture: tools/fixtures/make_model_logits_fixture.py).
#include <cmath>
#include <fstream>

#include "absl/strings/escaping.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/engine/engine.h"
#include "runtime/model/gguf_model.h"
#include "tests/testutil/paths.h"

namespace quantkv {
namespace {

using nlohmann::json;

class EngineModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto path = testing::DefaultModelPath();
    if (!std::filesystem::exists(path)) {
      GTEST_SKIP() << "default model not in the cache (" << path
                   << "); run `quantkv fetch-model` or scripts/setup.sh";
    }
    std::ifstream in(testing::FixturePath("smollm2/reference.json"));
    ASSERT_TRUE(in) << "missing fixture smollm2/reference.json";
    fixture_ = json::parse(in);
  }

  std::unique_ptr<Engine> MakeEngine(const std::string& kv, kernels::ActivationPrecision act) {
    auto model = GgufModel::Open(testing::DefaultModelPath().string());
    EXPECT_TRUE(model.ok()) << model.status();
    EngineConfig cfg;
    cfg.threads = 2;
    cfg.kv_spec = kv;
    cfg.decode_activations = act;
    cfg.kv_max_bytes = int64_t{64} << 20;
    auto engine = Engine::Create(std::move(*model), cfg);
    EXPECT_TRUE(engine.ok()) << engine.status();
    return std::move(*engine);
  }

  json fixture_;
};

std::vector<int32_t> Ids(const json& j) { return j.get<std::vector<int32_t>>(); }

// Prefill logits at every position: same argmax, top-16 and last-row relative L2 error.
void CheckPrefill(Engine& engine, const json& prompt, double tol) {
  const std::vector<int32_t> ids = Ids(prompt["input_ids"]);
  const SequenceId seq = engine.NewSequence();
  std::vector<float> logits;
  ASSERT_TRUE(engine.Forward(seq, ids, /*all_logits=*/true, &logits).ok());
  const int64_t V = engine.model_config().vocab_size;
  ASSERT_EQ(logits.size(), ids.size() * V);
  const json& positions = prompt["positions"];
  for (size_t t = 0; t < ids.size(); ++t) {
    const float* row = logits.data() + t * V;
    const int64_t argmax = std::max_element(row, row + V) - row;
    EXPECT_EQ(argmax, positions[t]["argmax"].get<int64_t>()) << prompt["name"] << " position " << t;
    double err = 0, norm = 0;
    for (const json& kv : positions[t]["topk"]) {
      const double ref = kv[1].get<double>();
      const double got = row[kv[0].get<int64_t>()];
      err += (got - ref) * (got - ref);
      norm += ref * ref;
    }
    EXPECT_LE(std::sqrt(err / norm), tol) << prompt["name"] << " position " << t;
  }
  if (!prompt.contains("last_logits_f32_b64")) {
    ASSERT_TRUE(engine.Release(seq).ok());
    return;
  }
  std::string raw;
  ASSERT_TRUE(absl::Base64Unescape(prompt["last_logits_f32_b64"].get<std::string>(), &raw));
  ASSERT_EQ(raw.size(), V * sizeof(float));
  const float* ref = reinterpret_cast<const float*>(raw.data());
  const float* got = logits.data() + (ids.size() - 1) * V;
  double err = 0, norm = 0;
  for (int64_t i = 0; i < V; ++i) {
    err += (double(got[i]) - ref[i]) * (double(got[i]) - ref[i]);
    norm += double(ref[i]) * ref[i];
  }
  EXPECT_LE(std::sqrt(err / norm), tol) << prompt["name"] << " last position, full vocab";
  ASSERT_TRUE(engine.Release(seq).ok());
}

std::vector<int32_t> Greedy(Engine& engine, const std::vector<int32_t>& prompt, int n) {
  const SequenceId seq = engine.NewSequence();
  const int64_t V = engine.model_config().vocab_size;
  std::vector<float> logits;
  EXPECT_TRUE(engine.Forward(seq, prompt, false, &logits).ok());
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) {
    const int32_t next =
        static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    out.push_back(next);
    logits.clear();
    EXPECT_TRUE(engine.Forward(seq, {&next, 1}, false, &logits).ok());
    EXPECT_EQ(logits.size(), static_cast<size_t>(V));
  }
  EXPECT_TRUE(engine.Release(seq).ok());
  return out;
}

TEST_F(EngineModelTest, PrefillLogitsMatchTransformersFp32Cache) {
  auto engine = MakeEngine("fp32", kernels::ActivationPrecision::kFloat32);
  for (const json& p : fixture_["prompts"]) CheckPrefill(*engine, p, 1e-3);
}

TEST_F(EngineModelTest, PrefillLogitsMatchTransformersFp16Cache) {
  // The fp16 cache rounds K and V (2^-11 relative): a looser bound, same argmax everywhere.
  auto engine = MakeEngine("fp16", kernels::ActivationPrecision::kFloat32);
  for (const json& p : fixture_["prompts"]) CheckPrefill(*engine, p, 5e-3);
}

TEST_F(EngineModelTest, GreedyGenerationMatchesTransformersExactDecode) {
  auto engine = MakeEngine("fp32", kernels::ActivationPrecision::kFloat32);
  for (const json& p : fixture_["prompts"]) {
    const std::vector<int32_t> want = Ids(p["greedy"]["new_ids"]);
    EXPECT_EQ(Greedy(*engine, Ids(p["input_ids"]), static_cast<int>(want.size())), want)
        << p["name"];
  }
}

TEST_F(EngineModelTest, Int8DecodeAgreesWithTransformersOnTeacherForcedSteps) {
  // The default decode path (int8 activations, fp16 cache), as `quantkv generate` runs it.
  // Int8 activations move logits by a few hundredths, so free-running greedy text forks at
  // near-ties (HF's margins there are 0.02-0.07). Feed HF's own continuation instead and
  // require the same argmax wherever HF's top-1 margin is at least 0.25.
  auto engine = MakeEngine("fp16", kernels::ActivationPrecision::kInt8);
  const int64_t V = engine->model_config().vocab_size;
  int steps = 0, agree = 0, decisive = 0;
  for (const json& p : fixture_["prompts"]) {
    const std::vector<int32_t> want = Ids(p["greedy"]["new_ids"]);
    const std::vector<double> margin = p["greedy"]["top1_margin"].get<std::vector<double>>();
    ASSERT_EQ(margin.size(), want.size());
    const SequenceId seq = engine->NewSequence();
    std::vector<float> logits;
    ASSERT_TRUE(engine->Forward(seq, Ids(p["input_ids"]), false, &logits).ok());
    for (size_t i = 0; i < want.size(); ++i) {
      const int32_t got =
          static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
      ++steps;
      agree += got == want[i];
      if (margin[i] >= 0.25) {
        ++decisive;
        EXPECT_EQ(got, want[i]) << p["name"] << " step " << i << " (HF margin " << margin[i] << ")";
      }
      logits.clear();
      ASSERT_TRUE(engine->Forward(seq, {&want[i], 1}, false, &logits).ok());
      ASSERT_EQ(logits.size(), static_cast<size_t>(V));
    }
    ASSERT_TRUE(engine->Release(seq).ok());
  }
  std::printf("int8 decode: top-1 equal to HF at %d of %d steps (%d decisive steps checked)\n",
              agree, steps, decisive);
  EXPECT_GE(agree, steps * 95 / 100);
}

TEST_F(EngineModelTest, MeanNllMatchesFloat64) {
  auto engine = MakeEngine("fp32", kernels::ActivationPrecision::kFloat32);
  for (const json& p : fixture_["prompts"]) {
    if (!p.contains("mean_nll_f64")) continue;
    const std::vector<int32_t> ids = Ids(p["input_ids"]);
    const SequenceId seq = engine->NewSequence();
    std::vector<float> logits;
    ASSERT_TRUE(engine->Forward(seq, ids, true, &logits).ok());
    const int64_t V = engine->model_config().vocab_size;
    double nll = 0;
    for (size_t t = 1; t < ids.size(); ++t) {
      const float* row = logits.data() + (t - 1) * V;
      double mx = *std::max_element(row, row + V), s = 0;
      for (int64_t i = 0; i < V; ++i) s += std::exp(row[i] - mx);
      nll += mx + std::log(s) - row[ids[t]];
    }
    nll /= static_cast<double>(ids.size() - 1);
    EXPECT_NEAR(nll, p["mean_nll_f64"].get<double>(), 1e-3) << p["name"];
  }
}

// A server with several KV presets runs them as caches of one engine: a sequence in cache
// i computes exactly what it computes in an engine with only that cache, sequences of
// different caches share a Step, and each cache's blocks are its own.
TEST_F(EngineModelTest, SeveralKvCachesInOneEngineMatchSingleCacheEngines) {
  // Per-row matmuls (as the server runs) so a row does not depend on the batch around it.
  auto make = [](const std::string& kv, std::vector<std::string> more, int64_t bytes) {
    auto model = GgufModel::Open(testing::DefaultModelPath().string());
    EXPECT_TRUE(model.ok()) << model.status();
    EngineConfig cfg;
    cfg.threads = 2;
    cfg.kv_spec = kv;
    cfg.more_kv_specs = std::move(more);
    cfg.kv_max_bytes = bytes;
    cfg.gemm_min_rows = int64_t{1} << 40;
    return Engine::Create(std::move(*model), cfg);
  };
  auto multi = make("fp16", {"int2"}, int64_t{128} << 20);  // 64 MiB each
  ASSERT_TRUE(multi.ok()) << multi.status();
  ASSERT_EQ((*multi)->kv_cache_count(), 2);
  EXPECT_EQ((*multi)->kv_cache(0).capacity_tokens(),
            MakeEngine("fp16", kernels::ActivationPrecision::kInt8)->kv_cache().capacity_tokens());
  EXPECT_FALSE((*multi)->NewSequenceIn(2).ok());
  EXPECT_FALSE((*multi)->NewSequenceIn(-1).ok());

  // Long enough to fill blocks (a partial tail block stays fp16 in every cache).
  std::vector<int32_t> ids;
  while (ids.size() < 300) {
    for (int32_t t : Ids(fixture_["prompts"][0]["input_ids"])) ids.push_back(t);
  }
  const int64_t V = (*multi)->model_config().vocab_size;
  std::vector<std::vector<float>> single(2);
  int i = 0;
  for (const char* kv : {"fp16", "int2"}) {
    auto engine = make(kv, {}, int64_t{64} << 20);
    ASSERT_TRUE(engine.ok()) << engine.status();
    const SequenceId seq = (*engine)->NewSequence();
    ASSERT_TRUE((*engine)->Forward(seq, ids, /*all_logits=*/true, &single[i++]).ok());
  }
  auto a = (*multi)->NewSequenceIn(0), b = (*multi)->NewSequenceIn(1);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*(*multi)->SequenceCache(*b), 1);
  // Both sequences in one Step (prefill), then compare every position's logits.
  const StepInput inputs[] = {{.seq = *a, .tokens = ids, .all_logits = true},
                              {.seq = *b, .tokens = ids, .all_logits = true}};
  std::vector<float> logits;
  ASSERT_TRUE((*multi)->Step(inputs, &logits).ok());
  ASSERT_EQ(logits.size(), 2 * ids.size() * V);
  for (int c = 0; c < 2; ++c) {
    for (size_t k = 0; k < ids.size() * V; ++k) {
      ASSERT_EQ(logits[c * ids.size() * V + k], single[c][k]) << "cache " << c << " at " << k;
    }
  }
  // The int2 cache changes the logits: the two caches really are different.
  EXPECT_NE(single[0], single[1]);
  auto used = [&](int c) {
    const BlockAllocator& blocks = (*multi)->kv_cache(c).allocator();
    return blocks.num_blocks() - blocks.num_free();
  };
  EXPECT_GT(used(1), 0);
  ASSERT_TRUE((*multi)->Release(*b).ok());
  EXPECT_EQ(used(1), 0);
  EXPECT_GT(used(0), 0);
}

}  // namespace
}  // namespace quantkv
