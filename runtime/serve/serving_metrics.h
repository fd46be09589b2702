// Serving metrics in the Prometheus text exposition format 0.0.4, with vLLM's names under a
// `quantkv:` prefix (vllm:time_to_first_token_seconds -> quantkv:time_to_first_token_seconds)
// so that dashboards and alerts written for vLLM need only the prefix changed.
//
// MetricsRegistry is a small thread-safe registry of counters, gauges and fixed-bucket
// histograms; it knows nothing of gRPC or HTTP (metrics_http.h serves its text).
// ServingMetrics registers the serving set on one and is what the engine loop records into.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace quantkv {

// Label (name, value) pairs of one series, rendered in this order.
using MetricLabels = std::vector<std::pair<std::string, std::string>>;

// Monotonically non-decreasing. Lock-free: it is bumped on the engine thread every step.
class Counter {
 public:
  // Negative or NaN amounts are ignored: a counter that went down would read as a process
  // restart to Prometheus' rate().
  void Increment(double amount = 1.0);
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

class Gauge {
 public:
  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  void Add(double delta) { value_.fetch_add(delta, std::memory_order_relaxed); }
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

// Buckets with fixed upper bounds (inclusive, as Prometheus' `le`); +Inf is implicit.
class Histogram {
 public:
  struct Snapshot {
    std::vector<double> bounds;        // without +Inf
    std::vector<uint64_t> cumulative;  // per bound, then one more for +Inf (== count)
    double sum = 0;
    uint64_t count = 0;
  };

  // `bounds` must be finite and strictly increasing (MetricsRegistry checks).
  explicit Histogram(std::vector<double> bounds);
  // NaN is ignored (it would poison _sum forever).
  void Observe(double v);
  // Consistent: count equals the +Inf bucket and sum belongs to the same observations.
  Snapshot Read() const;

 private:
  const std::vector<double> bounds_;
  mutable std::mutex mu_;
  std::vector<uint64_t> counts_;  // per bucket (not cumulative), last one is +Inf
  double sum_ = 0;
  uint64_t count_ = 0;
};

class MetricsRegistry {
 public:
  MetricsRegistry() = default;
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;

  // Registers one series of the family `name` (created on first use with `help`). The
  // returned pointer lives as long as the registry. INVALID_ARGUMENT for a name or label
  // name that Prometheus would reject, a family re-registered with another type, a counter
  // name without the `_total` suffix, a label set already registered, the reserved `le`
  // label on a histogram, or histogram bounds that are not finite and strictly increasing.
  absl::StatusOr<Counter*> AddCounter(std::string_view name, std::string_view help,
                                      const MetricLabels& labels = {});
  absl::StatusOr<Gauge*> AddGauge(std::string_view name, std::string_view help,
                                  const MetricLabels& labels = {});
  absl::StatusOr<Histogram*> AddHistogram(std::string_view name, std::string_view help,
                                          std::vector<double> bounds,
                                          const MetricLabels& labels = {});

  // The text exposition format 0.0.4: families in registration order, each with its
  // `# HELP` and `# TYPE` lines, then its series in registration order.
  std::string RenderText() const;

 private:
  enum class Type { kCounter, kGauge, kHistogram };
  struct Series {
    MetricLabels labels;
    std::unique_ptr<Counter> counter;
    std::unique_ptr<Gauge> gauge;
    std::unique_ptr<Histogram> histogram;
  };
  struct Family {
    std::string name;
    std::string help;
    Type type;
    std::vector<Series> series;
  };

  // The family to add a series with `labels` to, created if new; checks names and type.
  absl::StatusOr<Family*> FamilyFor(std::string_view name, std::string_view help, Type type,
                                    const MetricLabels& labels);

  // Guards the family list only: series values have their own synchronization, so
  // recording never takes this lock.
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<Family>> families_;
};

// How a request left the engine, as vLLM's `finished_reason` label spells it.
enum class RequestOutcome { kStop, kLength, kAbort, kError };

// The `quantkv:` serving metrics. Every method is thread-safe; the engine loop calls the
// recording ones from its thread and the HTTP server calls Render() from its own.
class ServingMetrics {
 public:
  // `model_name` non-empty: every series carries a model_name label with it (as vLLM's
  // do), so several servers can share one Prometheus job.
  static absl::StatusOr<std::unique_ptr<ServingMetrics>> Create(std::string model_name = "");

  // Request-level intervals, in seconds, from a monotonic clock.
  void ObserveQueueTime(double seconds);          // submitted -> first scheduled
  void ObserveTimeToFirstToken(double seconds);   // submitted -> first token
  void ObserveInterTokenLatency(double seconds);  // one token -> the next
  void ObserveE2eLatency(double seconds);         // submitted -> finished
  void RequestFinished(RequestOutcome outcome);

  void AddPromptTokens(int64_t n);
  void AddGenerationTokens(int64_t n);
  void AddPreemptions(int64_t n);

  // Engine state after a step.
  void SetRunning(int64_t n);
  void SetWaiting(int64_t n);
  void SetKvCacheUsage(double fraction);  // used KV blocks / all, in [0, 1]

  std::string Render() const { return registry_.RenderText(); }
  const MetricsRegistry& registry() const { return registry_; }

 private:
  ServingMetrics() = default;

  MetricsRegistry registry_;
  Histogram* queue_time_ = nullptr;
  Histogram* ttft_ = nullptr;
  Histogram* itl_ = nullptr;
  Histogram* e2e_ = nullptr;
  Counter* success_[4] = {};  // by RequestOutcome
  Counter* prompt_tokens_ = nullptr;
  Counter* generation_tokens_ = nullptr;
  Counter* preemptions_ = nullptr;
  Gauge* running_ = nullptr;
  Gauge* waiting_ = nullptr;
  Gauge* kv_usage_ = nullptr;
};

}  // namespace quantkv
