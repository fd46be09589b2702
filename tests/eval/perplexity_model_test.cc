// Perplexity of SmolLM2 on a WikiText-2 slice against transformers' value computed by the
// same windows (fixture: tools/fixtures/make_perplexity_fixture.py), tokenized by QuantKV.
#include <fstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/eval/perplexity.h"
#include "runtime/model/gguf_model.h"
#include "runtime/tokenizer/tokenizer.h"
#include "tests/testutil/paths.h"

namespace quantkv {
namespace {

TEST(PerplexityModelTest, MatchesTransformersOnTheSameWindows) {
  const auto path = testing::DefaultModelPath();
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "default model not in the cache: " << path;
  std::ifstream in(testing::FixturePath("smollm2/perplexity.json"));
  ASSERT_TRUE(in);
  const nlohmann::json fx = nlohmann::json::parse(in);
  auto model = GgufModel::Open(path.string());
  ASSERT_TRUE(model.ok()) << model.status();
  auto tokenizer = Tokenizer::FromGguf((*model)->gguf());
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  auto ids = (*tokenizer)->Encode(fx["text"].get<std::string>());
  ASSERT_TRUE(ids.ok());
  const auto want_ids = fx["input_ids"].get<std::vector<int32_t>>();
  ASSERT_GE(ids->size(), want_ids.size());
  ASSERT_EQ(std::vector<int32_t>(ids->begin(), ids->begin() + want_ids.size()), want_ids);

  EngineConfig cfg;
  cfg.threads = 2;
  cfg.kv_spec = "fp32";
  auto engine = Engine::Create(std::move(*model), cfg);
  ASSERT_TRUE(engine.ok());
  PerplexityOptions opt;
  opt.ctx = fx["ctx"];
  opt.max_chunks = fx["chunks"];
  LogitsBaseline baseline;
  opt.save_logits = &baseline;
  auto r = ComputePerplexity(**engine, *ids, opt);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tokens_scored, fx["tokens_scored"].get<int64_t>());
  EXPECT_NEAR(r->mean_nll, fx["mean_nll"].get<double>(), 1e-3);
  EXPECT_GT(r->ppl_stderr, 0);

  // Against its own baseline: KL 0 and full top-1 agreement; another ctx is refused.
  opt.save_logits = nullptr;
  opt.kl_base = &baseline;
  auto again = ComputePerplexity(**engine, *ids, opt);
  ASSERT_TRUE(again.ok());
  EXPECT_NEAR(again->kl_mean, 0.0, 1e-6);
  EXPECT_DOUBLE_EQ(again->top1_agreement, 1.0);
  opt.ctx = 64;
  EXPECT_EQ(ComputePerplexity(**engine, *ids, opt).status().code(),
            absl::StatusCode::kInvalidArgument);
  opt.kl_base = nullptr;
  opt.ctx = 100000;
  EXPECT_EQ(ComputePerplexity(**engine, *ids, opt).status().code(),
            absl::StatusCode::kInvalidArgument);

  // Position buckets cover every predicting position once; with two buckets the second is
  // exactly the scored second halves, so its PPL is the run's.
  opt.ctx = 64;
  opt.max_chunks = 2;
  opt.position_buckets = 2;
  auto buckets = ComputePerplexity(**engine, *ids, opt);
  ASSERT_TRUE(buckets.ok()) << buckets.status();
  ASSERT_EQ(buckets->buckets.size(), 2u);
  EXPECT_EQ(buckets->buckets[0].begin, 0);
  EXPECT_EQ(buckets->buckets[1].begin, 32);
  EXPECT_EQ(buckets->buckets[1].end, 63);
  EXPECT_EQ(buckets->buckets[0].tokens + buckets->buckets[1].tokens, 2 * 63);
  EXPECT_EQ(buckets->buckets[1].tokens, buckets->tokens_scored);
  EXPECT_DOUBLE_EQ(buckets->buckets[1].ppl, buckets->ppl);
  opt.position_buckets = 64;  // more buckets than positions
  EXPECT_EQ(ComputePerplexity(**engine, *ids, opt).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace quantkv
