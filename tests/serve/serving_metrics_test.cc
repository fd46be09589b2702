// Prometheus metrics of `quantkv serve`: the registry's text exposition (exact counter,
// gauge and histogram text, escaping, registration errors), exact totals under concurrent
// recording, the serving metric names, what the engine loop records over a tiny random
// model (with preemptions), and the /metrics HTTP endpoint over raw sockets (status codes,
// bad and oversized requests, idle clients dropped, Stop() prompt).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "runtime/engine/engine.h"
#include "runtime/model/hf_model.h"
#include "runtime/serve/engine_loop.h"
#include "runtime/serve/metrics_http.h"
#include "runtime/serve/serving_metrics.h"
#include "runtime/tokenizer/tokenizer.h"
#include "tests/testutil/paths.h"

namespace quantkv {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// The value of the exposition line that starts with `series` + " ", or -1 when absent.
double ValueOf(const std::string& text, const std::string& series) {
  const std::string key = series + " ";
  size_t pos = 0;
  while ((pos = text.find(key, pos)) != std::string::npos) {
    if (pos == 0 || text[pos - 1] == '\n') {
      return std::stod(text.substr(pos + key.size(), text.find('\n', pos) - pos - key.size()));
    }
    pos += key.size();
  }
  return -1;
}

// ---------------------------------------------------------------------------------------
// Exposition format

TEST(MetricsRegistryTest, CounterText) {
  MetricsRegistry r;
  auto ok = r.AddCounter("test:requests_total", "Requests served.", {{"code", "200"}});
  auto bad = r.AddCounter("test:requests_total", "Requests served.", {{"code", "500"}});
  ASSERT_TRUE(ok.ok()) << ok.status();
  ASSERT_TRUE(bad.ok()) << bad.status();
  (*ok)->Increment();
  (*ok)->Increment(2.5);
  (*ok)->Increment(-7);  // ignored: counters never go down
  EXPECT_EQ((*ok)->value(), 3.5);
  EXPECT_EQ(r.RenderText(),
            "# HELP test:requests_total Requests served.\n"
            "# TYPE test:requests_total counter\n"
            "test:requests_total{code=\"200\"} 3.5\n"
            "test:requests_total{code=\"500\"} 0\n");
}

TEST(MetricsRegistryTest, GaugeText) {
  MetricsRegistry r;
  auto a = r.AddGauge("test_temperature", "A gauge.");
  auto b = r.AddGauge("test_ratio", "Another.", {{"k", "v"}, {"z", "w"}});
  ASSERT_TRUE(a.ok() && b.ok());
  (*a)->Set(-2.25);
  (*b)->Set(0.1);
  (*b)->Add(1);
  EXPECT_EQ(r.RenderText(),
            "# HELP test_temperature A gauge.\n"
            "# TYPE test_temperature gauge\n"
            "test_temperature -2.25\n"
            "# HELP test_ratio Another.\n"
            "# TYPE test_ratio gauge\n"
            "test_ratio{k=\"v\",z=\"w\"} 1.1\n");
  (*a)->Set(std::numeric_limits<double>::infinity());
  (*b)->Set(std::nan(""));
  const std::string text = r.RenderText();
  EXPECT_TRUE(absl::StrContains(text, "\ntest_temperature +Inf\n")) << text;
  EXPECT_TRUE(absl::StrContains(text, "\ntest_ratio{k=\"v\",z=\"w\"} NaN\n")) << text;
}

TEST(MetricsRegistryTest, HistogramTextIsCumulative) {
  MetricsRegistry r;
  auto h = r.AddHistogram("test_latency_seconds", "Latency.", {0.25, 1, 4}, {{"m", "x"}});
  ASSERT_TRUE(h.ok()) << h.status();
  // Binary fractions, so that the sum is exact. 0.25 lands in le="0.25": bounds are
  // inclusive; 8 only in +Inf.
  for (double v : {0.125, 0.25, 0.5, 2.0, 8.0}) (*h)->Observe(v);
  (*h)->Observe(std::nan(""));  // ignored
  EXPECT_EQ(r.RenderText(),
            "# HELP test_latency_seconds Latency.\n"
            "# TYPE test_latency_seconds histogram\n"
            "test_latency_seconds_bucket{m=\"x\",le=\"0.25\"} 2\n"
            "test_latency_seconds_bucket{m=\"x\",le=\"1\"} 3\n"
            "test_latency_seconds_bucket{m=\"x\",le=\"4\"} 4\n"
            "test_latency_seconds_bucket{m=\"x\",le=\"+Inf\"} 5\n"
            "test_latency_seconds_sum{m=\"x\"} 10.875\n"
            "test_latency_seconds_count{m=\"x\"} 5\n");
  const Histogram::Snapshot s = (*h)->Read();
  EXPECT_EQ(s.cumulative, (std::vector<uint64_t>{2, 3, 4, 5}));
  EXPECT_EQ(s.count, 5u);
}

TEST(MetricsRegistryTest, EmptyHistogramWithoutLabels) {
  MetricsRegistry r;
  ASSERT_TRUE(r.AddHistogram("h", "H.", {1}).ok());
  EXPECT_EQ(r.RenderText(),
            "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 0\nh_bucket{le=\"+Inf\"} 0\n"
            "h_sum 0\nh_count 0\n");
}

TEST(MetricsRegistryTest, EscapesHelpAndLabelValues) {
  MetricsRegistry r;
  auto c = r.AddCounter("e_total", "back\\slash \"quoted\"\nsecond line",
                        {{"path", "C:\\dir \"x\"\nnext"}});
  ASSERT_TRUE(c.ok());
  // HELP escapes backslash and newline only; label values also the double quote.
  EXPECT_EQ(r.RenderText(),
            "# HELP e_total back\\\\slash \"quoted\"\\nsecond line\n"
            "# TYPE e_total counter\n"
            "e_total{path=\"C:\\\\dir \\\"x\\\"\\nnext\"} 0\n");
}

TEST(MetricsRegistryTest, RejectsBadRegistrations) {
  MetricsRegistry r;
  ASSERT_TRUE(r.AddCounter("ok_total", "x", {{"a", "1"}}).ok());
  auto code = [](const auto& s) { return s.status().code(); };
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(code(r.AddCounter("ok_total", "x", {{"a", "1"}})), kInvalid);  // same series
  EXPECT_EQ(code(r.AddGauge("ok_total", "x")), kInvalid);                  // other type
  EXPECT_EQ(code(r.AddCounter("no_suffix", "x")), kInvalid);
  EXPECT_EQ(code(r.AddGauge("1starts_with_digit", "x")), kInvalid);
  EXPECT_EQ(code(r.AddGauge("has-dash", "x")), kInvalid);
  EXPECT_EQ(code(r.AddGauge("", "x")), kInvalid);
  EXPECT_EQ(code(r.AddGauge("g", "x", {{"bad:label", "v"}})), kInvalid);
  EXPECT_EQ(code(r.AddGauge("g", "x", {{"__reserved", "v"}})), kInvalid);
  EXPECT_EQ(code(r.AddGauge("g", "x", {{"a", "1"}, {"a", "2"}})), kInvalid);
  EXPECT_EQ(code(r.AddHistogram("h", "x", {1, 2}, {{"le", "3"}})), kInvalid);
  EXPECT_EQ(code(r.AddHistogram("h", "x", {2, 1})), kInvalid);
  EXPECT_EQ(code(r.AddHistogram("h", "x", {1, 1})), kInvalid);
  EXPECT_EQ(code(r.AddHistogram("h", "x", {1, std::numeric_limits<double>::infinity()})), kInvalid);
  // None of the failures left a family behind.
  EXPECT_EQ(r.RenderText(), "# HELP ok_total x\n# TYPE ok_total counter\nok_total{a=\"1\"} 0\n");
}

TEST(MetricsRegistryTest, ConcurrentRecordingIsExact) {
  MetricsRegistry r;
  Counter* c = *r.AddCounter("c_total", "c");
  Gauge* g = *r.AddGauge("g", "g");
  Histogram* h = *r.AddHistogram("h", "h", {0.5, 1.5});
  constexpr int kThreads = 8;
  constexpr int kPerThread = 20000;
  std::atomic<bool> done{false};
  // Rendering at the same time must not disturb the counts (nor crash).
  std::thread reader([&] {
    while (!done.load()) {
      const std::string text = r.RenderText();
      ASSERT_TRUE(absl::StrContains(text, "# TYPE h histogram"));
    }
  });
  std::vector<std::thread> writers;
  for (int t = 0; t < kThreads; ++t) {
    writers.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        c->Increment();
        g->Add(1);
        h->Observe(t % 2 == 0 ? 1.0 : 2.0);
      }
    });
  }
  for (std::thread& w : writers) w.join();
  done = true;
  reader.join();
  const double total = double{kThreads} * kPerThread;
  EXPECT_EQ(c->value(), total);
  EXPECT_EQ(g->value(), total);
  const Histogram::Snapshot s = h->Read();
  EXPECT_EQ(s.count, static_cast<uint64_t>(total));
  EXPECT_EQ(s.cumulative, (std::vector<uint64_t>{0, static_cast<uint64_t>(total / 2),
                                                 static_cast<uint64_t>(total)}));
  EXPECT_EQ(s.sum, 1.5 * total);
  const std::string text = r.RenderText();
  EXPECT_EQ(ValueOf(text, "c_total"), total);
  EXPECT_EQ(ValueOf(text, "h_count"), total);
}

