// TP=N against TP=1 on the default model, run as `mpirun -np N tp_logits_test` (ctest runs
// N = 2 and 3). Every rank builds both engines: the sharded one over MPI and a whole one
// (comm = nullptr) in the same process, and runs a fixed prompt plus 8 greedy decode steps.
//
// Tolerance: activations are fp32 in both engines (decode and lm_head), so the sharded
// engine does the same arithmetic except that the attention-output and down projections'
// dot products are split at block boundaries and summed across ranks afterwards: only the
// order of fp32 additions changes, by ~1e-7 relative. With an fp32 cache that is all there
// is (measured max |diff| ~2e-5 on logits of magnitude ~25): tolerance 1e-4. A cache that
// rounds K/V amplifies it: the odd element lands on the other side of a rounding boundary
// and moves by a whole storage step (half an fp16 ulp, ~2.4e-4 relative; a whole int4 step
// for int4-comp). Measured 7e-3 (fp16) and 6e-2 (int4-comp) over 2 and 3 ranks; the
// tolerances are ~3x that, still far below what a wrong shard (a missing head, a bias added
// twice) produces (logits off by > 1), and greedy tokens must match exactly.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "runtime/comm/communicator.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gguf_model.h"
#include "runtime/tokenizer/tokenizer.h"
#include "tests/testutil/paths.h"
#include "tests/tp/test_comm.h"

