// KV sensitivity on a tiny slice of SmolLM2 (2 layers, 64-token windows): the file parses
// back, 2-bit codecs cost more than 8-bit ones in every measured layer, the numbers equal
// `quantkv perplexity`'s for the same policy, and the per-head KL proxy runs. Skips without
// the default model. Spearman's rho is checked without a model.
#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/eval/kv_sensitivity.h"
#include "runtime/eval/perplexity.h"
#include "runtime/model/gguf_model.h"
#include "runtime/tokenizer/tokenizer.h"
#include "tests/testutil/fixture_text.h"
#include "tests/testutil/paths.h"

namespace quantkv {
namespace {

TEST(SpearmanRhoTest, RanksWithTies) {
  const std::vector<double> a = {1, 2, 3, 4, 5};
  EXPECT_DOUBLE_EQ(SpearmanRho(a, std::vector<double>{10, 20, 30, 40, 50}), 1.0);
  EXPECT_DOUBLE_EQ(SpearmanRho(a, std::vector<double>{5, 4, 3, 2, 1}), -1.0);
  // Ranks of b: 1, 2, 3.5, 5, 3.5 -> 8 / sqrt(10 * 9.5).
  EXPECT_NEAR(SpearmanRho(a, std::vector<double>{5, 6, 7, 8, 7}), 8 / std::sqrt(95.0), 1e-12);
  EXPECT_EQ(SpearmanRho(a, std::vector<double>{1, 1, 1, 1, 1}), 0.0);
  EXPECT_EQ(SpearmanRho(std::vector<double>{1}, std::vector<double>{2}), 0.0);
}

class KvSensitivityModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = testing::DefaultModelPath();
    if (!std::filesystem::exists(path_))
      GTEST_SKIP() << "default model not in the cache: " << path_;
    auto ids = testing::FixtureTextIds(path_.string());
    ASSERT_TRUE(ids.ok()) << ids.status();
    ids_ = *ids;
  }

  KvEngineFactory Factory() const {
    return [path = path_](const EngineConfig& c) -> absl::StatusOr<std::unique_ptr<Engine>> {
      auto model = GgufModel::Open(path.string());
      if (!model.ok()) return model.status();
      EngineConfig cfg = c;
      cfg.threads = 2;
      return Engine::Create(std::move(*model), cfg);
    };
  }

  std::filesystem::path path_;
  std::vector<int32_t> ids_;
};