// ---------------------------------------------------------------------------------------
// ServingMetrics

TEST(ServingMetricsTest, VllmNamesAndTypes) {
  auto m = ServingMetrics::Create();
  ASSERT_TRUE(m.ok()) << m.status();
  const std::string text = (*m)->Render();
  for (const char* line : {
           "# TYPE quantkv:num_requests_running gauge",
           "# TYPE quantkv:num_requests_waiting gauge",
           "# TYPE quantkv:kv_cache_usage_perc gauge",
           "# TYPE quantkv:num_preemptions_total counter",
           "# TYPE quantkv:prompt_tokens_total counter",
           "# TYPE quantkv:generation_tokens_total counter",
           "# TYPE quantkv:request_success_total counter",
           "# TYPE quantkv:time_to_first_token_seconds histogram",
           "# TYPE quantkv:inter_token_latency_seconds histogram",
           "# TYPE quantkv:e2e_request_latency_seconds histogram",
           "# TYPE quantkv:request_queue_time_seconds histogram",
           // Without a model name the series carry no labels at all.
           "quantkv:num_requests_running 0",
           "quantkv:request_success_total{finished_reason=\"stop\"} 0",
           "quantkv:request_success_total{finished_reason=\"length\"} 0",
           "quantkv:request_success_total{finished_reason=\"abort\"} 0",
           "quantkv:request_success_total{finished_reason=\"error\"} 0",
           // vLLM's first and last TTFT bounds.
           "quantkv:time_to_first_token_seconds_bucket{le=\"0.001\"} 0",
           "quantkv:time_to_first_token_seconds_bucket{le=\"2560\"} 0",
       }) {
    EXPECT_TRUE(absl::StrContains(text, absl::StrCat("\n", line, "\n")) ||
                text.starts_with(absl::StrCat(line, "\n")))
        << line << "\n"
        << text;
  }
}

