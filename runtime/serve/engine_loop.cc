#include "runtime/serve/engine_loop.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <optional>
#include <span>
#include <utility>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "runtime/serve/serving_metrics.h"
#include "runtime/util/monotonic_clock.h"

namespace quantkv {
namespace {

// Rate window of Stats().generated_tokens_per_s.
constexpr int64_t kRateWindowNs = int64_t{5'000'000'000};
constexpr int32_t kMaxLogprobs = 20;

// log(sum(exp(row))) computed stably.
double LogSumExp(std::span<const float> row) {
  const float mx = *std::max_element(row.begin(), row.end());
  double sum = 0;
  for (float x : row) sum += std::exp(static_cast<double>(x - mx));
  return mx + std::log(sum);
}

TokenLogprobs ComputeLogprobs(std::span<const float> row, int32_t chosen, int32_t top_n) {
  const double lse = LogSumExp(row);
  TokenLogprobs out;
  out.token_id = chosen;
  out.logprob = static_cast<float>(row[chosen] - lse);
  std::vector<int32_t> idx(row.size());
  std::iota(idx.begin(), idx.end(), 0);
  const size_t n = std::min<size_t>(top_n, idx.size());
  std::partial_sort(idx.begin(), idx.begin() + n, idx.end(), [&](int32_t a, int32_t b) {
    return row[a] != row[b] ? row[a] > row[b] : a < b;
  });
  for (size_t i = 0; i < n; ++i) {
    out.top.push_back({.token_id = idx[i], .logprob = static_cast<float>(row[idx[i]] - lse)});
  }
  return out;
}

// Length of the longest suffix of `text` that is a proper prefix of some stop string: that
// much must be held back, since the next token may complete the match.
size_t HeldBackForStops(const std::string& text, const std::vector<std::string>& stops) {
  size_t keep = 0;
  for (const std::string& s : stops) {
    const size_t max_len = std::min(text.size(), s.size() - 1);
    for (size_t len = max_len; len > keep; --len) {
      if (text.compare(text.size() - len, len, s, 0, len) == 0) {
        keep = len;
        break;
      }
    }
  }
  return keep;
}

// Position of the earliest stop string in `text`, or npos.
size_t FindStop(const std::string& text, const std::vector<std::string>& stops) {
  size_t best = std::string::npos;
  for (const std::string& s : stops) {
    const size_t p = text.find(s);
    if (p < best) best = p;
  }
  return best;
}

RequestOutcome OutcomeOf(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop:
      return RequestOutcome::kStop;
    case FinishReason::kLength:
      return RequestOutcome::kLength;
    case FinishReason::kAbort:
      return RequestOutcome::kAbort;
  }
  return RequestOutcome::kAbort;
}

double SecondsBetween(int64_t from_ns, int64_t to_ns) { return (to_ns - from_ns) / 1e9; }

StreamEvent FinalEvent(const GenerationFinal& f) {
  StreamEvent e;
  e.kind = StreamEvent::Kind::kFinal;
  e.final = f;
  return e;
}

}  // namespace

struct EngineLoop::Request {
  Request(uint64_t id, GenerationParams p, std::shared_ptr<RequestStream> s, int64_t submit,
          const Tokenizer& tok)
      : id(id),
        params(std::move(p)),
        stream(std::move(s)),
        sampler(params.sampling),
        decoder(tok, {.skip_special = true}),
        tokens(params.prompt),
        submit_ns(submit) {}

