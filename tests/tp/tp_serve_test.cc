// Serving under tensor parallelism, run by mpirun with 2 and 3 ranks: rank 0 runs the engine
// loop over a TensorParallelExecutor, the other ranks a WorkerServer, as
// `mpirun -np N quantkv serve --tp N` does. Checked on rank 0:
//  - scores (teacher-forced log-likelihoods) equal a one-process engine's within the TP
//    rounding tolerance of tp_logits_test, and greedy output equals it;
//  - a request's greedy output does not change when 7 others run beside it (batching
//    invariance holds across ranks: every rank batches the same steps);
//  - Stats has one entry per rank with its steps and time in collectives;
//  - a worker refuses calls without the job's token, reports its sequences, and stops when
//    the loop shuts down.
#include <filesystem>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "quantkv/v1/worker.grpc.pb.h"
#include "runtime/comm/communicator.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gguf_model.h"
#include "runtime/serve/engine_loop.h"
#include "runtime/serve/tensor_parallel_executor.h"
#include "runtime/serve/worker_rendezvous.h"
#include "runtime/serve/worker_server.h"
#include "tests/testutil/drain_stream.h"
#include "tests/testutil/paths.h"
#include "tests/tp/test_comm.h"

namespace quantkv {
namespace {

using testing::Drain;
using testing::TestComm;

constexpr int kMaxTokens = 12;

// As `quantkv serve` runs (per-row matmuls, the tiled attention kernel), with fp32
// activations so a sharded sum differs from the whole one only by rounding order.
EngineConfig ServeConfig(Communicator* comm) {
  EngineConfig cfg;
  cfg.threads = 1;  // the ranks share the machine's cores
  cfg.kv_spec = "int4-comp";
  cfg.kv_max_bytes = int64_t{16} << 20;
  cfg.max_chunk_tokens = 64;
  cfg.gemm_min_rows = std::numeric_limits<int64_t>::max();
  cfg.fused_decode_attention = false;
  cfg.decode_activations = kernels::ActivationPrecision::kFloat32;
  cfg.lm_head_activations = kernels::ActivationPrecision::kFloat32;
  cfg.comm = comm;
  return cfg;
}

const EngineLoopConfig kLoopConfig{
    .max_running = 8, .max_queued = 32, .max_step_tokens = 64, .kv_preset = "int4-comp"};

std::vector<std::vector<int32_t>> Prompts(const Tokenizer& tok) {
  std::vector<std::vector<int32_t>> out;
  for (const char* text :
       {"The capital of France is", "Once upon a time, in a small village,",
        "def fibonacci(n):", "The three primary colors are", "Water boils at",
        "In 1969, the first humans", "The quick brown fox", "My favourite recipe for bread"}) {
    out.push_back(*tok.Encode(text, {.add_special = true, .parse_special = false}));
  }
  return out;
}

GenerationParams Greedy(const std::vector<int32_t>& prompt) {
  GenerationParams g;
  g.prompt = prompt;
  g.max_tokens = kMaxTokens;
  g.ignore_eos = true;
  return g;
}

GenerationParams Scoring(const std::vector<int32_t>& prompt) {
  GenerationParams g;
  g.prompt = prompt;
  g.score = true;
  return g;
}

struct Outputs {
  std::vector<std::vector<int32_t>> alone;  // each prompt on its own
  std::vector<double> scores;               // score of each prompt
};

Outputs RunRequests(EngineLoop& loop, const std::vector<std::vector<int32_t>>& prompts) {
  Outputs out;
  for (const auto& p : prompts) {
    auto stream = loop.Submit(Greedy(p));
    EXPECT_TRUE(stream.ok()) << stream.status();
    GenerationFinal f;
    out.alone.push_back(stream.ok() ? Drain(**stream, &f) : std::vector<int32_t>{});
    auto scored = loop.Submit(Scoring(p));
    EXPECT_TRUE(scored.ok()) << scored.status();
    if (scored.ok()) Drain(**scored, &f);
    out.scores.push_back(f.total_logprob);
  }
  return out;
}

class TpServeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(testing::DefaultModelPath())) {
      GTEST_SKIP() << "default model not in the cache (" << testing::DefaultModelPath() << ")";
    }
    ASSERT_GT(LauncherWorldSize(), 1) << "run under mpirun -np N (ctest does)";
  }
};

