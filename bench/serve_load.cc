// serve_load: load benchmark of the gRPC generation service. For each KV preset it starts
// the server in-process (real gRPC over loopback), then N client threads each keep one
// streaming Generate in flight (closed loop; N = 1, 4, 16, 64), with prompts cut from
// WikiText-2 at random offsets and output lengths drawn from a range (ignore_eos, so the
// length is what was asked). Reports, with vLLM benchmark_serving's definitions: request
// throughput, output tokens/s, TTFT, TPOT (per request: (e2e - ttft) / (out - 1)) and ITL
// (gaps between streamed chunks) p50/p90/p99. The bound of the same run is the single
// stream: the target is aggregate output tok/s at 16 streams >= 4x one stream.
// Second part: how many 2048-token sequences each preset's cache admits under one KV byte
// budget (Reserve until the pool is full), against fp16 (target: 4-bit >= 3.5x).
// Optional open loop (--request-rates): requests arrive as a Poisson process at each given
// rate, whatever the server's progress, as vLLM benchmark_serving's --request-rate does; a
// closed loop never offers more than the server finishes, so it hides queueing delay.
//
//   build/bench/serve_load [--presets fp16,int4-comp,int2-comp] [--streams 1,4,16,64]
//                          [--threads 2] [--text FILE] [--out bench/results] [--quick]
//                          [--prefill-gemm]  (SGEMM for steps of >= 8 rows, as the serve flag)
//                          [--prompt-tokens 32-96] [--output-tokens 32-64]  (uniform ranges)
//                          [--request-rates 2,4,8]  (requests/s; none by default)
//                          [--rate-requests 32]  (requests per rate; 8 with --quick)
//                          [--max-in-flight 256] [--seed 1]  (open-loop cap and arrival seed)
// `--streams ""` runs the open loop only.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <limits>
#include <random>
#include <semaphore>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/results.h"
#include "grpcpp/grpcpp.h"
#include "launcher/model_session.h"
#include "nlohmann/json.hpp"
#include "quantkv/v1/generation.grpc.pb.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/serve/engine_loop.h"
#include "runtime/serve/generation_server.h"

namespace quantkv::bench {
namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::vector<std::string> presets = {"fp16", "int4-comp", "int2-comp"};
  std::vector<int> streams = {1, 4, 16, 64};
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::string text = "../shared/data/wikitext-2/test.txt";
  std::string out = "bench/results";
  int prompt_min = 32, prompt_max = 96;  // tokens
  int output_min = 32, output_max = 64;  // tokens
  int64_t budget_mb = 512;               // second part: KV pool budget
  bool prefill_gemm = false;             // `quantkv serve --prefill-gemm`: SGEMM for many rows
  // Open loop: Poisson arrival rates (requests/s); empty: closed loop only, as before.
  std::vector<double> request_rates;
  int rate_requests = 0;  // per rate; 0: 32, or 8 with --quick
  // Most requests in flight at once in the open loop: an arrival beyond it waits for a slot,
  // as under vLLM's --max-concurrency, so one overloaded rate cannot spawn without bound.
  int max_in_flight = 256;
  uint64_t seed = 1;  // arrival times and prompts of the open loop
};

struct RequestResult {
  bool ok = false;
  std::string error;
  double ttft_s = 0, e2e_s = 0;
  int output_tokens = 0;
  std::vector<double> itl_s;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double idx = p / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(idx);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (idx - static_cast<double>(lo));
}

RequestResult RunOne(quantkv::v1::Generation::Stub& stub, const std::vector<int32_t>& prompt,
                     int max_tokens) {
  RequestResult r;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(10));
  quantkv::v1::GenerateRequest req;
  for (int32_t id : prompt) req.mutable_tokens()->add_ids(id);
  req.set_max_tokens(static_cast<uint32_t>(max_tokens));
  req.set_ignore_eos(true);
  const auto t0 = Clock::now();
  auto last = t0;
  auto reader = stub.Generate(&ctx, req);
  quantkv::v1::GenerateResponse resp;
  bool first = true;
  while (reader->Read(&resp)) {
    const auto now = Clock::now();
    if (resp.has_chunk() && resp.chunk().token_ids_size() > 0) {
      if (first) {
        r.ttft_s = std::chrono::duration<double>(now - t0).count();
        first = false;
      } else {
        r.itl_s.push_back(std::chrono::duration<double>(now - last).count());
      }
      last = now;
      r.output_tokens += resp.chunk().token_ids_size();
    } else if (resp.has_error()) {
      r.error = resp.error().message();
    }
  }
  const grpc::Status st = reader->Finish();
  r.e2e_s = std::chrono::duration<double>(Clock::now() - t0).count();
  r.ok = st.ok() && r.error.empty() && r.output_tokens > 0;
  if (!st.ok()) r.error = st.error_message();
  return r;
}