  uint64_t id;
  GenerationParams params;
  std::shared_ptr<RequestStream> stream;
  Sampler sampler;
  StreamDecoder decoder;
  std::vector<int32_t> tokens;  // prompt + generated; the last sampled one is fed next step
  int64_t generated = 0;
  SequenceId seq = 0;  // 0: no engine sequence (not admitted yet, or preempted)
  std::string held;    // decoded text not sent yet: it may start a stop string
  int64_t submit_ns = 0;
  int64_t scheduled_ns = 0;  // first time in a plan: the end of its queue time
  int64_t first_token_ns = 0;
  int64_t last_token_ns = 0;
  int64_t preemptions = 0;
  FinishReason reason = FinishReason::kStop;
  double total_logprob = 0;
  int64_t scored = 0;
};

// ---------------------------------------------------------------------------------------
// RequestStream

std::vector<StreamEvent> RequestStream::Wait(absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [&] { return !events_.empty(); });
  std::vector<StreamEvent> out(std::make_move_iterator(events_.begin()),
                               std::make_move_iterator(events_.end()));
  events_.clear();
  return out;
}

void RequestStream::Push(StreamEvent event) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (ended_) return;
    ended_ = event.kind != StreamEvent::Kind::kChunk;
    events_.push_back(std::move(event));
  }
  cv_.notify_all();
}

// ---------------------------------------------------------------------------------------
// EngineLoop

absl::StatusOr<std::unique_ptr<EngineLoop>> EngineLoop::Create(std::unique_ptr<Engine> engine,
                                                               const Tokenizer* tokenizer,
                                                               const EngineLoopConfig& config) {
  if (engine == nullptr) return absl::InvalidArgumentError("EngineLoop needs an engine");
  return Create(std::make_unique<LocalStepExecutor>(std::move(engine)), tokenizer, config);
}

absl::StatusOr<std::unique_ptr<EngineLoop>> EngineLoop::Create(
    std::unique_ptr<StepExecutor> executor, const Tokenizer* tokenizer,
    const EngineLoopConfig& config) {
  if (executor == nullptr || tokenizer == nullptr) {
    return absl::InvalidArgumentError("EngineLoop needs an engine and a tokenizer");
  }
  const Engine* engine = &executor->engine();
  if (engine->config().max_chunk_tokens < config.max_step_tokens) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "EngineLoopConfig.max_step_tokens (%d) exceeds the engine's max_chunk_tokens (%d): a "
        "prefill chunk must fit one engine step input",
        config.max_step_tokens, engine->config().max_chunk_tokens));
  }
  if (1 + static_cast<int>(config.more_kv_presets.size()) != engine->kv_cache_count()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("EngineLoopConfig names %d KV presets, the engine has %d KV caches",
                        1 + config.more_kv_presets.size(), engine->kv_cache_count()));
  }
  SchedulerConfig sc;
  for (int i = 0; i < engine->kv_cache_count(); ++i) {
    const KvCache& kv = engine->kv_cache(i);
    sc.pools.push_back({.name = i == 0 ? config.kv_preset : config.more_kv_presets[i - 1],
                        .n_blocks = kv.allocator().num_blocks(),
                        .block_tokens = kv.block_tokens(),
                        .elastic = kv.elastic()});
  }
  sc.max_step_tokens = config.max_step_tokens;
  sc.max_running = config.max_running;
  sc.max_queued = config.max_queued;
  sc.max_context = engine->model_config().context_length;
  auto scheduler = Scheduler::Create(sc);
  if (!scheduler.ok()) return scheduler.status();
  return std::unique_ptr<EngineLoop>(
      new EngineLoop(std::move(executor), tokenizer, config, std::move(*scheduler)));
}

EngineLoop::EngineLoop(std::unique_ptr<StepExecutor> executor, const Tokenizer* tokenizer,
                       const EngineLoopConfig& config, std::unique_ptr<Scheduler> scheduler)
    : executor_(std::move(executor)),
      tokenizer_(tokenizer),
      config_(config),
      model_config_(engine().model_config()),
      block_tokens_(engine().kv_cache().block_tokens()),
      capacity_tokens_(engine().kv_cache().capacity_tokens()),
      n_blocks_(engine().kv_cache().allocator().num_blocks()),
      tp_degree_(executor_->world_size()),
      scheduler_(std::move(scheduler)) {
  kv_presets_.push_back(config_.kv_preset);
  kv_presets_.insert(kv_presets_.end(), config_.more_kv_presets.begin(),
                     config_.more_kv_presets.end());
  PublishStats();
  thread_ = std::thread([this] { Run(); });
}

