// Prefill and decode speed of the CPU engine at 1 and 2 threads, judged against the memory
// bandwidth measured in the same run: a decode step must read every weight once, so
// (weight bytes per token) / (read bandwidth) is the fastest a token can be.
//
//   engine_bench [--model PATH] [--prompt-tokens N] [--decode-tokens N] [--out DIR]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>

#include "absl/strings/str_format.h"
#include "bench/bandwidth.h"
#include "bench/results.h"
#include "kernels/matmul.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gguf_model.h"

namespace quantkv::bench {
namespace {

struct Args {
  std::string model;
  int prompt_tokens = 128;
  int decode_tokens = 64;
  std::string out = "bench/results";
  bool mmap = false;
};

std::string DefaultModel() {
  if (const char* h = std::getenv("QUANTKV_HOME")) {
    return std::string(h) + "/SmolLM2-135M-Instruct.Q4_1.gguf";
  }
  return std::string(std::getenv("HOME") ? std::getenv("HOME") : ".") +
         "/.cache/quantkv/SmolLM2-135M-Instruct.Q4_1.gguf";
}

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int Main(int argc, char** argv) {
  Args a;
  a.model = DefaultModel();
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    if (f == "--mmap") {  // weights used from the file mapping (4 KiB pages)
      a.mmap = true;
      continue;
    }
    if (i + 1 >= argc) {
      std::cerr << "engine_bench: flag " << f << " needs a value\n";
      return 2;
    }
    const std::string v = argv[++i];
    if (f == "--model") {
      a.model = v;
    } else if (f == "--prompt-tokens") {
      a.prompt_tokens = std::atoi(v.c_str());
    } else if (f == "--decode-tokens") {
      a.decode_tokens = std::atoi(v.c_str());
    } else if (f == "--out") {
      a.out = v;
    } else {
      std::cerr << "engine_bench: unknown flag " << f << "\n";
      return 2;
    }
  }
  if (a.prompt_tokens < 1 || a.decode_tokens < 1) {
    std::cerr << "engine_bench: --prompt-tokens and --decode-tokens must be >= 1\n";
    return 2;
  }
  nlohmann::json rows = nlohmann::json::array();
  std::string md =
      "| threads | read GB/s | copy GB/s | prefill tok/s | decode tok/s | decode ms/tok | "
      "bound ms/tok | fraction of bound |\n|---|---|---|---|---|---|---|---|\n";
  std::printf("%-8s %10s %10s %14s %13s %14s %13s %9s\n", "threads", "read GB/s", "copy GB/s",
              "prefill tok/s", "decode tok/s", "decode ms/tok", "bound ms/tok", "fraction");
  int64_t weight_bytes = 0;
  for (int threads : {1, 2}) {
    auto model =
        GgufModel::Open(a.model, a.mmap ? MappedFile::Mode::kMap : MappedFile::Mode::kHugeCopy);
    if (!model.ok()) {
      std::cerr << "engine_bench: " << model.status() << "\n";
      return 1;
    }
    EngineConfig cfg;
    cfg.threads = threads;
    auto engine = Engine::Create(std::move(*model), cfg);
    if (!engine.ok()) {
      std::cerr << "engine_bench: " << engine.status() << "\n";
      return 1;
    }
    Engine& e = **engine;
    weight_bytes = e.WeightBytesPerToken();
    const Bandwidth bw = MeasureBandwidth(threads);
    std::vector<int32_t> prompt(a.prompt_tokens);
    for (int i = 0; i < a.prompt_tokens; ++i) prompt[i] = 100 + (i * 7919) % 40000;
    std::vector<float> logits;
    // Warm-up: page the weights in and settle the clocks.
    SequenceId warm = e.NewSequence();
    (void)e.Forward(warm, std::span<const int32_t>(prompt).first(16), false, &logits);
    (void)e.Release(warm);

    SequenceId seq = e.NewSequence();
    logits.clear();
    double t0 = Now();
    absl::Status s = e.Forward(seq, prompt, false, &logits);
    const double prefill_s = Now() - t0;
    int32_t next = 1;
    t0 = Now();
    for (int i = 0; i < a.decode_tokens && s.ok(); ++i) {
      logits.clear();
      s = e.Forward(seq, {&next, 1}, false, &logits);
      next = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    }
    const double decode_s = Now() - t0;
    if (!s.ok()) {
      std::cerr << "engine_bench: " << s << "\n";
      return 1;
    }
    const double ms_tok = decode_s * 1e3 / a.decode_tokens;
    const double bound_ms = weight_bytes / (bw.read_gbps * 1e9) * 1e3;
    const double prefill_tps = a.prompt_tokens / prefill_s;
    const double decode_tps = a.decode_tokens / decode_s;
    std::printf("%-8d %10.2f %10.2f %14.1f %13.1f %14.2f %13.2f %9.2f\n", threads, bw.read_gbps,
                bw.copy_gbps, prefill_tps, decode_tps, ms_tok, bound_ms, bound_ms / ms_tok);
    md += absl::StrFormat("| %d | %.2f | %.2f | %.1f | %.1f | %.2f | %.2f | %.2f |\n", threads,
                          bw.read_gbps, bw.copy_gbps, prefill_tps, decode_tps, ms_tok, bound_ms,
                          bound_ms / ms_tok);
    rows.push_back({{"threads", threads},
                    {"read_gbps", bw.read_gbps},
                    {"copy_gbps", bw.copy_gbps},
                    {"prefill_tokens_per_s", prefill_tps},
                    {"decode_tokens_per_s", decode_tps},
                    {"decode_ms_per_token", ms_tok},
                    {"bound_ms_per_token", bound_ms},
                    {"fraction_of_bound", bound_ms / ms_tok}});
  }
  // Batched decode as the server runs it (per-row matmuls so batching cannot change a
  // row's result; tiled or fused decode attention): N sequences of prompt_tokens, then
  // decode steps of N rows. Speed-up is against one row in the same configuration.
  md +=
      "\nBatched decode, 2 threads, per-row matmuls (the `quantkv serve` configuration): N "
      "sequences prefilled with the prompt, then steps of N decode rows.\n\n| attention | "
      "rows | step ms | ms per row | tok/s | speed-up vs 1 row |\n|---|---|---|---|---|---|\n";
  nlohmann::json batch_rows = nlohmann::json::array();
  for (bool fused : {false, true}) {
    auto model = GgufModel::Open(a.model, MappedFile::Mode::kHugeCopy);
    if (!model.ok()) {
      std::cerr << "engine_bench: " << model.status() << "\n";
      return 1;
    }
    EngineConfig cfg;
    cfg.threads = 2;
    cfg.gemm_min_rows = int64_t{1} << 40;
    cfg.fused_decode_attention = fused;
    auto engine = Engine::Create(std::move(*model), cfg);
    if (!engine.ok()) {
      std::cerr << "engine_bench: " << engine.status() << "\n";
      return 1;
    }
    Engine& e = **engine;
    double one_row_tps = 0;
    for (int batch : {1, 4, 16, 64}) {
      std::vector<SequenceId> seqs;
      std::vector<float> logits;
      std::vector<int32_t> prompt(a.prompt_tokens);
      absl::Status s;
      for (int b = 0; b < batch && s.ok(); ++b) {
        for (int i = 0; i < a.prompt_tokens; ++i) prompt[i] = 100 + (i * 7919 + b * 31) % 40000;
        seqs.push_back(e.NewSequence());
        logits.clear();
        s = e.Forward(seqs.back(), prompt, false, &logits);
      }
      const int steps = std::max(4, a.decode_tokens / 4);
      std::vector<int32_t> next(batch, 1);
      std::vector<StepInput> inputs(batch);
      double t0 = 0;
      for (int step = -1; step < steps && s.ok(); ++step) {  // step -1 warms up
        if (step == 0) t0 = Now();
        for (int b = 0; b < batch; ++b) inputs[b] = {.seq = seqs[b], .tokens = {&next[b], 1}};
        logits.clear();
        s = e.Step(inputs, &logits);
        const int64_t V = e.model_config().vocab_size;
        for (int b = 0; b < batch && s.ok(); ++b) {
          next[b] = static_cast<int32_t>(
              std::max_element(logits.begin() + b * V, logits.begin() + (b + 1) * V) -
              (logits.begin() + b * V));
        }
      }
      const double step_ms = (Now() - t0) * 1e3 / steps;
      for (SequenceId q : seqs) (void)e.Release(q);
      if (!s.ok()) {
        std::cerr << "engine_bench: " << s << "\n";
        return 1;
      }
      const double tps = batch * 1e3 / step_ms;
      if (batch == 1) one_row_tps = tps;
      const char* attention = fused ? "fused decode" : "tiled";
      std::printf(
          "batched decode, %-12s rows %3d: step %7.2f ms, %6.2f ms/row, %7.1f tok/s, "
          "%.2fx\n",
          attention, batch, step_ms, step_ms / batch, tps, tps / one_row_tps);
      md += absl::StrFormat("| %s | %d | %.2f | %.2f | %.1f | %.2fx |\n", attention, batch, step_ms,
                            step_ms / batch, tps, tps / one_row_tps);
      batch_rows.push_back({{"attention", attention},
                            {"rows", batch},
                            {"step_ms", step_ms},
                            {"tokens_per_s", tps},
                            {"speedup_vs_one_row", tps / one_row_tps}});
    }
  }
  md += absl::StrFormat(
      "\nWeights read per decoded token: %.1f MB (all linear layers + lm_head + one embedding "
      "row); int8 dot ISA: %s; prompt %d tokens, %d decoded tokens; KV fp16.\nBound: weight "
      "bytes / streaming read bandwidth at the same thread count.\n",
      weight_bytes / 1e6, kernels::MatMulIsa(), a.prompt_tokens, a.decode_tokens);
  nlohmann::json out = {{"model", a.model},
                        {"weight_bytes_per_token", weight_bytes},
                        {"isa", kernels::MatMulIsa()},
                        {"prompt_tokens", a.prompt_tokens},
                        {"decode_tokens", a.decode_tokens},
                        {"kv", "fp16"},
                        {"rows", rows},
                        {"batched_decode", batch_rows}};
  return WriteResults(a.out, "engine_bench", out, md) ? 0 : 1;
}

}  // namespace
}  // namespace quantkv::bench

int main(int argc, char** argv) { return quantkv::bench::Main(argc, argv); }
