// Elastic precision under memory pressure, end to end in the serving engine loop over
// SmolLM2-135M: four requests whose caches outgrow a 12-block int4-comp pool preempt
// without a floor, and complete without any preemption with --kv-floor int2-floor, the
// oldest block pairs re-encoded to 2 bits instead; Stats counts the blocks and bytes.
#include <chrono>
#include <filesystem>
#include <iostream>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gguf_model.h"
#include "runtime/serve/engine_loop.h"
#include "tests/testutil/drain_stream.h"
#include "tests/testutil/fixture_text.h"
#include "tests/testutil/paths.h"

namespace quantkv {
namespace {

constexpr int kRequests = 4;
constexpr int64_t kPromptTokens = 260, kNewTokens = 250;  // 510 tokens: 4 blocks of 128
constexpr int64_t kPoolBlocks = 12;

struct LoadResult {
  int64_t preemptions = 0;
  int64_t requantized_blocks = 0;
  int64_t bytes_freed = 0;
  int64_t block_bytes = 0;
  std::vector<int64_t> generated;
};

absl::StatusOr<LoadResult> RunLoad(const Tokenizer& tok, const std::vector<int32_t>& text,
                                   const std::string& floor) {
  EngineConfig cfg;
  cfg.threads = 2;
  cfg.kv_spec = "int4-comp";
  cfg.kv_floor = floor;
  cfg.max_chunk_tokens = 128;
  cfg.gemm_min_rows = std::numeric_limits<int64_t>::max();
  cfg.fused_decode_attention = false;
  {  // the pool is sized in blocks of this preset
    auto probe_model = GgufModel::Open(testing::DefaultModelPath().string());
    if (!probe_model.ok()) return probe_model.status();
    auto probe = Engine::Create(std::move(*probe_model), cfg);
    if (!probe.ok()) return probe.status();
    cfg.kv_max_bytes = kPoolBlocks * (*probe)->kv_cache().block_bytes_all_layers();
  }
  auto model = GgufModel::Open(testing::DefaultModelPath().string());
  if (!model.ok()) return model.status();
  auto engine = Engine::Create(std::move(*model), cfg);
  if (!engine.ok()) return engine.status();
  LoadResult out;
  out.block_bytes = (*engine)->kv_cache().block_bytes_all_layers();
  auto loop = EngineLoop::Create(
      std::move(*engine), &tok,
      {.max_running = 8, .max_queued = 16, .max_step_tokens = 128, .kv_preset = "int4-comp"});
  if (!loop.ok()) return loop.status();
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (int i = 0; i < kRequests; ++i) {
    GenerationParams p;
    p.prompt.assign(text.begin() + i * 97, text.begin() + i * 97 + kPromptTokens);
    p.max_tokens = kNewTokens;
    p.ignore_eos = true;
    auto s = (*loop)->Submit(p);
    if (!s.ok()) return s.status();
    streams.push_back(*s);
  }
  for (auto& s : streams) {
    GenerationFinal f;
    testing::Drain(*s, &f);
    out.generated.push_back(f.generated_tokens);
  }
  // Stats are published after each loop iteration: wait for the one after the last step.
  EngineLoopStats st = (*loop)->Stats();
  for (int i = 0; i < 500 && st.scheduler.pools[0].blocks_free != st.scheduler.pools[0].n_blocks;
       ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    st = (*loop)->Stats();
  }
  out.preemptions = st.scheduler.preemptions;
  out.requantized_blocks = st.scheduler.requantized_blocks;
  out.bytes_freed = st.kv_requantized_bytes_freed;
  EXPECT_EQ(st.scheduler.pools[0].blocks_free, st.scheduler.pools[0].n_blocks)
      << "blocks not returned";
  return out;
}

TEST(EngineLoopElasticTest, FloorRequantizesInsteadOfPreempting) {
  if (!std::filesystem::exists(testing::DefaultModelPath())) {
    GTEST_SKIP() << "default model not in the cache (" << testing::DefaultModelPath() << ")";
  }
  auto model = GgufModel::Open(testing::DefaultModelPath().string());
  ASSERT_TRUE(model.ok()) << model.status();
  auto tok = Tokenizer::FromGguf((*model)->gguf());
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto text = testing::FixtureTextIds(testing::DefaultModelPath().string());
  ASSERT_TRUE(text.ok()) << text.status();
  ASSERT_GE(static_cast<int64_t>(text->size()), 3 * 97 + kPromptTokens);

  auto off = RunLoad(**tok, *text, "");
  ASSERT_TRUE(off.ok()) << off.status();
  EXPECT_GT(off->preemptions, 0) << "the load does not press the pool: the test proves nothing";
  EXPECT_EQ(off->requantized_blocks, 0);

  auto on = RunLoad(**tok, *text, "int2-floor");
  ASSERT_TRUE(on.ok()) << on.status();
  EXPECT_EQ(on->preemptions, 0);
  EXPECT_GT(on->requantized_blocks, 0);
  EXPECT_EQ(on->bytes_freed, on->requantized_blocks / 2 * on->block_bytes);
  std::cout << "without a floor: " << off->preemptions
            << " preemptions; with int2-floor: " << on->preemptions << " preemptions, "
            << on->requantized_blocks << " blocks requantized, " << on->bytes_freed
            << " bytes freed\n";
  for (int i = 0; i < kRequests; ++i) {
    EXPECT_EQ(off->generated[i], kNewTokens) << "request " << i;
    EXPECT_EQ(on->generated[i], kNewTokens) << "request " << i;
  }
}

}  // namespace
}  // namespace quantkv
