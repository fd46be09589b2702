#include "runtime/serve/serving_metrics.h"

#include <algorithm>
#include <charconv>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace quantkv {
namespace {

bool IsNameStart(char c, bool colon_ok) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (colon_ok && c == ':');
}
bool IsNameChar(char c, bool colon_ok) {
  return IsNameStart(c, colon_ok) || (c >= '0' && c <= '9');
}

// Metric names may contain ':' (recording-rule style, and vLLM's prefix); label names may not.
bool ValidName(std::string_view s, bool colon_ok) {
  if (s.empty() || !IsNameStart(s[0], colon_ok)) return false;
  return std::all_of(s.begin() + 1, s.end(), [&](char c) { return IsNameChar(c, colon_ok); });
}

// The shortest text that reads back as the same double; Prometheus' spellings of the
// non-finite values.
std::string FormatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  return std::string(buf, ec == std::errc() ? end : buf);
}

// HELP text escapes backslash and newline; label values also the double quote.
std::string Escape(std::string_view s, bool quote) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (quote && c == '"') {
      out += "\\\"";
    } else {
      out += c;
    }
  }
  return out;
}

// `{a="x",b="y"}`, with `le` appended for histogram buckets; empty for no labels.
std::string LabelText(const MetricLabels& labels, const std::string* le = nullptr) {
  if (labels.empty() && le == nullptr) return "";
  std::string out = "{";
  for (const auto& [k, v] : labels) {
    if (out.size() > 1) out += ',';
    absl::StrAppend(&out, k, "=\"", Escape(v, true), "\"");
  }
  if (le != nullptr) {
    if (out.size() > 1) out += ',';
    absl::StrAppend(&out, "le=\"", *le, "\"");
  }
  out += '}';
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Counter, Histogram

void Counter::Increment(double amount) {
  if (!(amount >= 0)) return;  // also NaN
  value_.fetch_add(amount, std::memory_order_relaxed);
}

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::Observe(double v) {
  if (std::isnan(v)) return;
  // First bound >= v: `le` is inclusive.
  const size_t i = std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin();
  std::lock_guard<std::mutex> lock(mu_);
  ++counts_[i];
  sum_ += v;
  ++count_;
}

Histogram::Snapshot Histogram::Read() const {
  Snapshot s;
  s.bounds = bounds_;
  std::lock_guard<std::mutex> lock(mu_);
  s.cumulative.resize(counts_.size());
  uint64_t acc = 0;
  for (size_t i = 0; i < counts_.size(); ++i) s.cumulative[i] = acc += counts_[i];
  s.sum = sum_;
  s.count = count_;
  return s;
}

// ---------------------------------------------------------------------------------------
// MetricsRegistry

absl::StatusOr<MetricsRegistry::Family*> MetricsRegistry::FamilyFor(std::string_view name,
                                                                    std::string_view help,
                                                                    Type type,
                                                                    const MetricLabels& labels) {
  if (!ValidName(name, /*colon_ok=*/true)) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid metric name '", std::string(name), "'"));
  }
  // Prometheus' convention; vLLM's counters all follow it, and a counter without it would
  // not match the names dashboards expect.
  if (type == Type::kCounter && !(name.size() > 6 && name.substr(name.size() - 6) == "_total")) {
    return absl::InvalidArgumentError(
        absl::StrCat("counter name '", std::string(name), "' must end in _total"));
  }
  for (size_t i = 0; i < labels.size(); ++i) {
    const std::string& k = labels[i].first;
    if (!ValidName(k, /*colon_ok=*/false) || k.starts_with("__")) {
      return absl::InvalidArgumentError(
          absl::StrCat("metric '", std::string(name), "': invalid label name '", k, "'"));
    }
    if (type == Type::kHistogram && k == "le") {
      return absl::InvalidArgumentError(absl::StrCat("histogram '", std::string(name),
                                                     "': the label 'le' is reserved for buckets"));
    }
    for (size_t j = 0; j < i; ++j) {
      if (labels[j].first == k) {
        return absl::InvalidArgumentError(
            absl::StrCat("metric '", std::string(name), "': label '", k, "' given twice"));
      }
    }
  }
  for (const auto& f : families_) {
    if (f->name != name) continue;
    if (f->type != type) {
      return absl::InvalidArgumentError(
          absl::StrCat("metric '", std::string(name), "' is already registered with another type"));
    }
    for (const Series& s : f->series) {
      if (s.labels == labels) {
        return absl::InvalidArgumentError(absl::StrCat(
            "metric '", std::string(name), LabelText(labels), "' is already registered"));
      }
    }
    return f.get();
  }
  auto f = std::make_unique<Family>();
  f->name = std::string(name);
  f->help = std::string(help);
  f->type = type;
  families_.push_back(std::move(f));
  return families_.back().get();
}

