// Whole-model decode time per token against context length, per KV preset: SmolLM2-135M
// (rope scaled with yarn:16 so positions up to 131k are allowed) with a cache filled by
// Engine::FillSyntheticKv (random K/V: the speed of a step does not depend on the values,
// and a real 100k prefill would take an hour here), then timed single-token decode steps.
// Reports ms/token, the bytes a step must read (weights + the sequence's cache), that as a
// fraction of the memory bandwidth measured in the same run, and the ratio to fp16 at the
// same context.
//
//   model_decode_vs_context [--threads 2] [--contexts 1024,8192,32768,65536,100000]
//                           [--presets "fp16;int4-comp;int2-comp"] [--steps 8] [--out DIR]
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/bandwidth.h"
#include "bench/results.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gguf_model.h"

namespace quantkv::bench {
namespace {

std::string DefaultModel() {
  const char* home = std::getenv("QUANTKV_HOME");
  const std::string dir = home != nullptr && *home != '\0'
                              ? std::string(home)
                              : std::string(std::getenv("HOME")) + "/.cache/quantkv";
  return dir + "/SmolLM2-135M-Instruct.Q4_1.gguf";
}

struct Row {
  std::string preset;
  int64_t context = 0;
  double ms_per_token = 0;
  double bytes_per_token = 0;  // weights + cache read by one step
  double kv_bytes = 0;
  double bandwidth_fraction = 0;
};

int Main(int argc, char** argv) {
  int threads = 2, steps = 8;
  std::string out = "bench/results/long_context", model = DefaultModel();
  std::vector<int64_t> contexts = {1024, 8192, 32768, 65536, 100000};
  std::vector<std::string> presets = {"fp16", "int4-comp", "int2-comp"};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string f = argv[i], v = argv[i + 1];
    if (f == "--threads") {
      threads = std::atoi(v.c_str());
    } else if (f == "--steps") {
      steps = std::atoi(v.c_str());
    } else if (f == "--out") {
      out = v;
    } else if (f == "--model") {
      model = v;
    } else if (f == "--presets") {
      presets = absl::StrSplit(v, ';');
    } else if (f == "--contexts") {
      contexts.clear();
      for (absl::string_view s : absl::StrSplit(v, ',')) {
        contexts.push_back(std::atoll(std::string(s).c_str()));
      }
    } else {
      std::cerr << "model_decode_vs_context: unknown flag " << f << "\n";
      return 2;
    }
  }
  if (argc % 2 == 0 || threads < 1 || steps < 1) {
    std::cerr << "model_decode_vs_context: flags take one value; --threads, --steps >= 1\n";
    return 2;
  }
  const Bandwidth bw = MeasureBandwidth(threads);
  std::vector<Row> rows;
  for (const std::string& preset : presets) {
    for (int64_t ctx : contexts) {
      auto gguf = GgufModel::Open(model);
      if (!gguf.ok()) {
        std::cerr << "model_decode_vs_context: " << gguf.status() << "\n";
        return 1;
      }
      EngineConfig c;
      c.threads = threads;
      c.kv_spec = preset;
      c.rope_scaling = "yarn:16";
      c.kv_max_bytes = int64_t{6} << 30;  // lazily backed: only what is written costs
      c.max_chunk_tokens = 512;
      auto engine = Engine::Create(std::move(*gguf), c);
      if (!engine.ok()) {
        std::cerr << "model_decode_vs_context: " << preset << ": " << engine.status() << "\n";
        return 1;
      }
      Engine& e = **engine;
      const SequenceId seq = e.NewSequence();
      if (absl::Status s = e.FillSyntheticKv(seq, ctx, 1); !s.ok()) {
        std::cerr << "model_decode_vs_context: " << preset << " at " << ctx << ": " << s << "\n";
        return 1;
      }
      std::vector<float> logits;
      int32_t token = 42;
      // One untimed step warms the caches and the pool.
      if (absl::Status s = e.Forward(seq, {&token, 1}, false, &logits); !s.ok()) {
        std::cerr << "model_decode_vs_context: " << s << "\n";
        return 1;
      }
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < steps; ++i) {
        logits.clear();
        if (absl::Status s = e.Forward(seq, {&token, 1}, false, &logits); !s.ok()) {
          std::cerr << "model_decode_vs_context: " << s << "\n";
          return 1;
        }
      }
      const double secs =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / steps;
      Row r;
      r.preset = preset;
      r.context = ctx;
      r.ms_per_token = secs * 1e3;
      r.kv_bytes = static_cast<double>(e.kv_cache().BytesPerTokenAt(ctx + steps) * (ctx + steps));
      r.bytes_per_token = static_cast<double>(e.WeightBytesPerToken()) + r.kv_bytes;
      r.bandwidth_fraction = r.bytes_per_token / secs / (bw.read_gbps * 1e9);
      rows.push_back(r);
      std::cerr << absl::StrFormat("%s at %d: %.2f ms/token\n", preset, ctx, r.ms_per_token);
    }
  }
  std::string md = absl::StrFormat(
      "# Whole-model decode vs context (SmolLM2-135M Q4_1, %d threads)\n\n"
      "Cache filled with random K/V by Engine::FillSyntheticKv (--rope-scaling yarn:16 so "
      "positions reach 131k), then %d timed single-token decode steps after one warm-up. "
      "Bytes per step: the weights a decode step reads (%.1f MB) plus the sequence's KV "
      "cache. Memory bandwidth (streaming reads) measured in the same run: %.1f GB/s.\n\n"
      "| --kv | context | ms/token | vs fp16 | KV MB read | bytes/step vs bandwidth |\n"
      "|---|---|---|---|---|---|\n",
      threads, steps, rows.empty() ? 0.0 : (rows[0].bytes_per_token - rows[0].kv_bytes) / 1e6,
      bw.read_gbps);
  nlohmann::json j = nlohmann::json::array();
  for (const Row& r : rows) {
    double fp16 = 0;
    for (const Row& b : rows) {
      if (b.preset == "fp16" && b.context == r.context) fp16 = b.ms_per_token;
    }
    md += absl::StrFormat("| %s | %d | %.2f | %s | %.1f | %.0f%% |\n", r.preset, r.context,
                          r.ms_per_token,
                          fp16 > 0 ? absl::StrFormat("%.2fx", fp16 / r.ms_per_token) : "-",
                          r.kv_bytes / 1e6, 100 * r.bandwidth_fraction);
    j.push_back({{"preset", r.preset},
                 {"context", r.context},
                 {"ms_per_token", r.ms_per_token},
                 {"kv_bytes", r.kv_bytes},
                 {"bytes_per_token", r.bytes_per_token},
                 {"bandwidth_fraction", r.bandwidth_fraction}});
  }
  std::cout << md;
  nlohmann::json obj = {{"rows", j}, {"threads", threads}, {"read_gbps", bw.read_gbps}};
  return WriteResults(out, "model_decode_vs_context", obj, md) ? 0 : 1;
}

}  // namespace
}  // namespace quantkv::bench

int main(int argc, char** argv) { return quantkv::bench::Main(argc, argv); }