TEST(ServingMetricsTest, RecordsIntoTheRightSeries) {
  auto created = ServingMetrics::Create("tiny \"model\"");
  ASSERT_TRUE(created.ok()) << created.status();
  ServingMetrics& m = **created;
  m.ObserveTimeToFirstToken(0.05);
  m.ObserveInterTokenLatency(0.02);
  m.ObserveInterTokenLatency(0.03);
  m.ObserveQueueTime(0.4);
  m.ObserveE2eLatency(1.2);
  m.RequestFinished(RequestOutcome::kLength);
  m.RequestFinished(RequestOutcome::kAbort);
  m.RequestFinished(RequestOutcome::kAbort);
  m.AddPromptTokens(7);
  m.AddGenerationTokens(3);
  m.AddPreemptions(2);
  m.SetRunning(3);
  m.SetWaiting(4);
  m.SetKvCacheUsage(0.625);
  const std::string t = m.Render();
  const std::string model = "model_name=\"tiny \\\"model\\\"\"";
  auto series = [&](const std::string& name, const std::string& more = "") {
    return ValueOf(t, absl::StrCat(name, "{", model, more, "}"));
  };
  EXPECT_EQ(series("quantkv:time_to_first_token_seconds_bucket", ",le=\"0.04\""), 0);
  EXPECT_EQ(series("quantkv:time_to_first_token_seconds_bucket", ",le=\"0.06\""), 1);
  EXPECT_EQ(series("quantkv:time_to_first_token_seconds_count"), 1);
  EXPECT_EQ(series("quantkv:time_to_first_token_seconds_sum"), 0.05);
  EXPECT_EQ(series("quantkv:inter_token_latency_seconds_bucket", ",le=\"0.025\""), 1);
  EXPECT_EQ(series("quantkv:inter_token_latency_seconds_bucket", ",le=\"0.05\""), 2);
  EXPECT_EQ(series("quantkv:inter_token_latency_seconds_count"), 2);
  EXPECT_EQ(series("quantkv:request_queue_time_seconds_bucket", ",le=\"0.3\""), 0);
  EXPECT_EQ(series("quantkv:request_queue_time_seconds_bucket", ",le=\"0.5\""), 1);
  EXPECT_EQ(series("quantkv:e2e_request_latency_seconds_bucket", ",le=\"1\""), 0);
  EXPECT_EQ(series("quantkv:e2e_request_latency_seconds_bucket", ",le=\"1.5\""), 1);
  EXPECT_EQ(series("quantkv:request_success_total", ",finished_reason=\"stop\""), 0);
  EXPECT_EQ(series("quantkv:request_success_total", ",finished_reason=\"length\""), 1);
  EXPECT_EQ(series("quantkv:request_success_total", ",finished_reason=\"abort\""), 2);
  EXPECT_EQ(series("quantkv:request_success_total", ",finished_reason=\"error\""), 0);
  EXPECT_EQ(series("quantkv:prompt_tokens_total"), 7);
  EXPECT_EQ(series("quantkv:generation_tokens_total"), 3);
  EXPECT_EQ(series("quantkv:num_preemptions_total"), 2);
  EXPECT_EQ(series("quantkv:num_requests_running"), 3);
  EXPECT_EQ(series("quantkv:num_requests_waiting"), 4);
  EXPECT_EQ(series("quantkv:kv_cache_usage_perc"), 0.625);
}

