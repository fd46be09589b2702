// The gRPC generation server in-process over SmolLM2-135M: streamed greedy output equals
// the engine's own, batching does not change it, the unary calls answer, cancellation and
// Abort free KV blocks, validation names the field, the API key is enforced, and a full
// queue refuses with RESOURCE_EXHAUSTED and recovers.
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <limits>
#include <numeric>
#include <random>
#include <thread>

#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "quantkv/v1/generation.grpc.pb.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gguf_model.h"
#include "runtime/model/moe_split.h"
#include "runtime/serve/engine_loop.h"
#include "runtime/serve/generation_server.h"
#include "tests/testutil/drain_stream.h"
#include "tests/testutil/paths.h"

namespace quantkv {
namespace {

constexpr char kApiKey[] = "test-key-123";
constexpr char kPrompt[] = "The capital of France is";
constexpr int kMaxTokens = 16;
// Long enough to still be running when the test cancels it.
constexpr int kLong = 1000;

// Per-row matmuls and the tiled attention kernel everywhere, as `quantkv serve` runs by
// default (without --prefill-gemm / --fused-decode-attention).
EngineConfig ServingEngineConfig() {
  EngineConfig cfg;
  cfg.threads = 2;
  cfg.kv_spec = "fp16";
  cfg.kv_max_bytes = int64_t{64} << 20;
  cfg.max_chunk_tokens = 128;
  cfg.gemm_min_rows = std::numeric_limits<int64_t>::max();
  cfg.fused_decode_attention = false;
  return cfg;
}

absl::StatusOr<std::unique_ptr<Engine>> MakeEngine(const EngineConfig& cfg) {
  auto model = GgufModel::Open(testing::DefaultModelPath().string());
  if (!model.ok()) return model.status();
  return Engine::Create(std::move(*model), cfg);
}

struct Collected {
  std::vector<int32_t> ids;
  std::string text;
  v1::GenerateFinal final;
  bool got_final = false;
  grpc::Status status;
};

class GenerationServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const auto path = testing::DefaultModelPath();
    if (!std::filesystem::exists(path)) return;
    auto model = GgufModel::Open(path.string());
    ASSERT_TRUE(model.ok()) << model.status();
    auto tok = Tokenizer::FromGguf((*model)->gguf());
    ASSERT_TRUE(tok.ok()) << tok.status();
    tokenizer_ = std::move(*tok).release();
    auto engine = Engine::Create(std::move(*model), ServingEngineConfig());
    ASSERT_TRUE(engine.ok()) << engine.status();
    auto loop = EngineLoop::Create(
        std::move(*engine), tokenizer_,
        {.max_running = 12, .max_queued = 64, .max_step_tokens = 128, .kv_preset = "fp16"});
    ASSERT_TRUE(loop.ok()) << loop.status();
    loop_ = std::move(*loop).release();
    GenerationServerOptions options;
    options.listen = "127.0.0.1:0";  // a free port
    options.api_key = kApiKey;
    options.model_path = path.string();
    auto server = GenerationServer::Start(loop_, options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server).release();
  }

  static void TearDownTestSuite() {
    if (server_ != nullptr) server_->Shutdown(absl::Seconds(2));
    delete server_;
    delete loop_;
    delete tokenizer_;
    server_ = nullptr;
    loop_ = nullptr;
    tokenizer_ = nullptr;
  }