TEST_F(TpServeTest, ServesAcrossRanksLikeOneProcess) {
  Communicator& comm = TestComm();
  auto model = GgufModel::Open(testing::DefaultModelPath().string());
  ASSERT_TRUE(model.ok()) << model.status();
  auto tok = Tokenizer::FromGguf((*model)->gguf());
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto engine = Engine::Create(std::move(*model), ServeConfig(&comm));
  ASSERT_TRUE(AgreeOnStatus(comm, engine.status()).ok()) << engine.status();
  auto token = ShareWorkerToken(comm);
  ASSERT_TRUE(token.ok()) << token.status();

  if (comm.rank() != 0) {
    WorkerServerOptions options;
    options.token = *token;
    options.rank = comm.rank();
    options.world_size = comm.size();
    options.on_desync = [&comm](const absl::Status& s) {
      ADD_FAILURE() << s;
      comm.Abort(1);
    };
    auto server = WorkerServer::Start(engine->get(), options);
    ASSERT_TRUE(AgreeOnStatus(comm, server.status()).ok()) << server.status();
    ASSERT_TRUE(GatherWorkerAddresses(comm, (*server)->address()).ok());
    EXPECT_TRUE((*server)->WaitForShutdown(absl::Now() + absl::Minutes(3)))
        << "rank 0 never called Shutdown";
    return;
  }

  ASSERT_TRUE(AgreeOnStatus(comm, absl::OkStatus()).ok());
  auto addresses = GatherWorkerAddresses(comm, "");
  ASSERT_TRUE(addresses.ok()) << addresses.status();
  ASSERT_EQ(addresses->size(), static_cast<size_t>(comm.size() - 1));

  // A caller without the token is refused; with it, Info names the rank.
  {
    auto channel = grpc::CreateChannel((*addresses)[0], grpc::InsecureChannelCredentials());
    auto stub = v1::Worker::NewStub(channel);
    grpc::ClientContext bad;
    bad.AddMetadata(kWorkerTokenMetadata, "wrong-token");
    v1::WorkerInfoResponse info;
    EXPECT_EQ(stub->Info(&bad, v1::WorkerInfoRequest(), &info).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    grpc::ClientContext none;
    v1::WorkerHealthResponse health;
    EXPECT_EQ(stub->Health(&none, v1::WorkerHealthRequest(), &health).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    grpc::ClientContext good;
    good.AddMetadata(kWorkerTokenMetadata, *token);
    ASSERT_TRUE(stub->Info(&good, v1::WorkerInfoRequest(), &info).ok());
    EXPECT_EQ(info.rank(), 1);
    EXPECT_EQ(info.world_size(), comm.size());
    EXPECT_GT(info.kv_head_end(), info.kv_head_begin());
  }

  // A wrong token in the executor's config fails at Create with the worker named.
  {
    auto other = GgufModel::Open(testing::DefaultModelPath().string());
    ASSERT_TRUE(other.ok());
    EngineConfig cfg = ServeConfig(nullptr);
    auto whole = Engine::Create(std::move(*other), cfg);
    ASSERT_TRUE(whole.ok());
    auto refused = TensorParallelExecutor::Create(
        std::move(*whole), {.worker_addresses = *addresses, .token = *token});
    EXPECT_FALSE(refused.ok()) << "a one-rank engine cannot coordinate workers";
  }

  auto executor = TensorParallelExecutor::Create(std::move(*engine),
                                                 {.worker_addresses = *addresses, .token = *token});
  ASSERT_TRUE(executor.ok()) << executor.status();
  auto loop = EngineLoop::Create(std::move(*executor), tok->get(), kLoopConfig);
  ASSERT_TRUE(loop.ok()) << loop.status();
  EXPECT_EQ((*loop)->tp_degree(), comm.size());

  const auto prompts = Prompts(**tok);
  const Outputs tp = RunRequests(**loop, {prompts.begin(), prompts.begin() + 3});

  // All eight at once: the first three must come out as they did alone.
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (const auto& p : prompts) {
    auto s = (*loop)->Submit(Greedy(p));
    ASSERT_TRUE(s.ok()) << s.status();
    streams.push_back(*s);
  }
  for (size_t i = 0; i < streams.size(); ++i) {
    GenerationFinal f;
    const std::vector<int32_t> ids = Drain(*streams[i], &f);
    EXPECT_EQ(static_cast<int64_t>(ids.size()), kMaxTokens) << "request " << i;
    if (i < tp.alone.size()) {
      EXPECT_EQ(ids, tp.alone[i]) << "request " << i << " batched";
    }
  }

  const EngineLoopStats st = (*loop)->Stats();
  ASSERT_EQ(st.ranks.size(), static_cast<size_t>(comm.size()));
  for (int r = 0; r < comm.size(); ++r) {
    EXPECT_EQ(st.ranks[r].rank, r);
    EXPECT_GT(st.ranks[r].steps, 0) << "rank " << r;
    EXPECT_EQ(st.ranks[r].steps, st.ranks[0].steps) << "rank " << r << " skipped steps";
    EXPECT_GT(st.ranks[r].comm_ns, 0) << "rank " << r << " spent no time in collectives";
    EXPECT_LE(st.ranks[r].comm_ns, st.ranks[r].forward_ns);
  }
  (*loop)->Shutdown();  // the workers stop here

  // The same requests on one process with the whole model.
  auto whole_model = GgufModel::Open(testing::DefaultModelPath().string());
  ASSERT_TRUE(whole_model.ok());
  auto whole = Engine::Create(std::move(*whole_model), ServeConfig(nullptr));
  ASSERT_TRUE(whole.ok()) << whole.status();
  auto one = EngineLoop::Create(std::move(*whole), tok->get(), kLoopConfig);
  ASSERT_TRUE(one.ok()) << one.status();
  const Outputs ref = RunRequests(**one, {prompts.begin(), prompts.begin() + 3});
  for (size_t i = 0; i < ref.alone.size(); ++i) {
    EXPECT_EQ(tp.alone[i], ref.alone[i]) << "prompt " << i << ": --tp greedy output differs";
    // tp_logits_test bounds a logit's TP rounding at ~1e-4; a score sums ~10 log-softmaxes.
    EXPECT_NEAR(tp.scores[i], ref.scores[i], 2e-3) << "prompt " << i;
    EXPECT_LT(ref.scores[i], 0);
  }
}

}  // namespace
}  // namespace quantkv