struct LoadRow {
  std::string preset;
  int streams = 0;         // closed loop
  double rate = 0;         // open loop: offered requests/s
  int peak_in_flight = 0;  // open loop: most requests sent and not yet finished
  int waited = 0;          // open loop: arrivals that found --max-in-flight requests running
  int requests = 0, failed = 0;
  double duration_s = 0, req_per_s = 0, out_tok_per_s = 0;
  double ttft[3] = {}, tpot[3] = {}, itl[3] = {};  // p50, p90, p99 in ms
  std::string first_error;
};

// (prompt, output length) of each request.
using Work = std::vector<std::pair<std::vector<int32_t>, int>>;

Work MakeWork(int n_requests, std::mt19937_64& rng, const std::vector<int32_t>& corpus,
              const Options& o) {
  std::uniform_int_distribution<int> plen(o.prompt_min, o.prompt_max);
  std::uniform_int_distribution<int> olen(o.output_min, o.output_max);
  Work work;
  for (int i = 0; i < n_requests; ++i) {
    const int n = plen(rng);
    std::uniform_int_distribution<size_t> off(0, corpus.size() - static_cast<size_t>(n) - 1);
    const size_t at = off(rng);
    work.push_back({std::vector<int32_t>(corpus.begin() + static_cast<std::ptrdiff_t>(at),
                                         corpus.begin() + static_cast<std::ptrdiff_t>(at) + n),
                    olen(rng)});
  }
  return work;
}

// Fills the throughput and latency columns of `row` from one run's results.
void Summarize(const std::vector<RequestResult>& results, double duration_s, LoadRow& row) {
  row.requests = static_cast<int>(results.size());
  row.duration_s = duration_s;
  std::vector<double> ttft, tpot, itl;
  int64_t out_tokens = 0;
  for (const RequestResult& r : results) {
    if (!r.ok) {
      ++row.failed;
      if (row.first_error.empty()) row.first_error = r.error;
      continue;
    }
    out_tokens += r.output_tokens;
    ttft.push_back(1e3 * r.ttft_s);
    if (r.output_tokens > 1) tpot.push_back(1e3 * (r.e2e_s - r.ttft_s) / (r.output_tokens - 1));
    for (double x : r.itl_s) itl.push_back(1e3 * x);
  }
  row.req_per_s = (row.requests - row.failed) / row.duration_s;
  row.out_tok_per_s = static_cast<double>(out_tokens) / row.duration_s;
  const double ps[3] = {50, 90, 99};
  for (int i = 0; i < 3; ++i) {
    row.ttft[i] = Percentile(ttft, ps[i]);
    row.tpot[i] = Percentile(tpot, ps[i]);
    row.itl[i] = Percentile(itl, ps[i]);
  }
}

LoadRow RunLoad(const std::string& address, const std::string& preset, int n_streams,
                const std::vector<int32_t>& corpus, const Options& o) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  auto stub = quantkv::v1::Generation::NewStub(channel);
  // Requests: enough to keep every stream busy a few times over (fewer at 64 streams,
  // whose prefill alone dominates on 2 cores). Fixed seed: every preset gets the same ones.
  const int n_requests = n_streams == 1 ? 4 : n_streams <= 16 ? 2 * n_streams : n_streams;
  std::mt19937_64 rng(1234 + static_cast<uint64_t>(n_streams));
  const Work work = MakeWork(n_requests, rng, corpus, o);
  std::vector<RequestResult> results(work.size());
  std::atomic<size_t> next{0};
  const auto t0 = Clock::now();
  std::vector<std::thread> clients;
  for (int s = 0; s < n_streams; ++s) {
    clients.emplace_back([&] {
      for (size_t i = next++; i < work.size(); i = next++) {
        results[i] = RunOne(*stub, work[i].first, work[i].second);
      }
    });
  }
  for (std::thread& t : clients) t.join();
  LoadRow row;
  row.preset = preset;
  row.streams = n_streams;
  Summarize(results, std::chrono::duration<double>(Clock::now() - t0).count(), row);
  return row;
}