EngineLoop::~EngineLoop() { Shutdown(); }

int64_t EngineLoop::capacity_tokens(int kv_cache) const {
  return engine().kv_cache(kv_cache).capacity_tokens();
}

absl::StatusOr<int> EngineLoop::KvPresetIndex(const std::string& name) const {
  if (name.empty()) return 0;
  for (size_t i = 0; i < kv_presets_.size(); ++i) {
    if (kv_presets_[i] == name) return static_cast<int>(i);
  }
  return absl::NotFoundError(absl::StrFormat("KV preset '%s' is not served here; allowed: %s", name,
                                             absl::StrJoin(kv_presets_, ", ")));
}

absl::StatusOr<std::shared_ptr<RequestStream>> EngineLoop::Submit(GenerationParams p) {
  const int64_t n = static_cast<int64_t>(p.prompt.size());
  const int64_t ctx = model_config_.context_length;
  if (n == 0) return absl::InvalidArgumentError("GenerationParams.prompt is empty");
  for (size_t i = 0; i < p.prompt.size(); ++i) {
    if (p.prompt[i] < 0 || p.prompt[i] >= model_config_.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrFormat("GenerationParams.prompt[%d]: token id %d outside the vocabulary [0, %d)",
                          i, p.prompt[i], model_config_.vocab_size));
    }
  }
  if (p.score) {
    if (n < 2) {
      return absl::InvalidArgumentError("GenerationParams.prompt: scoring needs >= 2 tokens");
    }
    p.max_tokens = 1;  // the scheduler counts the scoring step as one sample
  }
  if (p.max_tokens < 1 || p.max_tokens > ctx) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "GenerationParams.max_tokens must be in [1, %d] (the context), got %d", ctx, p.max_tokens));
  }
  if (n > ctx - p.max_tokens) {
    return absl::InvalidArgumentError(
        absl::StrFormat("GenerationParams.prompt: %d tokens + max_tokens %d exceed the context of "
                        "%d tokens",
                        n, p.max_tokens, ctx));
  }
  if (p.kv_cache < 0 || p.kv_cache >= static_cast<int>(kv_presets_.size())) {
    return absl::InvalidArgumentError(
        absl::StrFormat("GenerationParams.kv_cache %d: the server has %d KV presets", p.kv_cache,
                        kv_presets_.size()));
  }
  const int64_t peak = scheduler_->BlocksFor(p.kv_cache, n + p.max_tokens - 1);
  const int32_t pool_blocks = engine().kv_cache(p.kv_cache).allocator().num_blocks();
  if (peak > pool_blocks) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "GenerationParams.prompt + max_tokens: %d tokens need %d KV blocks, the %s pool has %d",
        n + p.max_tokens - 1, peak, kv_presets_[p.kv_cache], pool_blocks));
  }
  if (absl::Status s = ValidateSamplingParams(p.sampling); !s.ok()) return s;
  if (p.logprobs < 0 || p.logprobs > kMaxLogprobs) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "GenerationParams.logprobs must be in [0, %d], got %d", kMaxLogprobs, p.logprobs));
  }
  for (const std::string& s : p.stop) {
    if (s.empty()) return absl::InvalidArgumentError("GenerationParams.stop: empty stop string");
  }

  std::lock_guard<std::mutex> lock(mu_);
  if (stop_) return absl::UnavailableError("the server is shutting down");
  if (waiting_ + static_cast<int64_t>(pending_.size()) >= config_.max_queued) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("request queue is full (max_queued=%d); retry later", config_.max_queued));
  }
  const uint64_t id = next_id_++;
  if (p.request_id.empty()) p.request_id = absl::StrFormat("req-%d", id);
  if (live_ids_.contains(p.request_id)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("GenerationParams.request_id '%s' is already live", p.request_id));
  }
  auto stream = std::make_shared<RequestStream>(p.request_id);
  live_ids_[p.request_id] = {.id = id, .stream = stream};
  pending_.push_back(
      {.id = id, .params = std::move(p), .stream = stream, .submit_ns = MonotonicNowNs()});
  cv_.notify_one();
  return stream;
}