  void SetUp() override {
    if (server_ == nullptr) {
      GTEST_SKIP() << "default model not in the cache (" << testing::DefaultModelPath()
                   << "); run `quantkv fetch-model` or scripts/setup.sh";
    }
    stub_ = v1::Generation::NewStub(
        grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials()));
  }

  // A server of the test's own over a fresh engine, on a free loopback port.
  struct OwnServer {
    std::unique_ptr<EngineLoop> loop;
    std::unique_ptr<GenerationServer> server;
    std::unique_ptr<v1::Generation::Stub> stub;
  };
  static void StartOwnServer(const EngineConfig& engine_config, const EngineLoopConfig& loop_config,
                             OwnServer* out) {
    auto engine = MakeEngine(engine_config);
    ASSERT_TRUE(engine.ok()) << engine.status();
    auto loop = EngineLoop::Create(std::move(*engine), tokenizer_, loop_config);
    ASSERT_TRUE(loop.ok()) << loop.status();
    out->loop = std::move(*loop);
    GenerationServerOptions options;
    options.listen = "127.0.0.1:0";
    options.api_key = kApiKey;
    auto server = GenerationServer::Start(out->loop.get(), options);
    ASSERT_TRUE(server.ok()) << server.status();
    out->server = std::move(*server);
    out->stub = v1::Generation::NewStub(
        grpc::CreateChannel(out->server->address(), grpc::InsecureChannelCredentials()));
  }

  static void Authorize(grpc::ClientContext& c) {
    c.AddMetadata("authorization", std::string("Bearer ") + kApiKey);
    c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  }

  static v1::GenerateRequest Greedy(const std::string& prompt, int max_tokens = kMaxTokens) {
    v1::GenerateRequest r;
    r.set_text(prompt);
    r.set_max_tokens(max_tokens);
    r.set_ignore_eos(true);  // fixed length, so runs compare token for token
    return r;
  }

  // On the suite's server unless `stub` names another.
  Collected Run(const v1::GenerateRequest& req, v1::Generation::Stub* stub = nullptr) {
    Collected out;
    grpc::ClientContext c;
    Authorize(c);
    auto reader = (stub != nullptr ? stub : stub_.get())->Generate(&c, req);
    v1::GenerateResponse resp;
    while (reader->Read(&resp)) {
      if (resp.has_chunk()) {
        out.ids.insert(out.ids.end(), resp.chunk().token_ids().begin(),
                       resp.chunk().token_ids().end());
        out.text += resp.chunk().text();
      } else if (resp.has_final()) {
        out.final = resp.final();
        out.got_final = true;
      }
    }
    out.status = reader->Finish();
    return out;
  }

  v1::StatsResponse GetStats(v1::Generation::Stub* stub = nullptr) {
    grpc::ClientContext c;
    Authorize(c);
    v1::StatsResponse resp;
    EXPECT_TRUE((stub != nullptr ? stub : stub_.get())->Stats(&c, v1::StatsRequest(), &resp).ok());
    return resp;
  }

  // Waits until nothing runs or waits and no KV block is held.
  bool WaitIdle(v1::Generation::Stub* stub = nullptr) {
    for (int i = 0; i < 250; ++i) {
      const v1::StatsResponse s = GetStats(stub);
      if (s.running() == 0 && s.queued() == 0 && s.kv_blocks_used() == 0) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }

  static Tokenizer* tokenizer_;
  static EngineLoop* loop_;
  static GenerationServer* server_;
  std::unique_ptr<v1::Generation::Stub> stub_;
};

Tokenizer* GenerationServerTest::tokenizer_ = nullptr;
EngineLoop* GenerationServerTest::loop_ = nullptr;
GenerationServer* GenerationServerTest::server_ = nullptr;

