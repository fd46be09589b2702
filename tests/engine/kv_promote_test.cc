// Promoted tokens in the engine (--kv-promote): the rows a step's signal picks are kept
// exactly in their blocks, so later steps attend to them at full precision; errors for a
// cache without kept rows and for router entropy on a dense model.
#include <cmath>
#include <cstdio>

#include "gtest/gtest.h"
#include "runtime/engine/engine.h"
#include "runtime/model/hf_model.h"
#include "tests/testutil/paths.h"
#include "tests/testutil/relative_error.h"

namespace quantkv {
namespace {

std::unique_ptr<WeightSource> Open(const std::string& name) {
  auto w = OpenHfModelDir(testing::FixturePath("models/" + name).string());
  EXPECT_TRUE(w.ok()) << w.status();
  return std::move(*w);
}

// Logits of 48 tokens fed 4 per step, so blocks fill in early steps and later steps read
// them (promotion happens at the end of the step that fills a block).
// Steps of 4 tokens, fp32 activations (so caches differ only in what they hold).
EngineConfig PromoteConfig(const std::string& kv, const std::string& promote) {
  EngineConfig c;
  c.kv_spec = kv;
  c.kv_max_bytes = 1 << 20;
  c.max_chunk_tokens = 4;
  c.kv_promote = promote;
  c.decode_activations = kernels::ActivationPrecision::kFloat32;
  c.lm_head_activations = kernels::ActivationPrecision::kFloat32;
  return c;
}

std::vector<float> RunSteps(const std::string& model, const std::string& kv,
                            const std::string& promote) {
  auto e = Engine::Create(Open(model), PromoteConfig(kv, promote));
  EXPECT_TRUE(e.ok()) << e.status();
  std::vector<int32_t> tokens;
  for (int i = 0; i < 48; ++i) tokens.push_back((i * 37 + 11) % 256);
  std::vector<float> logits;
  EXPECT_TRUE((*e)->Forward((*e)->NewSequence(), tokens, true, &logits).ok());
  return logits;
}

using testing::RelativeL2Error;

TEST(KvPromoteTest, PromotedRowsBringTheCacheCloserToExact) {
  for (const char* model : {"tiny_llama_f32", "tiny_mixtral"}) {
    SCOPED_TRACE(model);
    const std::vector<float> exact = RunSteps(model, "fp32", "");
    // Blocks of 16 tokens with room for 12 exact rows: most of every block once promoted.
    const std::string kv = "int2:g16:asym:keep12,block=16";
    const double none = RelativeL2Error(RunSteps(model, kv, ""), exact);
    const double key_norm = RelativeL2Error(RunSteps(model, kv, "key-norm"), exact);
    const double attention = RelativeL2Error(RunSteps(model, kv, "attention"), exact);
    EXPECT_GT(none, 1e-3);
    EXPECT_LT(key_norm, 0.7 * none) << "none " << none << " key-norm " << key_norm;
    EXPECT_LT(attention, 0.7 * none) << "none " << none << " attention " << attention;
    if (std::string(model) == "tiny_mixtral") {
      const double entropy = RelativeL2Error(RunSteps(model, kv, "router-entropy"), exact);
      EXPECT_LT(entropy, 0.7 * none) << "none " << none << " router-entropy " << entropy;
    }
  }
}

// A 48-token prompt in steps of 4 (its logits), then 8 one-token decode steps (theirs).
struct PromptThenDecode {
  std::vector<float> prompt, decode;
};
PromptThenDecode RunPromptThenDecode(const std::string& model, const std::string& kv,
                                     const std::string& promote) {
  EngineConfig c = PromoteConfig(kv, promote);
  c.snapkv_window = 8;
  auto e = Engine::Create(Open(model), c);
  EXPECT_TRUE(e.ok()) << e.status();
  PromptThenDecode out;
  if (!e.ok()) return out;
  std::vector<int32_t> tokens;
  for (int i = 0; i < 48; ++i) tokens.push_back((i * 37 + 11) % 256);
  const SequenceId seq = (*e)->NewSequence();
  EXPECT_TRUE((*e)->Forward(seq, tokens, true, &out.prompt).ok());
  for (int i = 0; i < 8; ++i) {
    std::vector<float> logits;
    const std::vector<int32_t> one = {(i * 53 + 7) % 256};
    EXPECT_TRUE((*e)->Forward(seq, one, false, &logits).ok());
    out.decode.insert(out.decode.end(), logits.begin(), logits.end());
  }
  return out;
}

// SnapKV compresses a prompt at its end: the prompt itself attends at full precision, and
// the decode steps after it read the rows the prompt's last queries chose.
// H2O's eviction (drop:keepN) must be guided by the scores to be any good.
TEST(KvPromoteTest, SnapKvDecidesAtThePromptsEndAndDropKeepsTheChosenRows) {
  const std::string model = "tiny_llama_f32";
  const PromptThenDecode exact = RunPromptThenDecode(model, "fp32", "");
  const std::string kv = "int2:g16:asym:keep6,block=16";
  const PromptThenDecode none = RunPromptThenDecode(model, kv, "");
  const PromptThenDecode snap = RunPromptThenDecode(model, kv, "snapkv");
  ASSERT_FALSE(snap.prompt.empty());
  // Until the prompt ends it attends to its retained fp16 rows, as an fp16 cache does.
  const PromptThenDecode fp16 = RunPromptThenDecode(model, "fp16,block=16", "");
  const double prompt_vs_fp16 = RelativeL2Error(snap.prompt, fp16.prompt);
  const double none_vs_fp16 = RelativeL2Error(none.prompt, fp16.prompt);
  std::printf("prompt logits vs an fp16 cache: snapkv %.2e, int2 keep6 %.2e\n", prompt_vs_fp16,
              none_vs_fp16);
  EXPECT_LT(prompt_vs_fp16, 1e-5);
  EXPECT_GT(none_vs_fp16, 1e-2);
  const double err_none = RelativeL2Error(none.decode, exact.decode);
  const double err_snap = RelativeL2Error(snap.decode, exact.decode);
  std::printf("decode error vs fp32: int2 keep6 none %.4f snapkv %.4f\n", err_none, err_snap);
  EXPECT_GT(err_none, 1e-3);
  EXPECT_LT(err_snap, 0.9 * err_none);
  const std::string drop = "k=drop:keep6,v=drop:keep6,sink=2,window=4,block=16";
  const double drop_none =
      RelativeL2Error(RunPromptThenDecode(model, drop, "").decode, exact.decode);
  const double drop_h2o =
      RelativeL2Error(RunPromptThenDecode(model, drop, "attention").decode, exact.decode);
  const double drop_snap =
      RelativeL2Error(RunPromptThenDecode(model, drop, "snapkv").decode, exact.decode);
  std::printf("decode error vs fp32: drop keep6 none %.4f attention %.4f snapkv %.4f\n", drop_none,
              drop_h2o, drop_snap);
  EXPECT_LT(drop_h2o, drop_none);
  EXPECT_LT(drop_snap, drop_none);
}

TEST(KvPromoteTest, MisuseIsRefusedWithTheFlagNamed) {
  EngineConfig c;
  c.kv_spec = "int2:g16:asym,block=16";
  c.kv_max_bytes = 1 << 20;
  c.kv_promote = "key-norm";
  auto e = Engine::Create(Open("tiny_llama_f32"), c);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("keepN"), std::string::npos) << e.status();
  c.kv_spec = "int2:g16:asym:keep4,block=16";
  c.kv_promote = "router-entropy";
  e = Engine::Create(Open("tiny_llama_f32"), c);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("not a mixture of experts"), std::string::npos);
  c.kv_promote = "heavy-hitters";
  e = Engine::Create(Open("tiny_llama_f32"), c);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("'heavy-hitters'"), std::string::npos);
}

}  // namespace
}  // namespace quantkv
