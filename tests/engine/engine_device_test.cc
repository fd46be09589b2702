// EngineConfig::device on any machine: the choices and their errors, and "auto" running on
// the CPU where no GPU is usable (it then computes exactly what "cpu" does). The GPU forward
// itself is checked against the CPU in tests/gpu/cuda_engine_gpu_test.cc.
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/engine/device_forward.h"
#include "runtime/engine/engine.h"
#include "runtime/model/hf_model.h"
#include "tests/testutil/paths.h"

namespace quantkv {
namespace {

absl::StatusOr<std::unique_ptr<Engine>> TinyEngine(const EngineConfig& cfg) {
  auto weights = OpenHfModelDir(testing::FixturePath("models/tiny_llama_f32").string());
  if (!weights.ok()) return weights.status();
  return Engine::Create(std::move(*weights), cfg);
}

bool Has(const absl::Status& s, const std::string& needle) {
  return std::string(s.message()).find(needle) != std::string::npos;
}

TEST(EngineDeviceTest, UnknownDeviceAndFractionAreRefusedByName) {
  EngineConfig cfg;
  cfg.kv_max_bytes = 1 << 20;
  cfg.device = "tpu";
  absl::StatusOr<std::unique_ptr<Engine>> e = TinyEngine(cfg);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Has(e.status(), "--device 'tpu'")) << e.status();
  cfg.device = "cpu";
  cfg.gpu_memory_fraction = 0.0;
  e = TinyEngine(cfg);
  ASSERT_FALSE(e.ok());
  EXPECT_TRUE(Has(e.status(), "--gpu-memory-fraction")) << e.status();
}

TEST(EngineDeviceTest, CudaWithoutAGpuSaysWhy) {
  if (CudaDeviceUsable()) GTEST_SKIP() << "a GPU is usable here: cuda_engine_gpu_test covers it";
  EngineConfig cfg;
  cfg.kv_max_bytes = 1 << 20;
  cfg.device = "cuda";
  absl::StatusOr<std::unique_ptr<Engine>> e = TinyEngine(cfg);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kUnavailable) << e.status();
  EXPECT_TRUE(Has(e.status(), "--device cuda")) << e.status();
}

TEST(EngineDeviceTest, CudaRefusesWhatItDoesNotRunBeforeLookingForAGpu) {
  EngineConfig cfg;
  cfg.kv_max_bytes = 1 << 20;
  cfg.device = "cuda";
  cfg.page_fraction = 0.5;
  absl::StatusOr<std::unique_ptr<Engine>> e = TinyEngine(cfg);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kUnimplemented) << e.status();
  EXPECT_TRUE(Has(e.status(), "--page-fraction")) << e.status();
}

TEST(EngineDeviceTest, AutoWithoutAGpuRunsOnTheCpuBitForBit) {
  if (CudaDeviceUsable()) GTEST_SKIP() << "a GPU is usable here: auto picks it";
  std::vector<float> logits[2];
  for (int i = 0; i < 2; ++i) {
    EngineConfig cfg;
    cfg.kv_max_bytes = 1 << 20;
    cfg.kv_spec =
        "k=int4:chan,v=int4:g16:asym,sink=1,window=2,block=4";  // encodes blocks at 8 tokens
    cfg.device = i == 0 ? "cpu" : "auto";
    absl::StatusOr<std::unique_ptr<Engine>> e = TinyEngine(cfg);
    ASSERT_TRUE(e.ok()) << e.status();
    EXPECT_EQ((*e)->device(), nullptr);
    const SequenceId seq = (*e)->NewSequence();
    const std::vector<int32_t> tokens = {1, 5, 9, 2, 7, 3, 11, 4};
    ASSERT_TRUE((*e)->Forward(seq, tokens, true, &logits[i]).ok());
  }
  ASSERT_FALSE(logits[0].empty());
  EXPECT_EQ(logits[0], logits[1]);
}

}  // namespace
}  // namespace quantkv
