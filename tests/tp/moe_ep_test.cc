// Expert parallelism over MPI: a tiny Mixtral and a tiny Qwen2-MoE (shared expert) with the
// experts split over the ranks whole (rank r computes experts e % N == r) or by neuron
// (tensor parallelism inside experts), the shared expert split by neuron, and attention
// split by KV head, against the whole model in the same process. Run as
// `mpirun -np N moe_ep_test`. fp32 activations and cache: only the order of the fp32 sums
// of the partial outputs differs.
#include <cmath>

#include "gtest/gtest.h"
#include "runtime/engine/engine.h"
#include "runtime/model/hf_model.h"
#include "tests/testutil/paths.h"
#include "tests/tp/test_comm.h"

namespace quantkv {
namespace {

std::vector<float> RunModel(const std::string& model, Communicator* comm, int64_t top_k,
                            bool tensor_parallel_experts = false) {
  auto w = OpenHfModelDir(testing::FixturePath("models/" + model).string());
  EXPECT_TRUE(w.ok()) << w.status();
  EngineConfig c;
  c.kv_spec = "fp32";
  c.kv_max_bytes = 1 << 20;
  c.decode_activations = kernels::ActivationPrecision::kFloat32;
  c.lm_head_activations = kernels::ActivationPrecision::kFloat32;
  c.comm = comm;
  c.moe_top_k = top_k;
  c.moe_tensor_parallel = tensor_parallel_experts;
  auto e = Engine::Create(std::move(*w), c);
  EXPECT_TRUE(e.ok()) << e.status();
  const std::vector<int32_t> prompt = {1, 17, 200, 3, 99, 42, 255, 0, 5, 130};
  std::vector<float> logits;
  const SequenceId seq = (*e)->NewSequence();
  EXPECT_TRUE((*e)->Forward(seq, prompt, true, &logits).ok());
  for (int32_t t : {7, 64, 128}) {  // and three decode steps
    EXPECT_TRUE((*e)->Forward(seq, {&t, 1}, false, &logits).ok());
  }
  return logits;
}

TEST(MoeExpertParallelTest, ShardedExpertsEqualTheWholeModel) {
  Communicator& comm = testing::TestComm();
  ASSERT_GE(comm.size(), 2) << "run under mpirun -np 2 or more";
  for (const char* model : {"tiny_mixtral", "tiny_qwen2_moe"}) {
    for (int64_t k : {0, 1, 4}) {  // the model's top-2, top-1, all experts
      for (bool tp_experts : {false, true}) {
        SCOPED_TRACE(::testing::Message()
                     << model << " top_k " << k << " rank " << comm.rank()
                     << (tp_experts ? " experts split by neuron" : " experts by rank"));
        const std::vector<float> whole = RunModel(model, nullptr, k);
        const std::vector<float> sharded = RunModel(model, &comm, k, tp_experts);
        ASSERT_EQ(whole.size(), sharded.size());
        double max_diff = 0;
        for (size_t i = 0; i < whole.size(); ++i) {
          max_diff = std::max<double>(max_diff, std::fabs(whole[i] - sharded[i]));
        }
        EXPECT_LT(max_diff, 1e-4);
      }
    }
  }
}

}  // namespace
}  // namespace quantkv