// ---------------------------------------------------------------------------------------
// The engine loop records into ServingMetrics (tiny random LLaMA from tests/fixtures)

class EngineLoopMetricsTest : public ::testing::Test {
 protected:
  static constexpr int64_t kBlockTokens = 64;

  void SetUp() override {
    auto tok = Tokenizer::FromJson(
        testing::FixturePath("tokenizer/tiny_bytelevel.tokenizer.json").string());
    ASSERT_TRUE(tok.ok()) << tok.status();
    tokenizer_ = std::move(*tok);
  }

  // A loop whose KV pool has exactly `blocks` blocks of kBlockTokens tokens, recording into
  // fresh metrics.
  void StartLoop(int32_t blocks, int64_t max_running) {
    loop_.reset();  // before the metrics it points to
    auto m = ServingMetrics::Create();
    ASSERT_TRUE(m.ok()) << m.status();
    metrics_ = std::move(*m);
    auto weights = OpenHfModelDir(testing::FixturePath("models/tiny_llama_f32").string());
    ASSERT_TRUE(weights.ok()) << weights.status();
    EngineConfig cfg;
    cfg.kv_spec = absl::StrCat("fp32,block=", kBlockTokens);
    cfg.decode_activations = kernels::ActivationPrecision::kFloat32;
    cfg.lm_head_activations = kernels::ActivationPrecision::kFloat32;
    // fp32 K and V of 2 layers x 2 KV heads x 16 dims: 512 bytes per token.
    cfg.kv_max_bytes = blocks * kBlockTokens * 512;
    cfg.max_chunk_tokens = 64;
    auto engine = Engine::Create(std::move(*weights), cfg);
    ASSERT_TRUE(engine.ok()) << engine.status();
    auto loop = EngineLoop::Create(std::move(*engine), tokenizer_.get(),
                                   {.max_running = max_running,
                                    .max_step_tokens = 64,
                                    .kv_preset = "fp32",
                                    .metrics = metrics_.get()});
    ASSERT_TRUE(loop.ok()) << loop.status();
    loop_ = std::move(*loop);
    ASSERT_EQ(loop_->n_blocks(), blocks);
  }

  static GenerationParams Params(int64_t max_tokens) {
    GenerationParams p;
    p.prompt = {1, 17, 42, 99, 5, 6, 7, 8};
    p.max_tokens = max_tokens;
    p.ignore_eos = true;  // every request runs to max_tokens: finished_reason="length"
    return p;
  }