bool EngineLoop::Abort(const std::string& request_id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_ids_.find(request_id);
  if (it == live_ids_.end()) return false;
  aborts_.push_back(it->second.id);
  cv_.notify_one();
  return true;
}

void EngineLoop::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_one();
  if (thread_.joinable()) thread_.join();
  executor_->Shutdown();
}

void EngineLoop::FailAllNow(const absl::Status& error) {
  std::vector<std::shared_ptr<RequestStream>> streams;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    for (const auto& [name, live] : live_ids_) streams.push_back(live.stream);
  }
  cv_.notify_one();
  for (const std::shared_ptr<RequestStream>& stream : streams) {
    StreamEvent e;
    e.kind = StreamEvent::Kind::kError;
    e.error = error;
    stream->Push(std::move(e));
  }
}

EngineLoopStats EngineLoop::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void EngineLoop::Run() {
  bool busy = false;
  while (true) {
    std::vector<Pending> submissions;
    std::vector<uint64_t> aborts;
    bool stopping = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Idle: block until there is something to do (never spin).
      cv_.wait(lock, [&] { return stop_ || busy || !pending_.empty() || !aborts_.empty(); });
      submissions.swap(pending_);
      aborts.swap(aborts_);
      stopping = stop_;
    }
    for (Pending& p : submissions) Admit(std::move(p));
    for (uint64_t id : aborts) AbortLive(id);
    if (stopping) {
      std::vector<uint64_t> live;
      for (const auto& [id, r] : requests_) live.push_back(id);
      for (uint64_t id : live) AbortLive(id);
      PublishStats();
      return;
    }
    busy = RunStep();
    PublishStats();
  }
}

void EngineLoop::Admit(Pending p) {
  RequestSpec spec{.id = p.id,
                   .pool = p.params.kv_cache,
                   .prompt_tokens = static_cast<int64_t>(p.params.prompt.size()),
                   .max_new_tokens = p.params.max_tokens,
                   .priority = p.params.priority};
  if (absl::Status s = scheduler_->Submit(spec); !s.ok()) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_ids_.erase(p.params.request_id);
    }
    StreamEvent e;
    e.kind = StreamEvent::Kind::kError;
    e.error = s;
    p.stream->Push(std::move(e));
    return;
  }
  auto r = std::make_unique<Request>(p.id, std::move(p.params), std::move(p.stream), p.submit_ns,
                                     *tokenizer_);
  requests_.emplace(p.id, std::move(r));
}

void EngineLoop::AbortLive(uint64_t id) {
  auto it = requests_.find(id);
  if (it == requests_.end()) return;  // finished meanwhile
  (void)scheduler_->Cancel(id);
  // Text held back for a possible stop string is still output the client paid for.
  Request& r = *it->second;
  if (!r.held.empty()) {
    StreamEvent e;
    e.text = std::move(r.held);
    r.held.clear();
    r.stream->Push(std::move(e));
  }
  Finish(r, FinishReason::kAbort);
}

void EngineLoop::ReleaseEngineSequence(Request& r) {
  if (r.seq != 0) {
    (void)executor_->Release(r.seq);
    r.seq = 0;
  }
}