TEST_F(KvSensitivityModelTest, TwoBitsCostMoreThanEightInEveryLayer) {
  KvSensitivityOptions o;
  o.k_codecs = o.v_codecs = {"int8:g64:asym", "int2:g64:asym"};
  o.layers = {0, 1};
  o.ctx = 64;
  o.chunks = 1;
  o.head_proxy = "mse";
  absl::StatusOr<KvSensitivity> s = MeasureKvSensitivity(Factory(), ids_, o);
  ASSERT_TRUE(s.ok()) << s.status();

  const std::filesystem::path file = std::filesystem::temp_directory_path() / "kv_sens_test.json";
  ASSERT_TRUE(WriteKvSensitivity(file.string(), *s).ok());
  absl::StatusOr<KvSensitivity> back = ReadKvSensitivity(file.string());
  std::filesystem::remove(file);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->n_layers, 30);
  EXPECT_EQ(back->n_kv_heads, 3);
  EXPECT_EQ(back->tokens_scored, 31);  // positions 32..62 of one 64-token window
  EXPECT_GT(back->baseline_ppl, 1);
  ASSERT_EQ(back->layers.size(), 2u);
  for (const KvLayerSensitivity& l : back->layers) {
    for (const auto* ms : {&l.k, &l.v}) {
      ASSERT_EQ(ms->size(), 2u);
      EXPECT_NEAR((*ms)[0].bits_per_element, 8.5, 1e-9);
      EXPECT_NEAR((*ms)[1].bits_per_element, 2.5, 1e-9);
      EXPECT_GE((*ms)[0].kl, 0);
      EXPECT_GT((*ms)[1].kl, (*ms)[0].kl) << "layer " << l.layer;
    }
    ASSERT_EQ(l.heads.size(), 3u);
    for (const KvHeadSensitivity& h : l.heads) {
      EXPECT_GT(h.k[1].mse, h.k[0].mse);
      EXPECT_GT(h.v[1].mse, h.v[0].mse);
      EXPECT_LT(h.k[1].kl, 0);  // the kl proxy was not asked for
    }
  }
  const nlohmann::json report = nlohmann::json::parse(back->report_json);
  EXPECT_TRUE(report["spearman"].contains("mse"));
  EXPECT_EQ(report["runs"]["layers"], 8);

  // The same numbers as ComputePerplexity (what `quantkv perplexity --kv` reports) for the
  // base and for layer 1's K at 2 bits.
  auto model = GgufModel::Open(path_.string());
  ASSERT_TRUE(model.ok());
  EngineConfig cfg;
  cfg.threads = 2;
  cfg.kv_spec = "fp16";
  cfg.more_kv_specs = {"fp16,1.k=int2:g64:asym"};
  auto engine = Engine::Create(std::move(*model), cfg);
  ASSERT_TRUE(engine.ok());
  PerplexityOptions po;
  po.ctx = 64;
  po.max_chunks = 1;
  LogitsBaseline base;
  po.save_logits = &base;
  auto fp16 = ComputePerplexity(**engine, ids_, po);
  ASSERT_TRUE(fp16.ok());
  EXPECT_NEAR(fp16->ppl, back->baseline_ppl, 1e-4 * fp16->ppl);
  // ComputePerplexity runs cache 0; a second engine puts the int2 policy there.
  auto model2 = GgufModel::Open(path_.string());
  ASSERT_TRUE(model2.ok());
  cfg.kv_spec = "fp16,1.k=int2:g64:asym";
  cfg.more_kv_specs.clear();
  auto int2 = Engine::Create(std::move(*model2), cfg);
  ASSERT_TRUE(int2.ok());
  po.save_logits = nullptr;
  po.kl_base = &base;
  auto q = ComputePerplexity(**int2, ids_, po);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_NEAR(q->ppl, back->layers[1].k[1].ppl, 1e-4 * q->ppl);
  EXPECT_NEAR(q->kl_mean, back->layers[1].k[1].kl, 1e-4 * q->kl_mean + 1e-7);
}

TEST_F(KvSensitivityModelTest, PerHeadKlProxy) {
  KvSensitivityOptions o;
  o.k_codecs = o.v_codecs = {"int2:g64:asym"};
  o.layers = {1};
  o.ctx = 64;
  o.head_proxy = "kl";
  o.proxy_ctx = 64;
  absl::StatusOr<KvSensitivity> s = MeasureKvSensitivity(Factory(), ids_, o);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->head_proxy, "kl");
  ASSERT_EQ(s->layers.size(), 1u);
  ASSERT_EQ(s->layers[0].heads.size(), 3u);
  double k_sum = 0;
  for (const KvHeadSensitivity& h : s->layers[0].heads) {
    EXPECT_GE(h.k[0].kl, 0);
    EXPECT_GE(h.v[0].kl, 0);
    EXPECT_GT(h.k[0].mse, 0);  // recorded beside kl (it is free)
    k_sum += h.k[0].kl;
  }
  EXPECT_GT(k_sum, 0);
  EXPECT_EQ(nlohmann::json::parse(s->report_json)["runs"]["heads"], 6);
  // Bad options are refused with the reason.
  o.k_codecs = {"int4:static"};
  EXPECT_NE(MeasureKvSensitivity(Factory(), ids_, o).status().message().find("static"),
            std::string::npos);
  o.k_codecs = {"int4"};
  o.layers = {30};
  EXPECT_NE(MeasureKvSensitivity(Factory(), ids_, o).status().message().find("layer 30"),
            std::string::npos);
}

}  // namespace
}  // namespace quantkv