  static GenerationFinal WaitFinal(RequestStream& s) {
    const auto deadline = Clock::now() + std::chrono::seconds(60);
    while (Clock::now() < deadline) {
      for (StreamEvent& e : s.Wait(absl::Milliseconds(100))) {
        EXPECT_NE(e.kind, StreamEvent::Kind::kError) << e.error;
        if (e.kind != StreamEvent::Kind::kChunk) return e.final;
      }
    }
    ADD_FAILURE() << "no final event";
    return {};
  }

  // Gauges are published after the step that finished the requests; wait for it.
  bool WaitIdleGauges() {
    const auto deadline = Clock::now() + std::chrono::seconds(10);
    while (Clock::now() < deadline) {
      const std::string t = metrics_->Render();
      if (ValueOf(t, "quantkv:num_requests_running") == 0 &&
          ValueOf(t, "quantkv:num_requests_waiting") == 0 &&
          ValueOf(t, "quantkv:kv_cache_usage_perc") == 0) {
        return true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return false;
  }

  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<ServingMetrics> metrics_;  // outlives loop_ (declared before it)
  std::unique_ptr<EngineLoop> loop_;
};

TEST_F(EngineLoopMetricsTest, CountsMatchWhatTheStreamsReport) {
  // Three requests that each peak at 3 of the 4 blocks: any two running together run out
  // of blocks, so the newest is preempted and recomputed.
  constexpr int kRequests = 3;
  constexpr int64_t kMaxTokens = 180;
  int64_t preemptions = 0;
  int64_t generated = 0;
  // A request finished before the next was even submitted would not contend; that needs
  // the test thread to stall for ~100 decode steps, so a retry makes it certain.
  for (int attempt = 0; attempt < 5 && preemptions == 0; ++attempt) {
    StartLoop(/*blocks=*/4, /*max_running=*/kRequests);
    std::vector<std::shared_ptr<RequestStream>> streams;
    for (int i = 0; i < kRequests; ++i) {
      auto s = loop_->Submit(Params(kMaxTokens));
      ASSERT_TRUE(s.ok()) << s.status();
      streams.push_back(*s);
    }
    preemptions = generated = 0;
    for (auto& s : streams) {
      const GenerationFinal f = WaitFinal(*s);
      EXPECT_EQ(f.reason, FinishReason::kLength);
      preemptions += f.preemptions;
      generated += f.generated_tokens;
    }
    ASSERT_TRUE(WaitIdleGauges()) << metrics_->Render();
    loop_->Shutdown();
  }
  ASSERT_GT(preemptions, 0) << "the requests never contended for KV blocks";
  EXPECT_EQ(generated, kRequests * kMaxTokens);

  const std::string t = metrics_->Render();
  EXPECT_EQ(ValueOf(t, "quantkv:num_preemptions_total"), preemptions) << t;
  EXPECT_EQ(ValueOf(t, "quantkv:generation_tokens_total"), generated);
  // Prompts count once, however often a preempted request prefilled again.
  EXPECT_EQ(ValueOf(t, "quantkv:prompt_tokens_total"), kRequests * 8);
  EXPECT_EQ(ValueOf(t, "quantkv:request_success_total{finished_reason=\"length\"}"), kRequests);
  EXPECT_EQ(ValueOf(t, "quantkv:request_success_total{finished_reason=\"stop\"}"), 0);
  EXPECT_EQ(ValueOf(t, "quantkv:request_success_total{finished_reason=\"abort\"}"), 0);
  EXPECT_EQ(ValueOf(t, "quantkv:time_to_first_token_seconds_count"), kRequests);
  EXPECT_EQ(ValueOf(t, "quantkv:inter_token_latency_seconds_count"), generated - kRequests);
  EXPECT_EQ(ValueOf(t, "quantkv:request_queue_time_seconds_count"), kRequests);
  EXPECT_EQ(ValueOf(t, "quantkv:e2e_request_latency_seconds_count"), kRequests);
  // Every interval is non-negative and the end-to-end time covers the first token's.
  const double ttft = ValueOf(t, "quantkv:time_to_first_token_seconds_sum");
  const double e2e = ValueOf(t, "quantkv:e2e_request_latency_seconds_sum");
  EXPECT_GT(ttft, 0);
  EXPECT_GE(ValueOf(t, "quantkv:request_queue_time_seconds_sum"), 0);
  EXPECT_GE(ValueOf(t, "quantkv:inter_token_latency_seconds_sum"), 0);
  EXPECT_GT(e2e, ttft);
}

TEST_F(EngineLoopMetricsTest, ShutdownAbortIsCountedAsAbort) {
  StartLoop(/*blocks=*/4, /*max_running=*/2);
  auto s = loop_->Submit(Params(200));
  ASSERT_TRUE(s.ok()) << s.status();
  loop_->Shutdown();  // aborts it unless it already ran its 200 steps
  const GenerationFinal f = WaitFinal(**s);
  const std::string t = metrics_->Render();
  const bool aborted = f.reason == FinishReason::kAbort;
  EXPECT_EQ(ValueOf(t, "quantkv:request_success_total{finished_reason=\"abort\"}"), aborted ? 1 : 0)
      << t;
  EXPECT_EQ(ValueOf(t, "quantkv:request_success_total{finished_reason=\"length\"}"),
            aborted ? 0 : 1);
  EXPECT_EQ(ValueOf(t, "quantkv:e2e_request_latency_seconds_count"), 1);
  EXPECT_EQ(ValueOf(t, "quantkv:generation_tokens_total"), f.generated_tokens);
  // Shutdown publishes the state after aborting: nothing runs or holds KV.
  EXPECT_EQ(ValueOf(t, "quantkv:num_requests_running"), 0);
  EXPECT_EQ(ValueOf(t, "quantkv:kv_cache_usage_perc"), 0);
}

// ---------------------------------------------------------------------------------------
// HTTP endpoint

int ConnectTo(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  // A hung server fails the test instead of hanging it.
  timeval tv{.tv_sec = 5, .tv_usec = 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

bool SendAll(int fd, std::string_view data) {
  while (!data.empty()) {
    const ssize_t n = send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n <= 0) return false;
    data.remove_prefix(n);
  }
  return true;
}

// Everything until the server closes; "<timeout>" appended if it did not within 5 s.
std::string ReadAll(int fd) {
  std::string out;
  char buf[4096];
  while (true) {
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n == 0) return out;
    if (n < 0) return out + (errno == EAGAIN || errno == EWOULDBLOCK ? "<timeout>" : "<error>");
    out.append(buf, n);
  }
}

std::string Exchange(int port, std::string_view request, bool half_close = false) {
  const int fd = ConnectTo(port);
  if (fd < 0) return "<connect failed>";
  std::string out;
  if (SendAll(fd, request)) {
    if (half_close) shutdown(fd, SHUT_WR);
    out = ReadAll(fd);
  } else {
    out = "<send failed>";
  }
  close(fd);
  return out;
}

std::string StatusLine(const std::string& response) {
  return response.substr(0, response.find("\r\n"));
}

std::string Body(const std::string& response) {
  const size_t p = response.find("\r\n\r\n");
  return p == std::string::npos ? "<no header end>" : response.substr(p + 4);
}

class MetricsHttpTest : public ::testing::Test {
 protected:
  void Start(const MetricsHttpOptions& options = {}) {
    auto m = ServingMetrics::Create("tiny");
    ASSERT_TRUE(m.ok()) << m.status();
    metrics_ = std::move(*m);
    metrics_->AddGenerationTokens(42);
    auto s = MetricsHttpServer::Start(
        "127.0.0.1:0", [metrics = metrics_.get()] { return metrics->Render(); }, options);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    port_ = server_->port();
    ASSERT_GT(port_, 0);
    ASSERT_EQ(server_->address(), absl::StrCat("127.0.0.1:", port_));
  }

  std::unique_ptr<ServingMetrics> metrics_;
  std::unique_ptr<MetricsHttpServer> server_;
  int port_ = 0;
};

TEST_F(MetricsHttpTest, ServesMetrics) {
  Start();
  const std::string r = Exchange(port_, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(StatusLine(r), "HTTP/1.1 200 OK") << r;
  EXPECT_TRUE(absl::StrContains(r, "\r\nContent-Type: text/plain; version=0.0.4")) << r;
  EXPECT_TRUE(absl::StrContains(r, "\r\nConnection: close\r\n")) << r;
  const std::string body = Body(r);
  EXPECT_TRUE(absl::StrContains(r, absl::StrCat("\r\nContent-Length: ", body.size(), "\r\n")));
  EXPECT_TRUE(
      absl::StrContains(body, "\nquantkv:generation_tokens_total{model_name=\"tiny\"} 42\n"))
      << body;
  EXPECT_EQ(body, metrics_->Render());
  // Each scrape renders afresh.
  metrics_->AddGenerationTokens(1);
  EXPECT_TRUE(absl::StrContains(Exchange(port_, "GET /metrics HTTP/1.0\r\n\r\n"),
                                "quantkv:generation_tokens_total{model_name=\"tiny\"} 43\n"));
}

TEST_F(MetricsHttpTest, AnswersVariants) {
  Start();
  // Bare-LF line endings, a query string, and a client that half-closes after sending.
  EXPECT_EQ(StatusLine(Exchange(port_, "GET /metrics?x=1 HTTP/1.1\n\n")), "HTTP/1.1 200 OK");
  EXPECT_EQ(StatusLine(Exchange(port_, "GET /metrics HTTP/1.1\r\n\r\n", true)), "HTTP/1.1 200 OK");
  const std::string head = Exchange(port_, "HEAD /metrics HTTP/1.1\r\n\r\n");
  EXPECT_EQ(StatusLine(head), "HTTP/1.1 200 OK");
  EXPECT_EQ(Body(head), "") << "HEAD has no body";
  EXPECT_TRUE(absl::StrContains(
      head, absl::StrCat("\r\nContent-Length: ", metrics_->Render().size(), "\r\n")))
      << head;
  const std::string head_404 = Exchange(port_, "HEAD /nope HTTP/1.1\r\n\r\n");
  EXPECT_EQ(StatusLine(head_404), "HTTP/1.1 404 Not Found");
  EXPECT_EQ(Body(head_404), "");
}

TEST_F(MetricsHttpTest, ErrorStatuses) {
  Start();
  EXPECT_EQ(StatusLine(Exchange(port_, "GET / HTTP/1.1\r\n\r\n")), "HTTP/1.1 404 Not Found");
  EXPECT_EQ(StatusLine(Exchange(port_, "GET /metricsx HTTP/1.1\r\n\r\n")),
            "HTTP/1.1 404 Not Found");
  const std::string post = Exchange(port_, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
  EXPECT_EQ(StatusLine(post), "HTTP/1.1 405 Method Not Allowed");
  EXPECT_TRUE(absl::StrContains(post, "\r\nAllow: GET, HEAD\r\n")) << post;
  EXPECT_EQ(StatusLine(Exchange(port_, "DELETE /metrics HTTP/1.1\r\n\r\n")),
            "HTTP/1.1 405 Method Not Allowed");
  for (const char* bad : {"garbage\r\n\r\n", "\r\n\r\n", "GET /metrics\r\n\r\n",
                          "GET /metrics HTTP/2.0\r\n\r\n", "GET metrics HTTP/1.1\r\n\r\n",
                          "GET  /metrics HTTP/1.1\r\n\r\n", "G(T /metrics HTTP/1.1\r\n\r\n"}) {
    EXPECT_EQ(StatusLine(Exchange(port_, bad)), "HTTP/1.1 400 Bad Request") << bad;
  }
  // A bad request line is answered without waiting for the rest of the request.
  EXPECT_EQ(StatusLine(Exchange(port_, "garbage\r\n")), "HTTP/1.1 400 Bad Request");
  // Oversized: a request line, or headers, beyond max_request_bytes (8 KiB).
  EXPECT_EQ(StatusLine(Exchange(port_, std::string(20000, 'A'))), "HTTP/1.1 400 Bad Request");
  EXPECT_EQ(StatusLine(Exchange(port_, "GET /" + std::string(9000, 'a') + " HTTP/1.1\r\n\r\n")),
            "HTTP/1.1 400 Bad Request");
  EXPECT_EQ(StatusLine(Exchange(
                port_, "GET /metrics HTTP/1.1\r\nX-Big: " + std::string(9000, 'b') + "\r\n\r\n")),
            "HTTP/1.1 400 Bad Request");
  // Still serving after all that.
  EXPECT_EQ(StatusLine(Exchange(port_, "GET /metrics HTTP/1.1\r\n\r\n")), "HTTP/1.1 200 OK");
}

TEST_F(MetricsHttpTest, IdleClientDoesNotBlockOthers) {
  Start();  // client_timeout 10 s
  const int idle = ConnectTo(port_);
  ASSERT_GE(idle, 0);
  const int partial = ConnectTo(port_);
  ASSERT_GE(partial, 0);
  ASSERT_TRUE(SendAll(partial, "GET /metrics HTTP/1.1\r\nHost: x\r\n"));  // never finished
  const auto t0 = Clock::now();
  EXPECT_EQ(StatusLine(Exchange(port_, "GET /metrics HTTP/1.1\r\n\r\n")), "HTTP/1.1 200 OK");
  EXPECT_LT(SecondsSince(t0), 2.0);
  close(idle);
  close(partial);
}

TEST_F(MetricsHttpTest, SilentClientIsDroppedAfterTimeout) {
  Start({.client_timeout = absl::Milliseconds(300)});
  const int idle = ConnectTo(port_);
  ASSERT_GE(idle, 0);
  const int partial = ConnectTo(port_);
  ASSERT_GE(partial, 0);
  ASSERT_TRUE(SendAll(partial, "GET /metrics HTTP/1.1\r\n"));
  const auto t0 = Clock::now();
  EXPECT_EQ(ReadAll(idle), "");  // closed by the server, without a response
  EXPECT_EQ(ReadAll(partial), "");
  const double waited = SecondsSince(t0);
  EXPECT_GT(waited, 0.2);
  EXPECT_LT(waited, 3.0);
  close(idle);
  close(partial);
}

TEST_F(MetricsHttpTest, ConnectionLimitQueuesInBacklog) {
  Start({.client_timeout = absl::Milliseconds(300), .max_connections = 1});
  const int idle = ConnectTo(port_);
  ASSERT_GE(idle, 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // let the server take it
  // Served once the idle one times out and frees the only slot.
  const auto t0 = Clock::now();
  EXPECT_EQ(StatusLine(Exchange(port_, "GET /metrics HTTP/1.1\r\n\r\n")), "HTTP/1.1 200 OK");
  EXPECT_GT(SecondsSince(t0), 0.1);
  close(idle);
}

TEST_F(MetricsHttpTest, StopIsPromptWithAnIdleClient) {
  Start();  // client_timeout 10 s: Stop must not wait for it
  const int idle = ConnectTo(port_);
  ASSERT_GE(idle, 0);
  EXPECT_EQ(StatusLine(Exchange(port_, "GET /metrics HTTP/1.1\r\n\r\n")), "HTTP/1.1 200 OK");
  const auto t0 = Clock::now();
  server_->Stop();
  EXPECT_LT(SecondsSince(t0), 1.0);
  EXPECT_EQ(ReadAll(idle), "");  // its connection was closed
  close(idle);
  EXPECT_EQ(ConnectTo(port_), -1) << "still listening after Stop";
  server_->Stop();  // idempotent
}

TEST(MetricsHttpStartTest, BindFailureNamesTheAddress) {
  auto first = MetricsHttpServer::Start("127.0.0.1:0", [] { return std::string(); });
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string taken = (*first)->address();
  auto second = MetricsHttpServer::Start(taken, [] { return std::string(); });
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StrContains(second.status().message(), taken)) << second.status();
  EXPECT_TRUE(absl::StrContains(second.status().message(), "bind")) << second.status();
}

TEST(MetricsHttpStartTest, RejectsMalformedAddresses) {
  for (const char* bad : {"127.0.0.1", ":9090", "127.0.0.1:", "127.0.0.1:70000", "127.0.0.1:-1",
                          "127.0.0.1:9x", "::1:9090", "[::1", "[::1]9090", ""}) {
    auto s = MetricsHttpServer::Start(bad, [] { return std::string(); });
    ASSERT_FALSE(s.ok()) << bad;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << bad << ": " << s.status();
  }
  EXPECT_FALSE(MetricsHttpServer::Start("127.0.0.1:0", nullptr).ok());
}

TEST(MetricsHttpStartTest, Ipv6Loopback) {
  auto s = MetricsHttpServer::Start("[::1]:0", [] { return std::string("x 1\n"); });
  if (!s.ok()) GTEST_SKIP() << "no IPv6 loopback here: " << s.status();
  EXPECT_TRUE((*s)->address().starts_with("[::1]:")) << (*s)->address();
  EXPECT_GT((*s)->port(), 0);
}

}  // namespace
}  // namespace quantkv