void EngineLoop::Finish(Request& r, FinishReason reason) {
  GenerationFinal f;
  f.reason = reason;
  f.prompt_tokens = static_cast<int64_t>(r.params.prompt.size());
  f.generated_tokens = r.params.score ? 0 : r.generated;
  if (r.first_token_ns > 0) {
    f.ttft_ms = (r.first_token_ns - r.submit_ns) / 1e6;
    if (r.generated > 1 && r.last_token_ns > r.first_token_ns) {
      f.tokens_per_s = (r.generated - 1) / ((r.last_token_ns - r.first_token_ns) / 1e9);
    }
  }
  const int64_t cached = std::max<int64_t>(1, static_cast<int64_t>(r.tokens.size()) - 1);
  f.kv_bits_per_element = engine().kv_cache(r.params.kv_cache).BitsPerElementAt(cached);
  // What the sequence holds now, requantized blocks at their size.
  if (r.seq != 0) {
    absl::StatusOr<double> held = engine().SequenceKvBits(r.seq);
    if (held.ok() && *held > 0) f.kv_bits_per_element = *held;
  }
  f.preemptions = r.preemptions;
  f.total_logprob = r.total_logprob;
  f.scored_tokens = r.scored;
  if (ServingMetrics* m = config_.metrics) {
    m->ObserveE2eLatency(SecondsBetween(r.submit_ns, MonotonicNowNs()));
    m->RequestFinished(OutcomeOf(reason));
  }
  ReleaseEngineSequence(r);
  r.stream->Push(FinalEvent(f));
  {
    std::lock_guard<std::mutex> lock(mu_);
    live_ids_.erase(r.params.request_id);
  }
  const uint64_t id = r.id;
  requests_.erase(id);  // r is gone
}

void EngineLoop::Fail(Request& r, const absl::Status& status) {
  if (config_.metrics != nullptr) config_.metrics->RequestFinished(RequestOutcome::kError);
  ReleaseEngineSequence(r);
  StreamEvent e;
  e.kind = StreamEvent::Kind::kError;
  e.error = status;
  r.stream->Push(std::move(e));
  {
    std::lock_guard<std::mutex> lock(mu_);
    live_ids_.erase(r.params.request_id);
  }
  const uint64_t id = r.id;
  requests_.erase(id);  // r is gone
}

bool EngineLoop::SampleNext(Request& r, std::span<float> row) {
  StreamEvent chunk;
  // Logprobs describe the model's distribution, so they are taken before the sampler
  // applies penalties and temperature in place.
  std::optional<std::vector<float>> raw;
  if (r.params.logprobs > 0) raw.emplace(row.begin(), row.end());
  const int32_t tok = r.sampler.Sample(row, r.tokens);
  if (raw) chunk.logprobs.push_back(ComputeLogprobs(*raw, tok, r.params.logprobs));
  r.tokens.push_back(tok);
  ++r.generated;
  const int64_t now = MonotonicNowNs();
  if (ServingMetrics* m = config_.metrics) {
    if (r.first_token_ns == 0) {
      // The first token also means the prompt's prefill completed (counted once, as vLLM
      // does: a recompute after preemption is not new prompt work).
      m->ObserveTimeToFirstToken(SecondsBetween(r.submit_ns, now));
      m->AddPromptTokens(static_cast<int64_t>(r.params.prompt.size()));
    } else {
      m->ObserveInterTokenLatency(SecondsBetween(r.last_token_ns, now));
    }
  }
  r.last_token_ns = now;
  if (r.first_token_ns == 0) r.first_token_ns = now;

  const bool stop_token = (!r.params.ignore_eos && tokenizer_->IsEog(tok)) ||
                          std::find(r.params.stop_token_ids.begin(), r.params.stop_token_ids.end(),
                                    tok) != r.params.stop_token_ids.end();
  bool done = false;
  if (stop_token) {
    // The stop token itself is not output; what was held back for stop strings is.
    r.held += r.decoder.Flush();
    chunk.text = std::move(r.held);
    r.reason = FinishReason::kStop;
    done = true;
  } else {
    chunk.token_ids.push_back(tok);
    absl::StatusOr<std::string> piece = r.decoder.Push(tok);
    if (piece.ok()) r.held += *piece;
    const bool last = r.generated >= r.params.max_tokens;
    if (last) r.held += r.decoder.Flush();
    const size_t stop_at = FindStop(r.held, r.params.stop);
    if (stop_at != std::string::npos) {
      chunk.text = r.held.substr(0, stop_at);
      r.reason = FinishReason::kStop;
      done = true;
    } else if (last) {
      chunk.text = std::move(r.held);
      r.reason = FinishReason::kLength;
      done = true;
    } else {
      const size_t keep = HeldBackForStops(r.held, r.params.stop);
      chunk.text = r.held.substr(0, r.held.size() - keep);
      r.held.erase(0, r.held.size() - keep);
    }
  }
  if (done) r.held.clear();
  if (!chunk.text.empty() || !chunk.token_ids.empty()) r.stream->Push(std::move(chunk));
  return done;
}