namespace quantkv {
namespace {

constexpr int kDecodeSteps = 8;
// Long enough (~230 tokens) that int4-comp (blocks of 128, window 8) encodes a full block:
// a shorter prompt would stay in its fp16 window and test nothing quantized.
constexpr char kPrompt[] =
    "The old lighthouse stood at the edge of the cliff, its white paint peeling after decades "
    "of salt wind and winter storms. Every evening the keeper climbed the one hundred and "
    "twelve steps to the lamp room, wound the clockwork that turned the great lens, and "
    "lit the wick. Ships passing in the night saw the beam sweep across the water every ten "
    "seconds, and they knew where the rocks were. The keeper kept a logbook in which he wrote "
    "the weather, the ships he saw, and the birds that rested on the railing. In spring there "
    "were puffins, in autumn long lines of geese flying south, and once, during a gale, an "
    "exhausted owl that sheltered behind the lamp until morning. When the lighthouse was "
    "finally automated, the keeper moved to the village below. He still walked up the path "
    "every evening to watch the light come on by itself, and he still wrote in his logbook, "
    "although nobody asked him to. The villagers said that the light seemed brighter on the "
    "nights he was there. One winter evening, a young girl from the village followed him up "
    "the path and asked what he was writing. He showed her the first page of the logbook, "
    "dated forty years earlier, and said that the sea was";

Communicator& Comm() { return testing::TestComm(); }

struct Generation {
  std::vector<std::vector<float>> logits;  // prefill's last row, then each decode step
  std::vector<int32_t> tokens;             // greedy picks
};

int32_t Argmax(const std::vector<float>& row) {
  return static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

// Collective when comm is set: every rank must call it with the same arguments.
// Greedy picks are the engine's own, so identical tokens are a real check.
absl::StatusOr<Generation> Generate(const std::string& kv, Communicator* comm,
                                    const std::vector<int32_t>& prompt) {
  auto model = GgufModel::Open(testing::DefaultModelPath().string());
  if (!model.ok()) return model.status();
  EngineConfig cfg;
  cfg.threads = 1;  // the ranks share the machine's cores
  cfg.kv_spec = kv;
  cfg.kv_max_bytes = int64_t{16} << 20;
  cfg.decode_activations = kernels::ActivationPrecision::kFloat32;
  cfg.lm_head_activations = kernels::ActivationPrecision::kFloat32;
  cfg.comm = comm;
  auto engine = Engine::Create(std::move(*model), cfg);
  // One rank failing to build its shard must not leave the others in a collective.
  absl::Status agreed = comm ? AgreeOnStatus(*comm, engine.status()) : engine.status();
  if (!agreed.ok()) return agreed;
  Engine& e = **engine;
  const SequenceId seq = e.NewSequence();
  Generation run;
  std::vector<float> logits;
  if (absl::Status s = e.Forward(seq, prompt, false, &logits); !s.ok()) return s;
  for (int step = 0;; ++step) {
    run.logits.push_back(logits);
    run.tokens.push_back(Argmax(logits));
    if (step == kDecodeSteps) break;
    logits.clear();
    if (absl::Status s = e.Forward(seq, {&run.tokens.back(), 1}, false, &logits); !s.ok()) {
      return s;
    }
  }
  return run;
}

uint64_t Fnv1a(const std::vector<std::vector<float>>& rows) {
  uint64_t h = 1469598103934665603ull;
  for (const auto& row : rows) {
    const auto* p = reinterpret_cast<const unsigned char*>(row.data());
    for (size_t i = 0; i < row.size() * sizeof(float); ++i) h = (h ^ p[i]) * 1099511628211ull;
  }
  return h;
}

struct Case {
  std::string kv;
  float max_abs_diff;
};

class TpLogitsTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    // The same filesystem on every rank: all skip together.
    if (!std::filesystem::exists(testing::DefaultModelPath())) {
      GTEST_SKIP() << "default model not in the cache (" << testing::DefaultModelPath() << ")";
    }
    ASSERT_GT(LauncherWorldSize(), 1) << "run under mpirun -np N (ctest does)";
  }
};

TEST_P(TpLogitsTest, ShardedLogitsMatchTheWholeModel) {
  Communicator& comm = Comm();
  auto model = GgufModel::Open(testing::DefaultModelPath().string());
  ASSERT_TRUE(model.ok()) << model.status();
  auto tok = Tokenizer::FromGguf((*model)->gguf());
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto prompt = (*tok)->Encode(kPrompt, {.add_special = true});
  ASSERT_TRUE(prompt.ok()) << prompt.status();

  const Case& c = GetParam();
  absl::StatusOr<Generation> sharded = Generate(c.kv, &comm, *prompt);
  ASSERT_TRUE(sharded.ok()) << sharded.status();
  // The whole-model reference runs on rank 0 only (the ranks share few cores) and is
  // broadcast: logits rows, then the tokens.
  Generation whole;
  absl::Status ref = absl::OkStatus();
  if (comm.rank() == 0) {
    absl::StatusOr<Generation> g = Generate(c.kv, nullptr, *prompt);
    if (g.ok()) whole = std::move(*g);
    ref = g.status();
  }
  ASSERT_TRUE(AgreeOnStatus(comm, ref).ok()) << ref;
  whole.logits.resize(sharded->logits.size());
  whole.tokens.resize(sharded->tokens.size());
  for (auto& row : whole.logits) {
    row.resize(sharded->logits[0].size());
    ASSERT_TRUE(comm.Broadcast(row.data(), row.size() * sizeof(float), 0).ok());
  }
  ASSERT_TRUE(comm.Broadcast(whole.tokens.data(), whole.tokens.size() * sizeof(int32_t), 0).ok());

  // Ranks hold bit-identical logits (they sample from them independently).
  const uint64_t mine = Fnv1a(sharded->logits);
  std::vector<uint64_t> all(comm.size());
  ASSERT_TRUE(comm.AllGather(&mine, sizeof(mine), all.data()).ok());
  for (int r = 0; r < comm.size(); ++r) EXPECT_EQ(all[r], mine) << "rank " << r << " differs";

  EXPECT_EQ(sharded->tokens, whole.tokens);
  float max_diff = 0, max_logit = 0;
  for (size_t s = 0; s < whole.logits.size(); ++s) {
    for (size_t i = 0; i < whole.logits[s].size(); ++i) {
      max_diff = std::max(max_diff, std::abs(sharded->logits[s][i] - whole.logits[s][i]));
      max_logit = std::max(max_logit, std::abs(whole.logits[s][i]));
    }
  }
  EXPECT_LE(max_diff, c.max_abs_diff);
  if (comm.rank() == 0) {
    auto text = (*tok)->Decode(whole.tokens);
    std::printf(
        "[tp %d, kv %s] max |logit diff| %.3g (max |logit| %.1f) over %zu steps; "
        "greedy: \"%s\"\n",
        comm.size(), c.kv.c_str(), max_diff, max_logit, whole.logits.size(),
        text.ok() ? text->c_str() : "?");
  }
}

INSTANTIATE_TEST_SUITE_P(Kv, TpLogitsTest,
                         ::testing::Values(Case{"fp32", 1e-4f}, Case{"fp16", 2e-2f},
                                           Case{"int4-comp", 0.2f}),
                         [](const auto& info) {
                           std::string n = info.param.kv;
                           std::replace(n.begin(), n.end(), '-', '_');
                           return n;
                         });

}  // namespace
}  // namespace quantkv