// Open loop: request i is sent at the i-th arrival of a Poisson process of `rate` per
// second (the first at once, then exponential gaps, as benchmark_serving), each on its own
// thread, so arrivals do not wait for earlier requests to finish. Duration: first arrival
// to last completion.
LoadRow RunOpenLoop(const std::string& address, const std::string& preset, double rate,
                    const std::vector<int32_t>& corpus, const Options& o) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  auto stub = quantkv::v1::Generation::NewStub(channel);
  // Seeded by rate too, but not by preset: every preset gets the same prompts and arrivals.
  std::mt19937_64 rng(o.seed * 1000003 + static_cast<uint64_t>(rate * 1000));
  const Work work = MakeWork(o.rate_requests, rng, corpus, o);
  std::exponential_distribution<double> gap_s(rate);
  std::vector<RequestResult> results(work.size());
  std::counting_semaphore<> slots(o.max_in_flight);
  std::atomic<int> in_flight{0}, peak{0}, waited{0};
  std::vector<std::thread> clients;
  clients.reserve(work.size());
  const auto t0 = Clock::now();
  auto arrival = t0;
  for (size_t i = 0; i < work.size(); ++i) {
    if (i > 0) {
      arrival +=
          std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(gap_s(rng)));
      std::this_thread::sleep_until(arrival);
    }
    clients.emplace_back([&, i] {
      if (!slots.try_acquire()) {
        ++waited;
        slots.acquire();
      }
      const int now = ++in_flight;
      for (int p = peak.load(); now > p && !peak.compare_exchange_weak(p, now);) {
      }
      results[i] = RunOne(*stub, work[i].first, work[i].second);
      --in_flight;
      slots.release();
    });
  }
  for (std::thread& t : clients) t.join();
  LoadRow row;
  row.preset = preset;
  row.rate = rate;
  row.peak_in_flight = peak.load();
  row.waited = waited.load();
  Summarize(results, std::chrono::duration<double>(Clock::now() - t0).count(), row);
  return row;
}

struct CapacityRow {
  std::string preset;
  double bits = 0;
  int64_t admitted = 0;         // 2048-token sequences the pool admits
  int64_t protected_bytes = 0;  // per sequence, fp16 sinks + window + tail (outside the pool)
};

absl::StatusOr<CapacityRow> Capacity(const ModelConfig& m, const std::string& preset,
                                     int64_t budget_bytes) {
  KvCacheConfig c;
  c.n_layers = m.n_layers;
  c.n_kv_heads = m.n_kv_heads;
  c.head_dim = m.head_dim;
  auto policy = ParseKvPolicy(preset, m.n_layers);
  if (!policy.ok()) return policy.status();
  c.policy = *policy;
  c.max_bytes = budget_bytes;
  auto cache = KvCache::Create(c);
  if (!cache.ok()) return cache.status();
  CapacityRow row;
  row.preset = preset;
  row.bits = (*cache)->BitsPerElementAt(2048);
  std::vector<SequenceKv> seqs;
  while (true) {
    SequenceKv s;
    if (!(*cache)->Reserve(s, 2048).ok()) break;
    s.length = 2048;
    seqs.push_back(std::move(s));
  }
  row.admitted = static_cast<int64_t>(seqs.size());
  if (!seqs.empty()) {
    row.protected_bytes =
        (*cache)->SequenceBytes(seqs[0]) -
        static_cast<int64_t>(seqs[0].blocks.size()) * (*cache)->block_bytes_all_layers();
  }
  for (SequenceKv& s : seqs) (*cache)->Free(s);
  return row;
}

std::vector<std::string> SplitList(const std::string& s) {
  std::vector<std::string> out;
  for (absl::string_view p : absl::StrSplit(s, ',')) {
    if (!p.empty()) out.emplace_back(p);
  }
  return out;
}

bool ParseInt(const std::string& flag, const std::string& v, int lo, int* out) {
  if (!absl::SimpleAtoi(v, out) || *out < lo) {
    std::cerr << "serve_load: " << flag << " wants an integer >= " << lo << ", got '" << v << "'\n";
    return false;
  }
  return true;
}

