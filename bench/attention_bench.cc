// Decode attention over a synthetic quantized cache: time per token for one layer of
// SmolLM2's shape (9 query heads, 3 KV heads, head_dim 64) at several contexts and KV
// presets, with the bytes the step must read and the achieved fraction of the memory
// bandwidth measured in the same run.
//
//   attention_bench [--threads N] [--out DIR] [--name NAME] [--contexts 1024,8192]
//                   [--presets "fp16;int4;k=pq4x8,v=int4"] [--reps N]
//
// --contexts / --presets (';'-separated --kv specs or @policy files) and --reps (timed calls
// per row) narrow the sweep for profiling; the fp16 speed-up column needs fp16 in the same
// context, else it reads 0. Codecs whose levels or centroids come from calibration get
// synthetic ones when the spec carries none: their speed does not depend on the values.
// Results go to DIR/NAME.{json,md} (default bench/results/attention_bench).
#include <chrono>
#include <cstdio>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/bandwidth.h"
#include "bench/results.h"
#include "kernels/attention.h"
#include "kernels/kv_codebook.h"
#include "runtime/kv/kv_cache.h"

namespace quantkv::bench {
namespace {

// Levels / centroids for codecs that take them from calibration, where the policy has none.
void AddSyntheticCodebooks(KvPolicy& policy) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  const LayerKvPolicy& lp = policy.ForLayer(0);
  LayerKvVectors& books = policy.codebooks[0];
  for (int kv = 0; kv < 2; ++kv) {
    const kernels::KvCodecSpec& s = kv == 0 ? lp.k : lp.v;
    std::vector<float>& dst = kv == 0 ? books.k : books.v;
    if (!kernels::KvCodecNeedsCodebook(s) || !dst.empty()) continue;
    if (s.type == kernels::KvCodecType::kVector) {
      dst.resize(static_cast<size_t>((1 << s.bits) * s.vector_dims));
      for (float& x : dst) x = nd(rng);
    } else {
      kernels::KvCodecSpec nf = s;
      nf.codebook = kernels::KvCodebookKind::kNormalFloat;
      dst = kernels::KvCodebookLevels(nf);
    }
  }
}

int Main(int argc, char** argv) {
  int threads = 1;
  std::string out = "bench/results";
  std::string name = "attention_bench";
  std::vector<int64_t> contexts = {1024, 8192, 32768};
  std::vector<std::string> presets = {"fp16", "int8", "int4", "int2"};
  int reps_flag = 0;  // 0: by context
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string f = argv[i];
    if (f == "--threads") {
      threads = std::atoi(argv[i + 1]);
    } else if (f == "--out") {
      out = argv[i + 1];
    } else if (f == "--name") {
      name = argv[i + 1];
    } else if (f == "--contexts") {
      contexts.clear();
      for (absl::string_view c : absl::StrSplit(argv[i + 1], ',')) {
        contexts.push_back(std::atoll(std::string(c).c_str()));
      }
    } else if (f == "--reps") {
      reps_flag = std::atoi(argv[i + 1]);
    } else if (f == "--presets") {
      presets = absl::StrSplit(argv[i + 1], ';');
    } else {
      std::cerr << "attention_bench: unknown flag " << f << "\n";
      return 2;
    }
  }
  if (threads < 1) {
    std::cerr << "attention_bench: --threads must be >= 1\n";
    return 2;
  }
  const int64_t n_heads = 9, n_kv = 3, d = 64;
  const Bandwidth bw = MeasureBandwidth(threads);
  kernels::ThreadPool pool(threads);
  nlohmann::json rows = nlohmann::json::array();
  std::string md = absl::StrFormat(
      "Read bandwidth (%d threads): %.2f GB/s. One layer, 9 query / 3 KV heads, head_dim 64.\n\n"
      "| preset | context | us/token | MB read | GB/s | fraction of bandwidth | speed-up vs fp16 "
      "|\n"
      "|---|---|---|---|---|---|---|\n",
      threads, bw.read_gbps);
  std::printf("%-24s %8s %10s %9s %8s %9s %8s\n", "preset", "context", "us/token", "MB read",
              "GB/s", "fraction", "vs fp16");
  for (int64_t ctx : contexts) {
    double fp16_us = 0;
    for (const std::string& preset : presets) {
      KvCacheConfig c;
      c.n_layers = 1;
      c.n_kv_heads = n_kv;
      c.head_dim = d;
      absl::StatusOr<KvPolicy> policy = ParseKvPolicy(preset);
      if (!policy.ok()) {
        std::cerr << "attention_bench: --presets " << preset << ": " << policy.status() << "\n";
        return 2;
      }
      c.policy = *policy;
      AddSyntheticCodebooks(c.policy);
      c.max_bytes = int64_t{1} << 30;
      c.max_step_tokens = 1024;
      auto cache = KvCache::Create(c);
      if (!cache.ok()) {
        std::cerr << cache.status() << "\n";
        return 1;
      }
      SequenceKv seq;
      std::mt19937 rng(1);
      std::normal_distribution<float> nd;
      std::vector<float> k(1024 * n_kv * d), v(k.size());
      for (int64_t pos = 0; pos < ctx; pos += 1024) {
        for (float& x : k) x = nd(rng);
        for (float& x : v) x = nd(rng);
        (void)(*cache)->Reserve(seq, pos + 1024);
        (*cache)->Write(seq, 0, pos, 1024, k.data(), v.data());
      }
      seq.length = ctx;
      std::vector<float> q(n_heads * d, 0.1f), o(n_heads * d);
      const int32_t position = static_cast<int32_t>(ctx - 1);
      const kernels::KvLayerView view = (*cache)->View(seq, 0, ctx);
      kernels::AttentionQuery aq{q.data(), 1, n_heads, &position, 0.125f};
      kernels::Attention(aq, view, o.data(), &pool);  // warm
      const int reps = reps_flag > 0 ? reps_flag : std::max<int>(3, static_cast<int>(200000 / ctx));
      const auto t0 = std::chrono::steady_clock::now();
      for (int r = 0; r < reps; ++r) kernels::Attention(aq, view, o.data(), &pool);
      const double us =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e6 / reps;
      const double bytes = (*cache)->BytesPerTokenAt(ctx) * ctx;
      const double gbps = bytes / (us * 1e-6) / 1e9;
      if (preset == "fp16") fp16_us = us;
      std::printf("%-24s %8ld %10.1f %9.2f %8.2f %9.2f %8.2f\n", preset.c_str(),
                  static_cast<long>(ctx), us, bytes / 1e6, gbps, gbps / bw.read_gbps, fp16_us / us);
      md += absl::StrFormat("| %s | %d | %.1f | %.2f | %.2f | %.2f | %.2f |\n", preset, ctx, us,
                            bytes / 1e6, gbps, gbps / bw.read_gbps, fp16_us / us);
      rows.push_back({{"preset", preset},
                      {"context", ctx},
                      {"us_per_token", us},
                      {"bytes_read", bytes},
                      {"gbps", gbps},
                      {"fraction_of_bandwidth", gbps / bw.read_gbps},
                      {"speedup_vs_fp16", fp16_us / us}});
    }
  }
  nlohmann::json j = {{"threads", threads}, {"read_gbps", bw.read_gbps}, {"rows", rows}};
  return WriteResults(out, name, j, md) ? 0 : 1;
}

}  // namespace
}  // namespace quantkv::bench

int main(int argc, char** argv) { return quantkv::bench::Main(argc, argv); }
