// Expert parallelism with the all-to-all and combine-only dispatches (EngineConfig::
// moe_dispatch) over MPI, on the tiny Mixtral and Qwen2-MoE (shared expert) fixtures
// moe_ep_test uses, at EP = 2 (`mpirun -np 2 moe_ep_all_to_all_test`; the fixtures have 2 KV
// heads, so EP = 3 runs on the MoEfied SmolLM2 in moe_ep_all_to_all_model_test): logits
// against the whole model in the same process (EP = 1) and greedy tokens identical; and the
// bytes each rank sends in the MoE layers, against what the routing says they must be and
// against the all-reduce dispatch. fp32 activations and cache, so only the order of fp32
// sums differs: the tolerance is 1e-5 on logits of magnitude ~1 (moe_ep_test allows the
// all-reduce form 1e-4).
#include <algorithm>
#include <cmath>
#include <iostream>

#include "gtest/gtest.h"
#include "runtime/engine/engine.h"
#include "runtime/model/hf_model.h"
#include "tests/testutil/paths.h"
#include "tests/tp/moe_a2a_bytes.h"
#include "tests/tp/test_comm.h"

namespace quantkv {
namespace {

constexpr double kTolerance = 1e-5;

struct ModelRun {
  std::vector<float> logits;       // the prompt's every row, then three decode steps'
  std::vector<int32_t> greedy;     // 8 tokens chosen greedily after the prompt
  int64_t prefill_moe_bytes = 0;   // StepTimings::moe_bytes_sent of the prompt's step
  int64_t expected_a2a_bytes = 0;  // what the all-to-all sends on the prompt, from its routing
};

const std::vector<int32_t> kPrompt = {1, 17, 200, 3, 99, 42, 255, 0, 5, 130, 77, 12, 9};

ModelRun RunModel(const std::string& model, Communicator* comm, int64_t top_k,
                  MoeDispatch dispatch) {
  ModelRun run;
  auto w = OpenHfModelDir(testing::FixturePath("models/" + model).string());
  EXPECT_TRUE(w.ok()) << w.status();
  const int64_t hidden = (*w)->config().hidden;
  EngineConfig c;
  c.kv_spec = "fp32";
  c.kv_max_bytes = 1 << 20;
  c.decode_activations = kernels::ActivationPrecision::kFloat32;
  c.lm_head_activations = kernels::ActivationPrecision::kFloat32;
  c.comm = comm;
  c.moe_top_k = top_k;
  c.moe_dispatch = dispatch;
  bool prefill = true;
  c.routing_observer = [&](int64_t, const moe::Routing& r) {
    if (prefill && comm != nullptr) {
      run.expected_a2a_bytes +=
          testing::MoeAllToAllBytes(dispatch, r, hidden, comm->size(), comm->rank());
    }
  };
  auto e = Engine::Create(std::move(*w), c);
  EXPECT_TRUE(e.ok()) << e.status();
  if (!e.ok()) return run;
  Engine& engine = **e;
  const SequenceId seq = engine.NewSequence();
  EXPECT_TRUE(engine.Forward(seq, kPrompt, true, &run.logits).ok());
  run.prefill_moe_bytes = engine.last_step().moe_bytes_sent;
  prefill = false;
  for (int32_t t : {7, 64, 128}) {  // three decode steps
    EXPECT_TRUE(engine.Forward(seq, {&t, 1}, false, &run.logits).ok());
  }
  const int64_t V = engine.model_config().vocab_size;
  const SequenceId gen = engine.NewSequence();
  std::vector<float> logits;
  EXPECT_TRUE(engine.Forward(gen, kPrompt, false, &logits).ok());
  for (int i = 0; i < 8; ++i) {
    const int32_t next =
        static_cast<int32_t>(std::max_element(logits.end() - V, logits.end()) - (logits.end() - V));
    run.greedy.push_back(next);
    logits.clear();
    EXPECT_TRUE(engine.Forward(gen, {&next, 1}, false, &logits).ok());
  }
  return run;
}

TEST(MoeAllToAllDispatchTest, EqualsTheWholeModelAndSendsWhatTheRoutingSays) {
  Communicator& comm = testing::TestComm();
  ASSERT_GE(comm.size(), 2) << "run under mpirun -np 2 (ctest does)";
  const int P = comm.size();
  if (P > 2) GTEST_SKIP() << "the tiny fixtures have 2 KV heads: at most 2 ranks";
  for (const char* model : {"tiny_mixtral", "tiny_qwen2_moe"}) {
    for (int64_t k : {0, 1, 4}) {  // the model's top-2, top-1, all four experts
      const ModelRun whole = RunModel(model, nullptr, k, MoeDispatch::kAllReduce);
      const ModelRun ar = RunModel(model, &comm, k, MoeDispatch::kAllReduce);
      // The all-reduce form's MoE sum: an all-gather of the prompt's rows (below the MPI
      // communicator's reduce-scatter threshold for these sizes) to the other rank, per layer.
      EXPECT_EQ(ar.prefill_moe_bytes, 2 * (P - 1) * int64_t{13} * 64 * 4);
      for (MoeDispatch d : {MoeDispatch::kAllToAll, MoeDispatch::kCombineOnly}) {
        SCOPED_TRACE(::testing::Message() << model << " top_k " << k << " " << MoeDispatchName(d)
                                          << ", rank " << comm.rank() << " of " << P);
        const ModelRun a2a = RunModel(model, &comm, k, d);
        ASSERT_EQ(whole.logits.size(), a2a.logits.size());
        double max_diff = 0;
        for (size_t i = 0; i < whole.logits.size(); ++i) {
          max_diff = std::max<double>(max_diff, std::fabs(whole.logits[i] - a2a.logits[i]));
        }
        EXPECT_LT(max_diff, kTolerance);
        EXPECT_EQ(whole.greedy, a2a.greedy);
        EXPECT_EQ(ar.greedy, a2a.greedy);
        EXPECT_EQ(a2a.prefill_moe_bytes, a2a.expected_a2a_bytes);
        if (comm.rank() == 0) {
          std::cout << model << " top-" << (k == 0 ? 2 : k) << " EP=" << P << " "
                    << MoeDispatchName(d) << ": logits max |diff| vs EP=1 " << max_diff
                    << "; prompt MoE bytes sent by rank 0: " << a2a.prefill_moe_bytes
                    << " (all-reduce " << ar.prefill_moe_bytes << ")\n";
        }
        // With k = 1 of 4 experts on 2 ranks, half the rows on average have their expert on
        // their home rank: combine-only sends fewer bytes than the all-reduce, the full
        // all-to-all about as many (moe_dispatch.h).
        if (k == 1 && d == MoeDispatch::kCombineOnly) {
          EXPECT_LT(a2a.prefill_moe_bytes, ar.prefill_moe_bytes);
        }
      }
    }
  }
}

// The all-to-all dispatch needs experts split over the ranks, and an MoE model.
TEST(MoeAllToAllDispatchTest, RefusesExpertsSplitByNeuronAndDenseModels) {
  Communicator& comm = testing::TestComm();
  for (const char* model : {"tiny_mixtral", "tiny_llama_f32"}) {
    auto w = OpenHfModelDir(testing::FixturePath(std::string("models/") + model).string());
    ASSERT_TRUE(w.ok()) << w.status();
    EngineConfig c;
    c.kv_spec = "fp32";
    c.kv_max_bytes = 1 << 20;
    c.comm = &comm;
    c.moe_dispatch = MoeDispatch::kAllToAll;
    c.moe_tensor_parallel = std::string(model) == "tiny_mixtral";
    auto e = Engine::Create(std::move(*w), c);
    ASSERT_FALSE(e.ok()) << model;
    EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument) << e.status();
    EXPECT_NE(std::string(e.status().message()).find("--ep-dispatch all-to-all"), std::string::npos)
        << e.status();
  }
}

}  // namespace
}  // namespace quantkv