int Main(int argc, char** argv) {
  Options o;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    if (f == "--quick") {
      o.streams = {1, 4};
      quick = true;
      continue;
    }
    if (f == "--prefill-gemm") {
      o.prefill_gemm = true;
      continue;
    }
    if (i + 1 >= argc) {
      std::cerr << "serve_load: " << f << " needs a value\n";
      return 2;
    }
    const std::string v = argv[++i];
    if (f == "--presets") {
      o.presets = SplitList(v);
    } else if (f == "--streams") {
      o.streams.clear();
      for (const std::string& s : SplitList(v)) {
        int n = 0;
        if (!ParseInt(f, s, 1, &n)) return 2;
        o.streams.push_back(n);
      }
    } else if (f == "--threads") {
      if (!ParseInt(f, v, 1, &o.threads)) return 2;
    } else if (f == "--prompt-tokens" || f == "--output-tokens") {
      // MIN-MAX: lengths drawn uniformly from the range.
      const size_t dash = v.find('-');
      int lo = 0, hi = 0;
      if (dash == std::string::npos || !ParseInt(f, v.substr(0, dash), 1, &lo) ||
          !ParseInt(f, v.substr(dash + 1), lo, &hi)) {
        std::cerr << "serve_load: " << f << " wants MIN-MAX with 1 <= MIN <= MAX, got '" << v
                  << "'\n";
        return 2;
      }
      (f == "--prompt-tokens" ? o.prompt_min : o.output_min) = lo;
      (f == "--prompt-tokens" ? o.prompt_max : o.output_max) = hi;
    } else if (f == "--text") {
      o.text = v;
    } else if (f == "--out") {
      o.out = v;
    } else if (f == "--budget-mb") {
      int mb = 0;
      if (!ParseInt(f, v, 1, &mb)) return 2;
      o.budget_mb = mb;
    } else if (f == "--request-rates") {
      o.request_rates.clear();
      for (const std::string& s : SplitList(v)) {
        double r = 0;
        // Finite and positive: an exponential gap needs a rate, and "inf" (all at once) is
        // what --streams N already measures.
        if (!absl::SimpleAtod(s, &r) || !(r > 0) || !std::isfinite(r)) {
          std::cerr << "serve_load: --request-rates wants positive requests/s, got '" << s << "'\n";
          return 2;
        }
        o.request_rates.push_back(r);
      }
    } else if (f == "--rate-requests") {
      if (!ParseInt(f, v, 1, &o.rate_requests)) return 2;
    } else if (f == "--max-in-flight") {
      if (!ParseInt(f, v, 1, &o.max_in_flight)) return 2;
    } else if (f == "--seed") {
      if (!absl::SimpleAtoi(v, &o.seed)) {
        std::cerr << "serve_load: --seed wants an unsigned integer, got '" << v << "'\n";
        return 2;
      }
    } else {
      std::cerr << "serve_load: unknown flag " << f << "\n";
      return 2;
    }
  }
  if (o.rate_requests == 0) o.rate_requests = quick ? 8 : 32;
  std::ifstream in(o.text, std::ios::binary);
  if (!in) {
    std::cerr << "serve_load: cannot open " << o.text << "\n";
    return 1;
  }
  std::stringstream buf;
  buf << in.rdbuf();

  std::vector<LoadRow> rows;
  std::vector<LoadRow> open_rows;  // --request-rates
  std::vector<CapacityRow> capacity;
  for (const std::string& preset : o.presets) {
    launcher::ModelFlags mf;
    mf.model = "smollm2-135m";
    mf.threads = o.threads;
    mf.kv = preset;
    mf.kv_budget_mb = 1024;
    EngineConfig base;
    base.max_chunk_tokens = 256;
    // As `quantkv serve`: per-row matmuls (batch-invariant) unless --prefill-gemm.
    base.gemm_min_rows =
        o.prefill_gemm ? EngineConfig{}.gemm_min_rows : std::numeric_limits<int64_t>::max();
    base.fused_decode_attention = false;
    auto session = launcher::OpenModelSession(mf, base);
    if (!session.ok()) {
      std::cerr << "serve_load: " << session.status() << "\n";
      return 1;
    }
    auto ids = session->tokenizer->Encode(buf.str().substr(0, 400000));
    if (!ids.ok()) {
      std::cerr << "serve_load: " << ids.status() << "\n";
      return 1;
    }
    const ModelConfig model = session->engine->model_config();
    auto cap = Capacity(model, preset, o.budget_mb << 20);
    if (!cap.ok()) {
      std::cerr << "serve_load: " << cap.status() << "\n";
      return 1;
    }
    capacity.push_back(*cap);
    EngineLoopConfig lc;
    lc.max_running = 64;
    lc.max_queued = 1024;
    lc.max_step_tokens = 256;
    lc.kv_preset = preset;
    auto loop = EngineLoop::Create(std::move(session->engine), session->tokenizer.get(), lc);
    if (!loop.ok()) {
      std::cerr << "serve_load: " << loop.status() << "\n";
      return 1;
    }
    GenerationServerOptions so;
    so.listen = "127.0.0.1:0";
    auto server = GenerationServer::Start(loop->get(), so);
    if (!server.ok()) {
      std::cerr << "serve_load: " << server.status() << "\n";
      return 1;
    }
    for (int n : o.streams) {
      std::cerr << absl::StrFormat("serve_load: %s, %d streams ...\n", preset, n);
      rows.push_back(RunLoad((*server)->address(), preset, n, *ids, o));
      if (rows.back().failed > 0) {
        std::cerr << "serve_load: " << rows.back().failed
                  << " requests failed: " << rows.back().first_error << "\n";
      }
    }
    for (double rate : o.request_rates) {
      std::cerr << absl::StrFormat("serve_load: %s, Poisson %g requests/s ...\n", preset, rate);
      open_rows.push_back(RunOpenLoop((*server)->address(), preset, rate, *ids, o));
      if (open_rows.back().failed > 0) {
        std::cerr << "serve_load: " << open_rows.back().failed
                  << " requests failed: " << open_rows.back().first_error << "\n";
      }
    }
    (*server)->Shutdown(absl::Seconds(5));
    (*loop)->Shutdown();
  }

  std::string md;
  if (!o.streams.empty()) {
    md += absl::StrFormat(
        "Closed-loop load on `quantkv serve` (in-process server, gRPC over loopback), %d engine "
        "threads, prompts %d-%d tokens of WikiText-2 at random offsets, %d-%d output tokens "
        "(ignore_eos), %s. TTFT / TPOT / ITL as in "
        "vLLM's benchmark_serving. Speed-up: output tok/s against 1 stream of the same preset "
        "in the same run.\n\n"
        "| --kv | streams | requests | req/s | output tok/s | speed-up vs 1 | TTFT p50/p90/p99 ms "
        "| TPOT p50/p90/p99 ms | ITL p50/p90/p99 ms |\n|---|---|---|---|---|---|---|---|---|\n",
        o.threads, o.prompt_min, o.prompt_max, o.output_min, o.output_max,
        o.prefill_gemm ? "steps of >= 8 rows through tiled SGEMM (--prefill-gemm)"
                       : "per-row matmuls as the server runs by default");
  }
  nlohmann::json j;
  j["load"] = nlohmann::json::array();
  for (const LoadRow& r : rows) {
    double single = 0;
    for (const LoadRow& s : rows) {
      if (s.preset == r.preset && s.streams == 1) single = s.out_tok_per_s;
    }
    const double speedup = single > 0 ? r.out_tok_per_s / single : 0;
    md += absl::StrFormat(
        "| %s | %d | %d%s | %.2f | %.1f | %.2fx | %.0f / %.0f / %.0f | %.1f / %.1f / %.1f | %.1f "
        "/ %.1f / %.1f |\n",
        r.preset, r.streams, r.requests,
        r.failed ? absl::StrFormat(" (%d failed)", r.failed) : std::string(), r.req_per_s,
        r.out_tok_per_s, speedup, r.ttft[0], r.ttft[1], r.ttft[2], r.tpot[0], r.tpot[1], r.tpot[2],
        r.itl[0], r.itl[1], r.itl[2]);
    j["load"].push_back({{"preset", r.preset},
                         {"streams", r.streams},
                         {"requests", r.requests},
                         {"failed", r.failed},
                         {"duration_s", r.duration_s},
                         {"req_per_s", r.req_per_s},
                         {"output_tok_per_s", r.out_tok_per_s},
                         {"speedup_vs_1_stream", speedup},
                         {"ttft_ms_p50_p90_p99", {r.ttft[0], r.ttft[1], r.ttft[2]}},
                         {"tpot_ms_p50_p90_p99", {r.tpot[0], r.tpot[1], r.tpot[2]}},
                         {"itl_ms_p50_p90_p99", {r.itl[0], r.itl[1], r.itl[2]}}});
  }
  if (!open_rows.empty()) {
    md += absl::StrFormat(
        "%sOpen-loop load on `quantkv serve` (in-process server, gRPC over loopback), %d engine "
        "threads, prompts %d-%d tokens of WikiText-2 at random offsets, %d-%d output tokens "
        "(ignore_eos): Poisson arrivals (exponential inter-arrival times, seed %d) at each rate, "
        "%d requests per rate, each a streaming Generate on its own client thread, at most %d in "
        "flight (a later arrival waits for a slot and its latencies count from when it is sent, "
        "as under vLLM's --max-concurrency). req/s and output tok/s from the first arrival to "
        "the last completion: near the offered rate while the server keeps up (noisy over few "
        "requests), below it once requests queue, when TTFT grows. Peak in flight: most "
        "requests sent and not finished at once.\n\n"
        "| --kv | rate req/s | requests | req/s | output tok/s | peak in flight | TTFT "
        "p50/p90/p99 ms | TPOT p50/p90/p99 ms | ITL p50/p90/p99 ms |\n"
        "|---|---|---|---|---|---|---|---|---|\n",
        md.empty() ? "" : "\n", o.threads, o.prompt_min, o.prompt_max, o.output_min, o.output_max,
        o.seed, o.rate_requests, o.max_in_flight);
    j["open_loop"] = nlohmann::json::array();
    for (const LoadRow& r : open_rows) {
      md += absl::StrFormat(
          "| %s | %g | %d%s | %.2f | %.1f | %d%s | %.0f / %.0f / %.0f | %.1f / %.1f / %.1f | "
          "%.1f / %.1f / %.1f |\n",
          r.preset, r.rate, r.requests,
          r.failed ? absl::StrFormat(" (%d failed)", r.failed) : std::string(), r.req_per_s,
          r.out_tok_per_s, r.peak_in_flight,
          r.waited ? absl::StrFormat(" (%d waited)", r.waited) : std::string(), r.ttft[0],
          r.ttft[1], r.ttft[2], r.tpot[0], r.tpot[1], r.tpot[2], r.itl[0], r.itl[1], r.itl[2]);
      j["open_loop"].push_back({{"preset", r.preset},
                                {"request_rate", r.rate},
                                {"requests", r.requests},
                                {"failed", r.failed},
                                {"duration_s", r.duration_s},
                                {"req_per_s", r.req_per_s},
                                {"output_tok_per_s", r.out_tok_per_s},
                                {"peak_in_flight", r.peak_in_flight},
                                {"waited_for_slot", r.waited},
                                {"max_in_flight", o.max_in_flight},
                                {"seed", o.seed},
                                {"ttft_ms_p50_p90_p99", {r.ttft[0], r.ttft[1], r.ttft[2]}},
                                {"tpot_ms_p50_p90_p99", {r.tpot[0], r.tpot[1], r.tpot[2]}},
                                {"itl_ms_p50_p90_p99", {r.itl[0], r.itl[1], r.itl[2]}}});
    }
  }
  md += absl::StrFormat(
      "\nConcurrent 2048-token sequences admitted by a %d MiB KV pool (Reserve until full). "
      "The fp16 sinks, window and tail each sequence keeps live outside the pool, with the "
      "sequence.\n\n| --kv | bits/elem at 2048 | sequences | vs fp16 | protected bytes per "
      "sequence |\n|---|---|---|---|---|\n",
      o.budget_mb);
  int64_t fp16_admitted = 0;
  for (const CapacityRow& c : capacity) {
    if (c.preset == "fp16") fp16_admitted = c.admitted;
  }
  j["capacity"] = nlohmann::json::array();
  for (const CapacityRow& c : capacity) {
    const double ratio = fp16_admitted > 0
                             ? static_cast<double>(c.admitted) / static_cast<double>(fp16_admitted)
                             : 0;
    md += absl::StrFormat("| %s | %.3f | %d | %.2fx | %d |\n", c.preset, c.bits, c.admitted, ratio,
                          c.protected_bytes);
    j["capacity"].push_back({{"preset", c.preset},
                             {"bits_per_element", c.bits},
                             {"sequences_2048", c.admitted},
                             {"vs_fp16", ratio},
                             {"protected_bytes_per_sequence", c.protected_bytes},
                             {"budget_mb", o.budget_mb}});
  }
  std::cout << md;
  return WriteResults(o.out, o.prefill_gemm ? "serve_load_prefill_gemm" : "serve_load", j, md) ? 0
                                                                                               : 1;
}

}  // namespace
}  // namespace quantkv::bench

int main(int argc, char** argv) { return quantkv::bench::Main(argc, argv); }