absl::StatusOr<Counter*> MetricsRegistry::AddCounter(std::string_view name, std::string_view help,
                                                     const MetricLabels& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  absl::StatusOr<Family*> f = FamilyFor(name, help, Type::kCounter, labels);
  if (!f.ok()) return f.status();
  Series s;
  s.labels = labels;
  s.counter = std::make_unique<Counter>();
  Counter* out = s.counter.get();
  (*f)->series.push_back(std::move(s));
  return out;
}

absl::StatusOr<Gauge*> MetricsRegistry::AddGauge(std::string_view name, std::string_view help,
                                                 const MetricLabels& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  absl::StatusOr<Family*> f = FamilyFor(name, help, Type::kGauge, labels);
  if (!f.ok()) return f.status();
  Series s;
  s.labels = labels;
  s.gauge = std::make_unique<Gauge>();
  Gauge* out = s.gauge.get();
  (*f)->series.push_back(std::move(s));
  return out;
}

absl::StatusOr<Histogram*> MetricsRegistry::AddHistogram(std::string_view name,
                                                         std::string_view help,
                                                         std::vector<double> bounds,
                                                         const MetricLabels& labels) {
  for (size_t i = 0; i < bounds.size(); ++i) {
    if (!std::isfinite(bounds[i]) || (i > 0 && !(bounds[i] > bounds[i - 1]))) {
      return absl::InvalidArgumentError(
          absl::StrCat("histogram '", std::string(name),
                       "': bucket bounds must be finite and strictly increasing"));
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  absl::StatusOr<Family*> f = FamilyFor(name, help, Type::kHistogram, labels);
  if (!f.ok()) return f.status();
  Series s;
  s.labels = labels;
  s.histogram = std::make_unique<Histogram>(std::move(bounds));
  Histogram* out = s.histogram.get();
  (*f)->series.push_back(std::move(s));
  return out;
}

std::string MetricsRegistry::RenderText() const {
  std::string out;
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& f : families_) {
    const char* type = f->type == Type::kCounter ? "counter"
                       : f->type == Type::kGauge ? "gauge"
                                                 : "histogram";
    absl::StrAppend(&out, "# HELP ", f->name, " ", Escape(f->help, false), "\n", "# TYPE ", f->name,
                    " ", type, "\n");
    for (const Series& s : f->series) {
      if (s.counter) {
        absl::StrAppend(&out, f->name, LabelText(s.labels), " ", FormatValue(s.counter->value()),
                        "\n");
      } else if (s.gauge) {
        absl::StrAppend(&out, f->name, LabelText(s.labels), " ", FormatValue(s.gauge->value()),
                        "\n");
      } else {
        const Histogram::Snapshot h = s.histogram->Read();
        for (size_t i = 0; i <= h.bounds.size(); ++i) {
          const std::string le = i < h.bounds.size() ? FormatValue(h.bounds[i]) : "+Inf";
          absl::StrAppend(&out, f->name, "_bucket", LabelText(s.labels, &le), " ", h.cumulative[i],
                          "\n");
        }
        absl::StrAppend(&out, f->name, "_sum", LabelText(s.labels), " ", FormatValue(h.sum), "\n",
                        f->name, "_count", LabelText(s.labels), " ", h.count, "\n");
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// ServingMetrics

namespace {

// vLLM's bucket bounds, so that quantiles computed from either server compare directly.
const std::vector<double>& TtftBuckets() {
  static const std::vector<double> b = {0.001, 0.005, 0.01, 0.02,  0.04,  0.06,  0.08, 0.1,
                                        0.25,  0.5,   0.75, 1.0,   2.5,   5.0,   7.5,  10.0,
                                        20.0,  40.0,  80.0, 160.0, 640.0, 2560.0};
  return b;
}
const std::vector<double>& InterTokenBuckets() {
  static const std::vector<double> b = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,  0.3,  0.4, 0.5,
                                        0.75, 1.0,   2.5,  5.0,   7.5, 10.0, 20.0, 40.0, 80.0};
  return b;
}
const std::vector<double>& RequestLatencyBuckets() {
  static const std::vector<double> b = {0.3,  0.5,   0.8,   1.0,   1.5,   2.0,    2.5,
                                        5.0,  10.0,  15.0,  20.0,  30.0,  40.0,   50.0,
                                        60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};
  return b;
}

constexpr const char* kOutcomeNames[] = {"stop", "length", "abort", "error"};

}  // namespace

absl::StatusOr<std::unique_ptr<ServingMetrics>> ServingMetrics::Create(std::string model_name) {
  std::unique_ptr<ServingMetrics> m(new ServingMetrics());
  MetricLabels base;
  if (!model_name.empty()) base.emplace_back("model_name", std::move(model_name));
  MetricsRegistry& r = m->registry_;

  // Gauges first, as vLLM lists them: the state that explains the latencies below.
  auto running = r.AddGauge("quantkv:num_requests_running",
                            "Number of requests in the engine's batch (holding KV blocks).", base);
  auto waiting =
      r.AddGauge("quantkv:num_requests_waiting", "Number of requests queued for admission.", base);
  auto kv = r.AddGauge("quantkv:kv_cache_usage_perc",
                       "Fraction of KV cache blocks in use (0 to 1).", base);
  auto preempt = r.AddCounter("quantkv:num_preemptions_total",
                              "Cumulative number of preemptions (by recompute).", base);
  auto prompt =
      r.AddCounter("quantkv:prompt_tokens_total", "Number of prefill tokens processed.", base);
  auto gen = r.AddCounter("quantkv:generation_tokens_total",
                          "Number of generation tokens processed.", base);
  for (int i = 0; i < 4; ++i) {
    MetricLabels l = base;
    l.emplace_back("finished_reason", kOutcomeNames[i]);
    auto c = r.AddCounter("quantkv:request_success_total",
                          "Count of finished requests, by finish reason.", l);
    if (!c.ok()) return c.status();
    m->success_[i] = *c;
  }
  auto ttft = r.AddHistogram("quantkv:time_to_first_token_seconds",
                             "Histogram of time to first token in seconds.", TtftBuckets(), base);
  auto itl =
      r.AddHistogram("quantkv:inter_token_latency_seconds",
                     "Histogram of inter-token latency in seconds.", InterTokenBuckets(), base);
  auto e2e = r.AddHistogram("quantkv:e2e_request_latency_seconds",
                            "Histogram of end-to-end request latency in seconds.",
                            RequestLatencyBuckets(), base);
  auto queue = r.AddHistogram("quantkv:request_queue_time_seconds",
                              "Histogram of time spent waiting for admission, in seconds.",
                              RequestLatencyBuckets(), base);
  for (const absl::Status& s :
       {running.status(), waiting.status(), kv.status(), preempt.status(), prompt.status(),
        gen.status(), ttft.status(), itl.status(), e2e.status(), queue.status()}) {
    if (!s.ok()) return s;
  }
  m->running_ = *running;
  m->waiting_ = *waiting;
  m->kv_usage_ = *kv;
  m->preemptions_ = *preempt;
  m->prompt_tokens_ = *prompt;
  m->generation_tokens_ = *gen;
  m->ttft_ = *ttft;
  m->itl_ = *itl;
  m->e2e_ = *e2e;
  m->queue_time_ = *queue;
  return m;
}

void ServingMetrics::ObserveQueueTime(double seconds) { queue_time_->Observe(seconds); }
void ServingMetrics::ObserveTimeToFirstToken(double seconds) { ttft_->Observe(seconds); }
void ServingMetrics::ObserveInterTokenLatency(double seconds) { itl_->Observe(seconds); }
void ServingMetrics::ObserveE2eLatency(double seconds) { e2e_->Observe(seconds); }
void ServingMetrics::RequestFinished(RequestOutcome outcome) {
  success_[static_cast<int>(outcome)]->Increment();
}
void ServingMetrics::AddPromptTokens(int64_t n) { prompt_tokens_->Increment(n); }
void ServingMetrics::AddGenerationTokens(int64_t n) { generation_tokens_->Increment(n); }
void ServingMetrics::AddPreemptions(int64_t n) { preemptions_->Increment(n); }
void ServingMetrics::SetRunning(int64_t n) { running_->Set(n); }
void ServingMetrics::SetWaiting(int64_t n) { waiting_->Set(n); }
void ServingMetrics::SetKvCacheUsage(double fraction) { kv_usage_->Set(fraction); }

}  // namespace quantkv