TEST_F(GenerationServerTest, StreamedGreedyEqualsEngineGreedy) {
  const Collected got = Run(Greedy(kPrompt));
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  ASSERT_TRUE(got.got_final);
  EXPECT_EQ(got.final.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(got.final.generated_tokens(), kMaxTokens);
  EXPECT_GT(got.final.kv_bits_per_element(), 0);

  // The same greedy loop directly on an engine of the same configuration.
  auto engine = MakeEngine(ServingEngineConfig());
  ASSERT_TRUE(engine.ok()) << engine.status();
  auto prompt = tokenizer_->Encode(kPrompt, {.add_special = true});
  ASSERT_TRUE(prompt.ok());
  EXPECT_EQ(got.final.prompt_tokens(), static_cast<int32_t>(prompt->size()));
  const SequenceId seq = (*engine)->NewSequence();
  std::vector<float> logits;
  ASSERT_TRUE((*engine)->Forward(seq, *prompt, false, &logits).ok());
  Sampler greedy(SamplingParams{});
  std::vector<int32_t> history = *prompt, want;
  for (int i = 0; i < kMaxTokens; ++i) {
    const int32_t next = greedy.Sample(logits, history);
    want.push_back(next);
    history.push_back(next);
    logits.clear();
    ASSERT_TRUE((*engine)->Forward(seq, {&next, 1}, false, &logits).ok());
  }
  EXPECT_EQ(got.ids, want);
  auto text = tokenizer_->Decode(want, {.skip_special = true});
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(got.text, *text);
}

TEST_F(GenerationServerTest, BatchingDoesNotChangeGreedyOutput) {
  const Collected alone = Run(Greedy(kPrompt));
  ASSERT_TRUE(alone.status.ok()) << alone.status.error_message();
  ASSERT_EQ(alone.ids.size(), static_cast<size_t>(kMaxTokens));

  const std::vector<std::string> others = {
      "Once upon a time",  "def fibonacci(n):", "The quick brown fox",    "1, 2, 3, 4,",
      "In 1492, Columbus", "Water boils at",    "My favourite colour is", "Dear Sir or Madam,"};
  std::vector<Collected> other_out(others.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < others.size(); ++i) {
    threads.emplace_back([&, i] {
      v1::GenerateRequest r = Greedy(others[i], kMaxTokens + static_cast<int>(i));
      if (i % 2 == 1) {  // sampled neighbours too: they must not disturb the greedy one
        r.mutable_sampling()->set_temperature(0.8f);
        r.mutable_sampling()->set_seed(i);
      }
      auto stub = v1::Generation::NewStub(
          grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials()));
      grpc::ClientContext c;
      Authorize(c);
      auto reader = stub->Generate(&c, r);
      v1::GenerateResponse resp;
      while (reader->Read(&resp)) {
        if (resp.has_chunk()) {
          other_out[i].ids.insert(other_out[i].ids.end(), resp.chunk().token_ids().begin(),
                                  resp.chunk().token_ids().end());
        }
      }
      other_out[i].status = reader->Finish();
    });
  }
  // Start once the others are in, so the request is admitted among running sequences.
  for (int i = 0; i < 500 && GetStats().running() < 4; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  const Collected batched = Run(Greedy(kPrompt));
  const int64_t generated_before = GetStats().generated_tokens();
  for (std::thread& t : threads) t.join();
  ASSERT_TRUE(batched.status.ok()) << batched.status.error_message();
  EXPECT_EQ(batched.ids, alone.ids);
  EXPECT_EQ(batched.text, alone.text);
  for (size_t i = 0; i < others.size(); ++i) {
    EXPECT_TRUE(other_out[i].status.ok()) << other_out[i].status.error_message();
    EXPECT_EQ(other_out[i].ids.size(), kMaxTokens + i);
  }
  // The neighbours were still generating while the request ran, i.e. they shared steps.
  EXPECT_LT(generated_before, GetStats().generated_tokens());
  EXPECT_TRUE(WaitIdle());
}

using testing::Drain;

// A KV pool too small for all requests at once: the scheduler preempts, the loop releases
// and later re-prefills prompt + generated ids, and greedy output stays the same.
TEST_F(GenerationServerTest, PreemptedRequestsRecomputeTheSameTokens) {
  EngineConfig cfg = ServingEngineConfig();
  cfg.kv_max_bytes = int64_t{4} << 20;  // 5 blocks of 32 tokens
  auto engine = MakeEngine(cfg);
  ASSERT_TRUE(engine.ok()) << engine.status();
  auto loop = EngineLoop::Create(
      std::move(*engine), tokenizer_,
      {.max_running = 8, .max_queued = 8, .max_step_tokens = 64, .kv_preset = "fp16"});
  ASSERT_TRUE(loop.ok()) << loop.status();
  const std::vector<std::string> prompts = {kPrompt, "Once upon a time", "The quick brown fox",
                                            "Water boils at"};
  constexpr int kTokens = 40;
  auto params = [&](const std::string& text) {
    GenerationParams p;
    p.prompt = *tokenizer_->Encode(text, {.add_special = true});
    p.max_tokens = kTokens;
    p.ignore_eos = true;
    return p;
  };
  ASSERT_LT((*loop)->capacity_tokens(), static_cast<int64_t>(prompts.size()) * (kTokens + 4));
  std::vector<std::vector<int32_t>> alone;
  for (const std::string& text : prompts) {
    auto stream = (*loop)->Submit(params(text));
    ASSERT_TRUE(stream.ok()) << stream.status();
    GenerationFinal f;
    alone.push_back(Drain(**stream, &f));
    EXPECT_EQ(f.preemptions, 0);
  }
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (const std::string& text : prompts) {
    auto stream = (*loop)->Submit(params(text));
    ASSERT_TRUE(stream.ok()) << stream.status();
    streams.push_back(*stream);
  }
  int64_t preemptions = 0;
  for (size_t i = 0; i < streams.size(); ++i) {
    GenerationFinal f;
    EXPECT_EQ(Drain(*streams[i], &f), alone[i]) << "request " << i;
    EXPECT_EQ(f.reason, FinishReason::kLength);
    preemptions += f.preemptions;
  }
  EXPECT_GT(preemptions, 0);
  EXPECT_EQ((*loop)->Stats().scheduler.preemptions, preemptions);
  (*loop)->Shutdown();
}

TEST_F(GenerationServerTest, TokenizeModelInfoStats) {
  {
    grpc::ClientContext c;
    Authorize(c);
    v1::TokenizeRequest req;
    req.set_text(kPrompt);
    v1::TokenizeResponse resp;
    ASSERT_TRUE(stub_->Tokenize(&c, req, &resp).ok());
    auto want = tokenizer_->Encode(kPrompt, {.add_special = true});
    ASSERT_TRUE(want.ok());
    EXPECT_EQ(std::vector<int32_t>(resp.ids().begin(), resp.ids().end()), *want);
  }
  {
    grpc::ClientContext c;
    Authorize(c);
    v1::ModelInfoResponse info;
    ASSERT_TRUE(stub_->ModelInfo(&c, v1::ModelInfoRequest(), &info).ok());
    EXPECT_EQ(info.architecture(), "llama");
    EXPECT_EQ(info.context_length(), loop_->model_config().context_length);
    EXPECT_EQ(info.tp_degree(), 1);
    ASSERT_EQ(info.kv_presets_size(), 1);
    EXPECT_EQ(info.kv_presets(0), "fp16");
    EXPECT_EQ(info.block_tokens(), loop_->block_tokens());
    EXPECT_GT(info.capacity_tokens(), 0);
    EXPECT_EQ(info.capacity_tokens() % info.block_tokens(), 0);
  }
  ASSERT_TRUE(WaitIdle());
  const v1::StatsResponse s = GetStats();
  EXPECT_EQ(s.kv_blocks_used() + s.kv_blocks_free(), loop_->n_blocks());
  EXPECT_GT(s.kv_bytes_per_token(), 0);
}

TEST_F(GenerationServerTest, ScoreMatchesTeacherForcing) {
  grpc::ClientContext c;
  Authorize(c);
  v1::ScoreRequest req;
  req.set_text("The capital of France is Paris.");
  v1::ScoreResponse resp;
  ASSERT_TRUE(stub_->Score(&c, req, &resp).ok());
  auto ids = tokenizer_->Encode(req.text(), {.add_special = true});
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(resp.token_count(), static_cast<int64_t>(ids->size()) - 1);
  EXPECT_LT(resp.total_logprob(), 0);
  EXPECT_GT(resp.perplexity(), 1);
  EXPECT_NEAR(resp.perplexity(), std::exp(-resp.total_logprob() / resp.token_count()), 1e-6);
  EXPECT_TRUE(WaitIdle());
}

TEST_F(GenerationServerTest, CancelledStreamFreesItsBlocks) {
  ASSERT_TRUE(WaitIdle());
  grpc::ClientContext c;
  Authorize(c);
  auto reader = stub_->Generate(&c, Greedy(kPrompt, kLong));
  v1::GenerateResponse resp;
  ASSERT_TRUE(reader->Read(&resp));  // it is running
  // Stats are published after each step, so the first chunk may arrive just before them.
  int64_t used = 0;
  for (int i = 0; i < 100 && (used = GetStats().kv_blocks_used()) == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_GT(used, 0);
  c.TryCancel();
  while (reader->Read(&resp)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(WaitIdle()) << "blocks still used: " << GetStats().kv_blocks_used();
}

TEST_F(GenerationServerTest, AbortEndsTheStream) {
  ASSERT_TRUE(WaitIdle());
  grpc::ClientContext c;
  Authorize(c);
  v1::GenerateRequest req = Greedy(kPrompt, kLong);
  req.set_request_id("abort-me");
  auto reader = stub_->Generate(&c, req);
  v1::GenerateResponse resp;
  ASSERT_TRUE(reader->Read(&resp));
  EXPECT_EQ(resp.request_id(), "abort-me");
  {
    grpc::ClientContext ac;
    Authorize(ac);
    v1::AbortRequest areq;
    areq.set_request_id("abort-me");
    v1::AbortResponse aresp;
    ASSERT_TRUE(stub_->Abort(&ac, areq, &aresp).ok());
    EXPECT_TRUE(aresp.found());
  }
  bool got_final = false;
  while (reader->Read(&resp)) {
    if (resp.has_final()) {
      got_final = true;
      EXPECT_EQ(resp.final().finish_reason(), v1::FINISH_REASON_ABORT);
      EXPECT_LT(resp.final().generated_tokens(), kLong);
    }
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_TRUE(got_final);
  EXPECT_TRUE(WaitIdle());
}

// The stop `quantkv serve --tp N` makes when a rank is lost (a signal while the loop thread
// may be stuck in a collective): every stream, running or queued, ends at once with the
// given error, from the calling thread, and new calls are refused.
TEST_F(GenerationServerTest, FailAllNowEndsEveryStreamWithTheError) {
  OwnServer own;
  ASSERT_NO_FATAL_FAILURE(StartOwnServer(
      ServingEngineConfig(),
      {.max_running = 1, .max_queued = 8, .max_step_tokens = 64, .kv_preset = "fp16"}, &own));
  grpc::ClientContext running_ctx, queued_ctx;
  Authorize(running_ctx);
  Authorize(queued_ctx);
  auto running = own.stub->Generate(&running_ctx, Greedy(kPrompt, kLong));
  v1::GenerateResponse resp;
  ASSERT_TRUE(running->Read(&resp));  // it runs; with max_running 1 the next one queues
  auto queued = own.stub->Generate(&queued_ctx, Greedy(kPrompt, kLong));
  for (int i = 0; i < 100 && GetStats(own.stub.get()).queued() == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_EQ(GetStats(own.stub.get()).queued(), 1);

  own.loop->FailAllNow(absl::UnavailableError("worker rank 1 is gone"));
  for (auto* reader : {running.get(), queued.get()}) {
    bool final_seen = false;
    while (reader->Read(&resp)) final_seen = final_seen || resp.has_final();
    const grpc::Status st = reader->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_EQ(st.error_message(), "worker rank 1 is gone");
    EXPECT_FALSE(final_seen) << "a final event after the error";
  }
  const Collected late = Run(Greedy(kPrompt, 4), own.stub.get());
  EXPECT_EQ(late.status.error_code(), grpc::StatusCode::UNAVAILABLE) << late.status.error_message();
  own.server->Shutdown(absl::Seconds(2));
  own.loop->Shutdown();
}

TEST_F(GenerationServerTest, StopStringEndsGeneration) {
  const Collected full = Run(Greedy(kPrompt));
  ASSERT_TRUE(full.status.ok());
  ASSERT_GE(full.text.size(), 6u);
  // Stop at a piece of the greedy text: output is what came before it.
  const std::string stop = full.text.substr(3, 3);
  v1::GenerateRequest req = Greedy(kPrompt);
  req.add_stop(stop);
  const Collected got = Run(req);
  ASSERT_TRUE(got.status.ok());
  EXPECT_EQ(got.final.finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(got.text, full.text.substr(0, full.text.find(stop)));
}

TEST_F(GenerationServerTest, InvalidArgumentsNameTheField) {
  auto expect_invalid = [&](const v1::GenerateRequest& req, const std::string& field) {
    const Collected got = Run(req);
    EXPECT_EQ(got.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << field << ": " << got.status.error_message();
    EXPECT_NE(got.status.error_message().find(field), std::string::npos)
        << got.status.error_message() << " does not name " << field;
  };
  v1::GenerateRequest r = Greedy("");
  expect_invalid(r, "GenerateRequest.text");
  r.clear_text();
  expect_invalid(r, "GenerateRequest.prompt");
  r = Greedy(kPrompt, 0);
  expect_invalid(r, "GenerateRequest.max_tokens");
  const int ctx = static_cast<int>(loop_->model_config().context_length);
  r = Greedy(kPrompt, ctx + 1);
  expect_invalid(r, "GenerateRequest.max_tokens");
  r = Greedy(kPrompt);
  r.mutable_tokens()->mutable_ids()->Resize(ctx - 2, 42);  // + 16 new tokens > the context
  expect_invalid(r, "GenerateRequest.prompt");
  r = Greedy(kPrompt);
  r.mutable_sampling()->set_temperature(-0.5f);
  expect_invalid(r, "temperature");
  r = Greedy(kPrompt);
  r.mutable_sampling()->set_top_p(1.5f);
  expect_invalid(r, "top_p");
  r = Greedy(kPrompt);
  r.set_kv_preset("int2-comp");
  expect_invalid(r, "GenerateRequest.kv_preset");
  r = Greedy("caf\xc3");  // truncated UTF-8
  expect_invalid(r, "GenerateRequest.text");

  // A message over the receive limit is refused by gRPC before it is parsed.
  r = Greedy(std::string(kMaxRequestBytes + 1024, 'a'));
  EXPECT_EQ(Run(r).status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_TRUE(WaitIdle());
}

// A server of its own with one running slot and one queue slot: a long request runs, a
// second waits, and the third is refused at once with RESOURCE_EXHAUSTED naming the queue
// (not accepted and left hanging). Ending the two frees every block, and the server then
// serves a new request normally.
TEST_F(GenerationServerTest, FullQueueRefusesThenRecovers) {
  OwnServer own;
  ASSERT_NO_FATAL_FAILURE(StartOwnServer(
      ServingEngineConfig(),
      {.max_running = 1, .max_queued = 1, .max_step_tokens = 128, .kv_preset = "fp16"}, &own));
  std::unique_ptr<EngineLoop>* loop = &own.loop;
  std::unique_ptr<GenerationServer>* server = &own.server;
  std::unique_ptr<v1::Generation::Stub>& stub = own.stub;

  grpc::ClientContext running_ctx;
  Authorize(running_ctx);
  v1::GenerateRequest req = Greedy(kPrompt, kLong);
  req.set_request_id("running");
  auto running = stub->Generate(&running_ctx, req);
  v1::GenerateResponse resp;
  ASSERT_TRUE(running->Read(&resp));  // its first token: it holds the one running slot

  grpc::ClientContext queued_ctx;
  Authorize(queued_ctx);
  req.set_request_id("queued");
  auto queued = stub->Generate(&queued_ctx, req);
  // Stats count it once the loop thread has handed it to the scheduler.
  v1::StatsResponse s;
  for (int i = 0; i < 250 && (s = GetStats(stub.get())).queued() < 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_EQ(s.running(), 1);
  ASSERT_EQ(s.queued(), 1);
  EXPECT_GT(s.kv_blocks_used(), 0);
  EXPECT_EQ(s.kv_blocks_used() + s.kv_blocks_free(), (*loop)->n_blocks());

  const Collected refused = Run(Greedy(kPrompt, 4), stub.get());
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << refused.status.error_message();
  EXPECT_NE(refused.status.error_message().find("queue is full"), std::string::npos)
      << refused.status.error_message();
  EXPECT_NE(refused.status.error_message().find("max_queued=1"), std::string::npos)
      << refused.status.error_message();
  EXPECT_TRUE(refused.ids.empty());
  EXPECT_FALSE(refused.got_final);

  // Abort the waiting one by id, cancel the running one from the client.
  {
    grpc::ClientContext c;
    Authorize(c);
    v1::AbortRequest areq;
    areq.set_request_id("queued");
    v1::AbortResponse aresp;
    ASSERT_TRUE(stub->Abort(&c, areq, &aresp).ok());
    EXPECT_TRUE(aresp.found());
  }
  bool queued_final = false;
  while (queued->Read(&resp)) {
    EXPECT_FALSE(resp.has_chunk()) << "a queued request generated";
    if (resp.has_final()) {
      queued_final = true;
      EXPECT_EQ(resp.final().finish_reason(), v1::FINISH_REASON_ABORT);
      EXPECT_EQ(resp.final().generated_tokens(), 0);
    }
  }
  EXPECT_TRUE(queued->Finish().ok());
  EXPECT_TRUE(queued_final);
  running_ctx.TryCancel();
  while (running->Read(&resp)) {
  }
  EXPECT_EQ(running->Finish().error_code(), grpc::StatusCode::CANCELLED);

  ASSERT_TRUE(WaitIdle(stub.get()))
      << "blocks still used: " << GetStats(stub.get()).kv_blocks_used();
  s = GetStats(stub.get());
  EXPECT_EQ(s.kv_blocks_free(), (*loop)->n_blocks());
  EXPECT_EQ(s.aborted(), 2);

  const Collected after = Run(Greedy(kPrompt, 4), stub.get());
  ASSERT_TRUE(after.status.ok()) << after.status.error_message();
  ASSERT_TRUE(after.got_final);
  EXPECT_EQ(after.final.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(after.ids.size(), 4u);
  EXPECT_TRUE(WaitIdle(stub.get()));
  (*server)->Shutdown(absl::Seconds(2));
  (*loop)->Shutdown();
}

TEST_F(GenerationServerTest, ApiKeyIsRequired) {
  {
    grpc::ClientContext c;  // no key
    v1::ModelInfoResponse resp;
    EXPECT_EQ(stub_->ModelInfo(&c, v1::ModelInfoRequest(), &resp).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext c;
    c.AddMetadata("authorization", "Bearer wrong-key");
    auto reader = stub_->Generate(&c, Greedy(kPrompt));
    v1::GenerateResponse resp;
    EXPECT_FALSE(reader->Read(&resp));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext c;
    Authorize(c);
    v1::ModelInfoResponse resp;
    EXPECT_TRUE(stub_->ModelInfo(&c, v1::ModelInfoRequest(), &resp).ok());
  }
}

// A server with two KV presets: each request names one (or gets the default), runs in that
// preset's pool, reports that preset's bits per element, and its greedy text equals the
// same request on a server that runs only that preset. An unknown preset is refused with
// the allowed list, for Generate and Score.
TEST_F(GenerationServerTest, RequestsChooseAmongSeveralKvPresets) {
  EngineConfig cfg = ServingEngineConfig();
  cfg.more_kv_specs = {"int4"};
  cfg.kv_max_bytes = int64_t{128} << 20;  // 64 MiB per pool
  OwnServer own;
  ASSERT_NO_FATAL_FAILURE(StartOwnServer(cfg,
                                         {.max_running = 4,
                                          .max_queued = 8,
                                          .max_step_tokens = 128,
                                          .kv_preset = "fp16",
                                          .more_kv_presets = {"int4"}},
                                         &own));
  std::unique_ptr<v1::Generation::Stub>& stub = own.stub;

  {
    grpc::ClientContext c;
    Authorize(c);
    v1::ModelInfoResponse info;
    ASSERT_TRUE(stub->ModelInfo(&c, v1::ModelInfoRequest(), &info).ok());
    ASSERT_EQ(info.kv_presets_size(), 2);
    EXPECT_EQ(info.kv_presets(0), "fp16");
    EXPECT_EQ(info.kv_presets(1), "int4");
  }
  // A prompt past one 64-token block so the int4 pool really encodes something.
  std::string prompt;
  while (prompt.size() < 600) prompt += "The quick brown fox jumps over the lazy dog. ";
  v1::GenerateRequest req = Greedy(prompt, 8);
  const Collected default_preset = Run(req, stub.get());
  req.set_kv_preset("int4");
  const Collected int4 = Run(req, stub.get());
  ASSERT_TRUE(default_preset.status.ok()) << default_preset.status.error_message();
  ASSERT_TRUE(int4.status.ok()) << int4.status.error_message();
  EXPECT_DOUBLE_EQ(default_preset.final.kv_bits_per_element(), 16.0);
  EXPECT_LT(int4.final.kv_bits_per_element(), 12.0);  // int4 blocks + the fp16 tail
  // The suite's server runs fp16 only: the same request there gives the same tokens.
  EXPECT_EQ(Run(Greedy(prompt, 8)).ids, default_preset.ids);

  const v1::StatsResponse stats = GetStats(stub.get());
  ASSERT_EQ(stats.pools_size(), 2);
  EXPECT_EQ(stats.pools(1).kv_preset(), "int4");
  EXPECT_LT(stats.pools(1).bytes_per_token(), stats.pools(0).bytes_per_token() / 3);
  EXPECT_GT(stats.pools(1).capacity_tokens(), 3 * stats.pools(0).capacity_tokens());
  EXPECT_EQ(stats.pools(1).blocks_used(), 0);  // both finished

  req.set_kv_preset("int2-comp");
  const Collected unknown = Run(req, stub.get());
  EXPECT_EQ(unknown.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(unknown.status.error_message().find("allowed: fp16, int4"), std::string::npos)
      << unknown.status.error_message();
  grpc::ClientContext c;
  Authorize(c);
  v1::ScoreRequest score;
  score.set_text(prompt);
  score.set_kv_preset("int2-comp");
  v1::ScoreResponse score_resp;
  const grpc::Status st = stub->Score(&c, score, &score_resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("ScoreRequest.kv_preset"), std::string::npos)
      << st.error_message();
  own.server->Shutdown(absl::Seconds(2));
}

}  // namespace
}  // namespace quantkv

namespace quantkv {
namespace {

// A MoE model with elastic expert precision behind the server: SmolLM2 split into 8 experts
// by a synthetic split (neurons in order, a random router), experts held as Q4_0 and Q8_0
// under a budget of all-Q4_0 plus 10 upgrades. Stats shows every expert's load and
// precision, and the active bytes within the budget.
TEST_F(GenerationServerTest, StatsShowsExpertLoadAndPrecision) {
  auto dense = GgufModel::Open(testing::DefaultModelPath().string());
  ASSERT_TRUE(dense.ok());
  const ModelConfig& c = (*dense)->config();
  MoeSplit split;
  split.n_layers = c.n_layers;
  split.hidden = c.hidden;
  split.intermediate = c.intermediate;
  split.n_experts = 8;
  split.top_k = 2;
  std::mt19937 rng(5);
  std::normal_distribution<float> d(0.0f, 0.1f);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    std::vector<int32_t> n(c.intermediate);
    std::iota(n.begin(), n.end(), 0);
    split.neurons.push_back(n);
    std::vector<float> r(8 * c.hidden);
    for (float& v : r) v = d(rng);
    split.router.push_back(r);
    split.router_bias.push_back(std::vector<float>(8, 0.0f));
  }
  auto moe = MoefiedSource(std::unique_ptr<WeightSource>(std::move(*dense)), split);
  ASSERT_TRUE(moe.ok()) << moe.status();
  EngineConfig cfg = ServingEngineConfig();
  cfg.expert_levels = {kernels::GgmlType::kQ4_0, kernels::GgmlType::kQ8_0};
  cfg.expert_decide_every_tokens = 8;
  // Bytes per expert at each level: 3 matrices of 576 x 192.
  const int64_t q4 = 3 * 576 * 192 / 32 * 18, q8 = 3 * 576 * 192 / 32 * 34;
  cfg.expert_budget_bytes = 240 * q4 + 10 * (q8 - q4);
  auto engine = Engine::Create(std::move(*moe), cfg);
  ASSERT_TRUE(engine.ok()) << engine.status();
  auto loop = EngineLoop::Create(
      std::move(*engine), tokenizer_,
      {.max_running = 4, .max_queued = 8, .max_step_tokens = 128, .kv_preset = "fp16"});
  ASSERT_TRUE(loop.ok()) << loop.status();
  GenerationServerOptions options;
  options.listen = "127.0.0.1:0";
  options.api_key = kApiKey;
  auto server = GenerationServer::Start(loop->get(), options);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::Generation::NewStub(
      grpc::CreateChannel((*server)->address(), grpc::InsecureChannelCredentials()));
  const Collected got = Run(Greedy(kPrompt, 24), stub.get());
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  ASSERT_TRUE(WaitIdle(stub.get()));
  const v1::StatsResponse s = GetStats(stub.get());
  ASSERT_EQ(s.experts_size(), 240);
  EXPECT_EQ(s.expert_budget_bytes(), cfg.expert_budget_bytes);
  EXPECT_LE(s.expert_bytes_active(), s.expert_budget_bytes());
  EXPECT_EQ(s.expert_bytes_active(), 240 * q4 + 10 * (q8 - q4));  // the budget is spent
  int high = 0;
  double layer0_load = 0;
  for (const v1::ExpertStats& e : s.experts()) {
    EXPECT_TRUE(e.precision() == "Q4_0" || e.precision() == "Q8_0") << e.precision();
    EXPECT_EQ(e.bytes(), e.precision() == "Q8_0" ? q8 : q4);
    high += e.precision() == "Q8_0";
    if (e.layer() == 0) layer0_load += e.load();
    EXPECT_GE(e.load(), 0.0);
    EXPECT_LE(e.load(), 1.0);
  }
  EXPECT_EQ(high, 10);
  // Every token goes to 2 experts: the loads of a layer sum to 2 x (1 - decay^tokens) > 0.
  EXPECT_GT(layer0_load, 0.05);
  EXPECT_LE(layer0_load, 2.0 + 1e-9);
  EXPECT_GT(s.expert_precision_changes(), 0);
  (*server)->Shutdown(absl::Seconds(2));
}

}  // namespace
}  // namespace quantkv