bool EngineLoop::RunStep() {
  StepPlan plan = scheduler_->Schedule();
  for (uint64_t id : plan.preempted) {
    Request& r = *requests_.at(id);
    ReleaseEngineSequence(r);
    ++r.preemptions;
    r.total_logprob = 0;  // a score request recomputes from the start
    r.scored = 0;
  }
  if (config_.metrics != nullptr && !plan.preempted.empty()) {
    config_.metrics->AddPreemptions(static_cast<int64_t>(plan.preempted.size()));
  }
  if (plan.items.empty()) return false;
  absl::Status requantized;
  for (const SeqRequantize& q : plan.requantize) {
    auto it = requests_.find(q.id);
    if (it == requests_.end() || it->second->seq == 0) continue;  // cancelled since
    requantized = executor_->RequantizeOldest(it->second->seq, q.pairs);
    if (!requantized.ok()) break;
  }

  std::vector<StepInput> inputs;
  inputs.reserve(plan.items.size());
  for (const SeqWork& w : plan.items) {
    Request& r = *requests_.at(w.id);
    // The index was checked at Submit, so this cannot fail.
    if (r.seq == 0) r.seq = *executor_->NewSequenceIn(r.params.kv_cache);
    if (r.scheduled_ns == 0) {
      r.scheduled_ns = MonotonicNowNs();
      if (config_.metrics != nullptr) {
        config_.metrics->ObserveQueueTime(SecondsBetween(r.submit_ns, r.scheduled_ns));
      }
    }
    inputs.push_back({.seq = r.seq,
                      .tokens = std::span<const int32_t>(r.tokens.data() + w.start_pos,
                                                         static_cast<size_t>(w.n_tokens)),
                      .all_logits = r.params.score});
  }
  // Reused across steps (megabytes for a batch; a fresh vector page-faults every step).
  std::vector<float>& logits = logits_;
  logits.clear();
  absl::Status step = requantized.ok() ? executor_->Step(inputs, &logits) : requantized;
  std::vector<SeqResult> results;
  std::vector<uint64_t> finished;
  int64_t sampled = 0;
  if (step.ok()) {
    const int64_t V = model_config_.vocab_size;
    size_t row = 0;
    for (size_t i = 0; i < plan.items.size(); ++i) {
      const SeqWork& w = plan.items[i];
      Request& r = *requests_.at(w.id);
      const int64_t rows = inputs[i].all_logits ? w.n_tokens : 1;
      float* base = logits.data() + row * V;
      row += rows;
      if (r.params.score) {
        const int64_t n = static_cast<int64_t>(r.params.prompt.size());
        for (int64_t j = 0; j < rows; ++j) {
          const int64_t pos = w.start_pos + j;
          if (pos + 1 >= n) break;
          std::span<const float> lr(base + j * V, V);
          r.total_logprob += lr[r.params.prompt[pos + 1]] - LogSumExp(lr);
          ++r.scored;
        }
        if (w.samples) {
          if (config_.metrics != nullptr) config_.metrics->AddPromptTokens(n);
          results.push_back({.id = w.id, .finished = true});
          r.reason = FinishReason::kStop;
          finished.push_back(w.id);
        }
        continue;
      }
      if (!w.samples) continue;
      ++sampled;
      const bool done = SampleNext(r, std::span<float>(base, V));
      results.push_back({.id = w.id, .finished = done});
      if (done) finished.push_back(w.id);
    }
    step = scheduler_->Commit(plan, results);
  }
  if (!step.ok()) {
    // An engine failure (or a bookkeeping bug) fails the requests of this plan only.
    for (const SeqWork& w : plan.items) (void)scheduler_->Cancel(w.id);
    (void)scheduler_->Commit(plan, {});
    for (const SeqWork& w : plan.items) {
      auto it = requests_.find(w.id);
      if (it != requests_.end()) Fail(*it->second, step);
    }
    return true;
  }
  for (uint64_t id : finished) {
    Request& r = *requests_.at(id);
    Finish(r, r.reason);
  }
  if (sampled > 0) {
    generated_total_ += sampled;
    recent_tokens_.emplace_back(MonotonicNowNs(), sampled);
    if (config_.metrics != nullptr) config_.metrics->AddGenerationTokens(sampled);
  }
  return true;
}

