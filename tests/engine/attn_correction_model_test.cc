// Attention-output corrections on SmolLM2 (skips without the model): fitted on a short slice
// of calibration text for two layers, they must lower the attention-output error against the
// exact cache on held-out tokens, as the engine applies them, and the fitter's analytic
// error must match what the engine then produces.
#include <filesystem>
#include <fstream>
#include <sstream>

#include "gtest/gtest.h"
#include "runtime/engine/attn_correction_fit.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gguf_model.h"
#include "runtime/tokenizer/tokenizer.h"
#include "tests/testutil/paths.h"

namespace quantkv {
namespace {

constexpr char kSpec[] = "int2-comp,block=32";
constexpr int64_t kCtx = 128;

struct Errors {
  double before = 0, after = 0;  // Σ |exact - output|² without and with the correction
};

TEST(AttnCorrectionModelTest, FittedCorrectionLowersHeldOutError) {
  const auto path = testing::DefaultModelPath();
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "default model not in the cache: " << path;
  std::ifstream in("/usr/share/common-licenses/GPL-3");
  if (!in) GTEST_SKIP() << "no /usr/share/common-licenses/GPL-3";
  std::stringstream text;
  text << in.rdbuf();

  const std::vector<int64_t> layers = {0, 1};
  AttnCorrectionStats* sink = nullptr;
  std::vector<float> xs, ys;
  Errors measured[2];
  bool measure = false;
  auto observer = [&](const AttnObservation& o) {
    if (o.layer > 1) return;
    const int64_t d = 576;
    xs.clear();
    ys.clear();
    for (int64_t i = 0; i < o.n; ++i) {
      if (!o.reads_encoded[i]) continue;
      xs.insert(xs.end(), o.attn + i * d, o.attn + (i + 1) * d);
      ys.insert(ys.end(), o.attn_exact + i * d, o.attn_exact + (i + 1) * d);
    }
    if (sink != nullptr)
      sink->Add(o.layer, static_cast<int64_t>(xs.size()) / d, xs.data(), ys.data());
    if (measure) {
      for (size_t i = 0; i < xs.size(); ++i) {
        measured[o.layer].after += (double{ys[i]} - xs[i]) * (double{ys[i]} - xs[i]);
      }
    }
  };
  auto make_engine = [&](std::shared_ptr<const AttnCorrection> corr) {
    auto model = GgufModel::Open(path.string());
    EXPECT_TRUE(model.ok()) << model.status();
    EngineConfig cfg;
    cfg.threads = 2;
    cfg.kv_spec = kSpec;
    cfg.max_chunk_tokens = kCtx;
    cfg.attn_observer = observer;
    cfg.attn_observer_exact_kv = "fp16";
    cfg.attn_correction = corr;
    auto e = Engine::Create(std::move(*model), cfg);
    EXPECT_TRUE(e.ok()) << e.status();
    return std::move(*e);
  };
  auto gguf = GgufModel::Open(path.string());
  ASSERT_TRUE(gguf.ok());
  auto tokenizer = Tokenizer::FromGguf((*gguf)->gguf());
  ASSERT_TRUE(tokenizer.ok());
  auto ids = (*tokenizer)->Encode(text.str());
  ASSERT_TRUE(ids.ok());
  ASSERT_GE(ids->size(), 4u * kCtx);
  auto run = [&](Engine& e, int64_t first_window, int64_t windows) {
    std::vector<float> logits;
    for (int64_t w = first_window; w < first_window + windows; ++w) {
      const SequenceId seq = e.NewSequence();
      ASSERT_TRUE(
          e.Forward(seq, {ids->data() + w * kCtx, static_cast<size_t>(kCtx)}, false, &logits).ok());
      ASSERT_TRUE(e.Release(seq).ok());
    }
  };

  // Fit on 3 windows, collect the held-out statistics of the next one uncorrected.
  std::unique_ptr<Engine> plain = make_engine(nullptr);
  AttnCorrectionStats train(30, 576, layers), held(30, 576, layers);
  sink = &train;
  run(*plain, 0, 3);
  sink = &held;
  run(*plain, 3, 1);
  sink = nullptr;
  auto corr = std::make_shared<AttnCorrection>();
  corr->kv_spec = kSpec;
  corr->n_layers = 30;
  corr->dim = 576;
  corr->rank = 16;
  corr->layers.resize(30);
  for (int64_t l : layers) {
    ASSERT_GT(train.rows(l), 250);
    auto fit = train.Fit(l, {.rank = 16, .ridge = 1.0});
    ASSERT_TRUE(fit.ok()) << fit.status();
    corr->layers[l] = std::move(*fit);
  }

  // The engine applying it on the held-out windows.
  std::unique_ptr<Engine> corrected = make_engine(corr);
  measure = true;
  run(*corrected, 3, 1);
  for (int64_t l : layers) {
    const AttnCorrectionError predicted = held.Evaluate(l, corr->layers[l]);
    std::printf(
        "[ info ] layer %d: %d held-out rows, relative error %.5f uncorrected, %.5f "
        "predicted, %.5f as applied\n",
        static_cast<int>(l), static_cast<int>(held.rows(l)),
        predicted.uncorrected / predicted.reference, predicted.corrected / predicted.reference,
        measured[l].after / predicted.reference);
    EXPECT_LT(measured[l].after, 0.9 * predicted.uncorrected) << "layer " << l;
  }
  // Layer 0 sees the same inputs with and without the correction: the fitter's analytic
  // error is what the engine produced.
  const AttnCorrectionError p0 = held.Evaluate(0, corr->layers[0]);
  EXPECT_NEAR(measured[0].after / p0.corrected, 1.0, 2e-3);
}

}  // namespace
}  // namespace quantkv