void EngineLoop::PublishStats() {
  const int64_t now = MonotonicNowNs();
  while (!recent_tokens_.empty() && recent_tokens_.front().first < now - kRateWindowNs) {
    recent_tokens_.pop_front();
  }
  int64_t recent = 0;
  for (const auto& [t, n] : recent_tokens_) recent += n;
  EngineLoopStats st;
  st.scheduler = scheduler_->Stats();
  for (int i = 0; i < engine().kv_cache_count(); ++i) {
    const KvCache& kv = engine().kv_cache(i);
    st.kv_requantized_bytes_freed += kv.requantized_blocks() / 2 * kv.block_bytes_all_layers();
  }
  st.generated_tokens = generated_total_;
  st.generated_tokens_per_s = recent / (kRateWindowNs / 1e9);
  st.kv_bytes_per_token = engine().kv_cache().BytesPerTokenAt(model_config_.context_length);
  for (int i = 0; i < engine().kv_cache_count(); ++i) {
    st.pool_bytes_per_token.push_back(
        engine().kv_cache(i).BytesPerTokenAt(model_config_.context_length));
  }
  if (const moe::ExpertPrecisionPolicy* policy = engine().expert_policy()) {
    const moe::ExpertPrecisionStats ps = policy->Stats();
    for (const moe::ExpertPrecisionStat& e : ps.experts) {
      const int level = engine().expert_level(e.layer, e.expert);
      EngineLoopStats::Expert x;
      x.layer = e.layer;
      x.expert = e.expert;
      x.load = e.frequency;
      x.mean_weight = e.mean_weight;
      x.precision =
          std::string(kernels::GgmlTypeInfoOf(engine().config().expert_levels[level]).name);
      x.bytes = e.bytes;
      x.changes = e.changes;
      st.experts.push_back(std::move(x));
    }
    st.expert_bytes_active = engine().active_expert_bytes();
    st.expert_budget_bytes = ps.budget_bytes;
    st.expert_changes = ps.changes;
  }
  st.ranks = executor_->StepTotals();
  std::lock_guard<std::mutex> lock(mu_);
  waiting_ = st.scheduler.queued;
  if (ServingMetrics* m = config_.metrics) {
    m->SetRunning(st.scheduler.running);
    // Submitted but not yet handed to the scheduler is waiting too, as far as a client sees.
    m->SetWaiting(st.scheduler.queued + static_cast<int64_t>(pending_.size()));
    // The fraction of the KV budget held: each preset's pool has an equal share of it.
    double usage = 0;
    for (const PoolStats& pool : st.scheduler.pools) {
      if (pool.n_blocks > 0) usage += static_cast<double>(pool.blocks_used) / pool.n_blocks;
    }
    m->SetKvCacheUsage(usage / static_cast<double>(st.scheduler.pools.size()));
  }
  stats_ = std::move(st);
}

}  // namespace quantkv
