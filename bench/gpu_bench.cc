// GPU benchmarks of issue 7, judged against bounds measured in the same run:
//   attention  decode attention per step over a paged quantized cache (SmolLM2's geometry:
//              9 query heads, 3 KV heads, head_dim 64, one layer) at contexts 8k/32k/100k,
//              batch 1 and 32, per cache type: time, bytes read, achieved bandwidth against a
//              device-to-device copy timed here, and speed-up over FP16;
//   decode     end-to-end decode tokens/s of the model on the GPU (EngineConfig::device
//              "cuda") at batch 1, 16, 64, FP16 against int4-comp caches, and the longest
//              context each preset fits in a fixed KV budget.
// Prints a table per part and writes DIR/gpu-attention.{json,md}, DIR/gpu-decode.{json,md}.
//
//   gpu_bench [--out DIR] [--model PATH] [--parts attention,decode] [--quick]
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "bench/results.h"
#include "kernels/attention.h"
#include "kernels/kv_slab_format.h"
#include "runtime/engine/device_forward.h"
#include "runtime/engine/engine.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/kv/kv_policy.h"
#include "runtime/model/gguf_model.h"

namespace quantkv::bench {
namespace {

#define CUDA_OR_DIE(expr)                                                               \
  do {                                                                                  \
    const cudaError_t e = (expr);                                                       \
    if (e != cudaSuccess) {                                                             \
      std::fprintf(stderr, "gpu_bench: %s failed: %s\n", #expr, cudaGetErrorString(e)); \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

struct Args {
  std::string out = "bench/results";
  std::string model;
  bool attention = true, decode = true, quick = false;
};

std::string DefaultModel() {
  const char* h = std::getenv("QUANTKV_HOME");
  if (h != nullptr && *h != '\0') return std::string(h) + "/SmolLM2-135M-Instruct.Q4_1.gguf";
  return std::string(std::getenv("HOME") ? std::getenv("HOME") : ".") +
         "/.cache/quantkv/SmolLM2-135M-Instruct.Q4_1.gguf";
}

// The device as the engine opens it (node-local rank's GPU), with the driver and runtime.
std::string DeviceLine() {
  absl::StatusOr<DeviceInfo> info = OpenCudaDevice();
  if (!info.ok()) {
    std::cerr << "gpu_bench: " << info.status() << "\n";
    std::exit(1);
  }
  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  return absl::StrFormat("%s (sm_%d%d, %d MB), CUDA driver %d.%d, runtime %d.%d", info->name,
                         info->sm_major, info->sm_minor, info->total_bytes >> 20, driver / 1000,
                         driver % 1000 / 10, runtime / 1000, runtime % 1000 / 10);
}

// Device-to-device copy of `bytes`: bytes moved (read + written) per second.
double CopyBandwidth(int64_t bytes) {
  void *a = nullptr, *b = nullptr;
  CUDA_OR_DIE(cudaMalloc(reinterpret_cast<void**>(&a), bytes));
  CUDA_OR_DIE(cudaMalloc(reinterpret_cast<void**>(&b), bytes));
  CUDA_OR_DIE(cudaMemset(a, 1, bytes));
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  CUDA_OR_DIE(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
  constexpr int kReps = 10;
  cudaEventRecord(e0);
  for (int i = 0; i < kReps; ++i) cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice);
  cudaEventRecord(e1);
  CUDA_OR_DIE(cudaEventSynchronize(e1));
  float ms = 0;
  cudaEventElapsedTime(&ms, e0, e1);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * static_cast<double>(bytes) * kReps / (ms * 1e-3);
}

struct AttentionRow {
  std::string cache;
  int64_t context = 0, batch = 0;
  double ms = 0, bytes = 0, gbps = 0, of_copy = 0, vs_fp16 = 0;
};

// One cache type at one context and batch: every sequence at full length, one decode row
// each, through kernels::cuda::PagedAttention on one layer.
AttentionRow TimeAttention(const std::string& name, const std::string& spec_text, int64_t context,
                           int64_t batch, double copy_bw) {
  constexpr int64_t kKvHeads = 3, kHeads = 9, kDim = 64, kBlock = 128, kRing = kBlock + 512;
  const kernels::KvCodecSpec spec = *kernels::ParseKvCodecSpec(spec_text);
  const kernels::KvSlabFormat f = *kernels::KvSlabFormatOf(spec, kDim, kBlock);
  const int64_t blocks_per_seq = context / kBlock;
  const int64_t tail = context - blocks_per_seq * kBlock;
  const int64_t block_stride = 2 * kKvHeads * f.slab_bytes;
  const int64_t pool_bytes = batch * std::max<int64_t>(1, blocks_per_seq) * block_stride;
  const int64_t ring_bytes = 2 * kRing * kKvHeads * kDim * 2;
  uint8_t *pool = nullptr, *rings = nullptr;
  CUDA_OR_DIE(cudaMalloc(reinterpret_cast<void**>(&pool), pool_bytes));
  CUDA_OR_DIE(cudaMalloc(reinterpret_cast<void**>(&rings), batch * ring_bytes));
  // 0x21 bytes are valid everywhere: fp16 0x2121 ~ 0.0106 (values, scales, minima), codes 33
  // / nibbles 1 and 2 / e4m3 0x21. Timing does not depend on the values.
  CUDA_OR_DIE(cudaMemset(pool, 0x21, pool_bytes));
  CUDA_OR_DIE(cudaMemset(rings, 0x21, batch * ring_bytes));
  std::vector<int32_t> tables(batch * std::max<int64_t>(1, blocks_per_seq));
  for (size_t i = 0; i < tables.size(); ++i) tables[i] = static_cast<int32_t>(i);
  // Physical blocks shuffled, as a pool that served many requests holds them.
  std::shuffle(tables.begin(), tables.end(), std::mt19937(7));
  int32_t* d_tables = nullptr;
  CUDA_OR_DIE(cudaMalloc(reinterpret_cast<void**>(&d_tables), tables.size() * 4));
  CUDA_OR_DIE(cudaMemcpy(d_tables, tables.data(), tables.size() * 4, cudaMemcpyHostToDevice));
  std::vector<kernels::cuda::DeviceSeqKv> seqs(batch);
  std::vector<int32_t> positions(batch, static_cast<int32_t>(context - 1)), row_seq(batch);
  for (int64_t s = 0; s < batch; ++s) {
    row_seq[s] = static_cast<int32_t>(s);
    kernels::cuda::DeviceSeqKv& v = seqs[s];
    v.block_table = d_tables + s * std::max<int64_t>(1, blocks_per_seq);
    v.n_blocks = blocks_per_seq;
    v.n_tokens = context;
    v.k_ring = rings + s * ring_bytes;
    v.v_ring = rings + s * ring_bytes + ring_bytes / 2;
  }
  kernels::cuda::DeviceSeqKv* d_seqs = nullptr;
  int32_t *d_pos = nullptr, *d_row_seq = nullptr;
  float *d_q = nullptr, *d_out = nullptr;
  CUDA_OR_DIE(
      cudaMalloc(reinterpret_cast<void**>(&d_seqs), batch * sizeof(kernels::cuda::DeviceSeqKv)));
  CUDA_OR_DIE(cudaMalloc(reinterpret_cast<void**>(&d_pos), batch * 4));
  CUDA_OR_DIE(cudaMalloc(reinterpret_cast<void**>(&d_row_seq), batch * 4));
  CUDA_OR_DIE(cudaMalloc(reinterpret_cast<void**>(&d_q), batch * kHeads * kDim * 4));
  CUDA_OR_DIE(cudaMalloc(reinterpret_cast<void**>(&d_out), batch * kHeads * kDim * 4));
  CUDA_OR_DIE(cudaMemset(d_q, 0x21, batch * kHeads * kDim * 4));
  CUDA_OR_DIE(cudaMemcpy(d_seqs, seqs.data(), batch * sizeof(kernels::cuda::DeviceSeqKv),
                         cudaMemcpyHostToDevice));
  CUDA_OR_DIE(cudaMemcpy(d_pos, positions.data(), batch * 4, cudaMemcpyHostToDevice));
  CUDA_OR_DIE(cudaMemcpy(d_row_seq, row_seq.data(), batch * 4, cudaMemcpyHostToDevice));
  const int64_t ws_bytes =
      kernels::cuda::PagedAttentionWorkspaceBytes(batch, kHeads, kDim, context);
  void* ws = nullptr;
  CUDA_OR_DIE(cudaMalloc(reinterpret_cast<void**>(&ws), std::max<int64_t>(ws_bytes, 1)));

  kernels::cuda::DeviceKvLayer kv;
  kv.k_format = f;
  kv.v_format = f;
  kv.k_base = pool;
  kv.v_base = pool + kKvHeads * f.slab_bytes;
  kv.block_stride = block_stride;
  kv.n_kv_heads = kKvHeads;
  kv.head_dim = kDim;
  kv.block_tokens = kBlock;
  kv.ring_tokens = kRing;
  kernels::cuda::DeviceAttentionBatch ab;
  ab.q = d_q;
  ab.positions = d_pos;
  ab.row_seq = d_row_seq;
  ab.seqs = d_seqs;
  ab.rows = batch;
  ab.n_heads = kHeads;
  ab.scale = 0.125f;
  ab.max_context = context;
  ab.out = d_out;
  ab.workspace = ws;
  ab.workspace_bytes = ws_bytes;
  absl::Status s = kernels::cuda::PagedAttention(kv, ab, nullptr);
  if (!s.ok()) {
    std::cerr << "gpu_bench: PagedAttention " << name << ": " << s << "\n";
    std::exit(1);
  }
  CUDA_OR_DIE(cudaDeviceSynchronize());
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  const int reps = context >= 65536 ? 20 : 50;
  cudaEventRecord(e0);
  for (int i = 0; i < reps; ++i) (void)kernels::cuda::PagedAttention(kv, ab, nullptr);
  cudaEventRecord(e1);
  CUDA_OR_DIE(cudaEventSynchronize(e1));
  float ms = 0;
  cudaEventElapsedTime(&ms, e0, e1);
  AttentionRow r;
  r.cache = name;
  r.context = context;
  r.batch = batch;
  r.ms = ms / reps;
  // What a step must read: every encoded block's K and V slabs, the tail rows (fp16), q.
  r.bytes = static_cast<double>(batch) *
            (blocks_per_seq * block_stride + 2.0 * tail * kKvHeads * kDim * 2 + kHeads * kDim * 4);
  r.gbps = r.bytes / (r.ms * 1e-3) / 1e9;
  r.of_copy = r.bytes / (r.ms * 1e-3) / copy_bw;
  cudaFree(ws);
  cudaFree(d_out);
  cudaFree(d_q);
  cudaFree(d_row_seq);
  cudaFree(d_pos);
  cudaFree(d_seqs);
  cudaFree(d_tables);
  cudaFree(rings);
  cudaFree(pool);
  return r;
}

void AttentionPart(const Args& a, const std::string& device) {
  const double copy_bw = CopyBandwidth(int64_t{1} << 30);
  const std::vector<std::pair<std::string, std::string>> caches = {
      {"fp16", "fp16"},          {"fp8", "fp8:g64"},         {"int8", "int8:g64:asym"},
      {"int4", "int4:g64:asym"}, {"int4-chan", "int4:chan"}, {"int2", "int2:g64:asym"}};
  std::vector<int64_t> contexts = {8192, 32768, 100000};
  if (a.quick) contexts = {8192, 32768};
  nlohmann::json rows = nlohmann::json::array();
  std::string md = absl::StrFormat(
      "Device: %s. Copy bandwidth (device-to-device, read + write): %.0f GB/s.\n\n"
      "Decode attention, one layer of SmolLM2 (9 query / 3 KV heads, head_dim 64, blocks of "
      "128), every sequence at full context, one query row each. `of copy` is the bytes a step "
      "must read over its time, against the copy's bytes moved per second.\n\n"
      "| cache | context | batch | ms/step | MB read | GB/s | of copy | speed-up vs fp16 |\n"
      "|---|---|---|---|---|---|---|---|\n",
      device, copy_bw / 1e9);
  std::printf("%-10s %8s %6s %9s %9s %8s %8s %8s\n", "cache", "context", "batch", "ms/step",
              "MB read", "GB/s", "of copy", "vs fp16");
  for (int64_t context : contexts) {
    for (int64_t batch : {int64_t{1}, int64_t{32}}) {
      double fp16_ms = 0;
      for (const auto& [name, spec] : caches) {
        AttentionRow r = TimeAttention(name, spec, context, batch, copy_bw);
        if (name == "fp16") fp16_ms = r.ms;
        r.vs_fp16 = fp16_ms / r.ms;
        std::printf("%-10s %8lld %6lld %9.4f %9.2f %8.0f %7.0f%% %7.2fx\n", name.c_str(),
                    static_cast<long long>(context), static_cast<long long>(batch), r.ms,
                    r.bytes / 1e6, r.gbps, 100 * r.of_copy, r.vs_fp16);
        md += absl::StrFormat("| %s | %d | %d | %.4f | %.2f | %.0f | %.0f%% | %.2fx |\n", name,
                              context, batch, r.ms, r.bytes / 1e6, r.gbps, 100 * r.of_copy,
                              r.vs_fp16);
        rows.push_back({{"cache", name},
                        {"spec", spec},
                        {"context", context},
                        {"batch", batch},
                        {"ms", r.ms},
                        {"bytes", r.bytes},
                        {"gbps", r.gbps},
                        {"of_copy", r.of_copy},
                        {"vs_fp16", r.vs_fp16}});
      }
    }
  }
  md += "\nTargets (issue 7): INT4 at >= 70% of copy bandwidth, >= 3x faster than FP16 at 32k.\n";
  WriteResults(a.out, "gpu-attention",
               {{"device", device}, {"copy_bytes_per_s", copy_bw}, {"rows", rows}}, md);
}

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void DecodePart(const Args& a, const std::string& device) {
  constexpr int64_t kPrompt = 512;
  const int64_t steps = a.quick ? 16 : 64;
  nlohmann::json rows = nlohmann::json::array();
  std::string md = absl::StrFormat(
      "Device: %s. SmolLM2-135M (bf16 weights on the GPU), each sequence prefilled with %d "
      "random tokens, then %d decode steps of the whole batch; logits of every row copied to "
      "the host and sampled greedily there.\n\n"
      "| cache | batch | prefill s | decode tok/s | ms/step |\n|---|---|---|---|---|\n",
      device, kPrompt, steps);
  std::printf("\n%-10s %6s %10s %13s %9s\n", "cache", "batch", "prefill s", "decode tok/s",
              "ms/step");
  for (const char* kv : {"fp16", "int4-comp"}) {
    for (int64_t batch : {int64_t{1}, int64_t{16}, int64_t{64}}) {
      auto model = GgufModel::Open(a.model);
      if (!model.ok()) {
        std::cerr << "gpu_bench: " << model.status() << "\n";
        std::exit(1);
      }
      EngineConfig cfg;
      cfg.device = "cuda";
      cfg.kv_spec = kv;
      cfg.kv_max_bytes = int64_t{4} << 30;
      cfg.max_chunk_tokens = kPrompt;
      auto engine = Engine::Create(std::move(*model), cfg);
      if (!engine.ok()) {
        std::cerr << "gpu_bench: " << engine.status() << "\n";
        std::exit(1);
      }
      Engine& e = **engine;
      std::mt19937 rng(1);
      std::uniform_int_distribution<int32_t> tok(
          0, static_cast<int32_t>(e.model_config().vocab_size - 1));
      std::vector<SequenceId> seqs;
      std::vector<std::vector<int32_t>> prompts(batch);
      std::vector<float> logits;
      const double t0 = Now();
      for (int64_t s = 0; s < batch; ++s) {
        seqs.push_back(e.NewSequence());
        for (int64_t i = 0; i < kPrompt; ++i) prompts[s].push_back(tok(rng));
        logits.clear();
        absl::Status st = e.Forward(seqs.back(), prompts[s], false, &logits);
        if (!st.ok()) {
          std::cerr << "gpu_bench: prefill: " << st << "\n";
          std::exit(1);
        }
      }
      const double prefill = Now() - t0;
      const int64_t V = e.model_config().vocab_size;
      std::vector<int32_t> next(batch, 1);
      const double t1 = Now();
      for (int64_t step = 0; step < steps; ++step) {
        std::vector<StepInput> inputs(batch);
        for (int64_t s = 0; s < batch; ++s) inputs[s] = {seqs[s], {&next[s], 1}, false};
        logits.clear();
        absl::Status st = e.Step(inputs, &logits);
        if (!st.ok()) {
          std::cerr << "gpu_bench: decode: " << st << "\n";
          std::exit(1);
        }
        for (int64_t s = 0; s < batch; ++s) {
          const float* row = logits.data() + s * V;
          next[s] = static_cast<int32_t>(std::max_element(row, row + V) - row);
        }
      }
      const double decode = Now() - t1;
      const double tps = static_cast<double>(batch * steps) / decode;
      std::printf("%-10s %6lld %10.2f %13.0f %9.3f\n", kv, static_cast<long long>(batch), prefill,
                  tps, 1e3 * decode / steps);
      md += absl::StrFormat("| %s | %d | %.2f | %.0f | %.3f |\n", kv, batch, prefill, tps,
                            1e3 * decode / steps);
      rows.push_back({{"cache", kv},
                      {"batch", batch},
                      {"prefill_s", prefill},
                      {"decode_tokens_per_s", tps},
                      {"ms_per_step", 1e3 * decode / steps}});
    }
  }
  // The longest context per preset in a fixed KV budget (bytes per token from the cache's
  // own accounting: codes, scales, protected fp16 tokens).
  constexpr int64_t kBudget = int64_t{1} << 30;
  md +=
      "\nLongest single context in a 1 GiB KV budget (SmolLM2: 30 layers, 3 KV heads, 64):\n\n"
      "| preset | bits/element at 100k | tokens in 1 GiB |\n|---|---|---|\n";
  nlohmann::json fits = nlohmann::json::array();
  for (const char* kv : {"fp16", "fp8", "int8", "int4", "int4-comp", "int2-comp"}) {
    KvCacheConfig c;
    c.n_layers = 30;
    c.n_kv_heads = 3;
    c.head_dim = 64;
    c.policy = *ParseKvPolicy(kv, 30, 3);
    c.max_bytes = kBudget;
    auto cache = KvCache::Create(c);
    if (!cache.ok()) continue;
    const double bpt = (*cache)->BytesPerTokenAt(100000);
    const int64_t tokens = static_cast<int64_t>(static_cast<double>(kBudget) / bpt);
    md += absl::StrFormat("| %s | %.2f | %d |\n", kv, (*cache)->BitsPerElementAt(100000), tokens);
    fits.push_back({{"preset", kv}, {"tokens", tokens}, {"bytes_per_token", bpt}});
  }
  WriteResults(a.out, "gpu-decode", {{"device", device}, {"rows", rows}, {"fits_1gib", fits}}, md);
}

int Main(int argc, char** argv) {
  Args a;
  a.model = DefaultModel();
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    if (f == "--quick") {
      a.quick = true;
      continue;
    }
    if (i + 1 >= argc) {
      std::cerr << "gpu_bench: flag " << f << " needs a value\n";
      return 2;
    }
    const std::string v = argv[++i];
    if (f == "--out") {
      a.out = v;
    } else if (f == "--model") {
      a.model = v;
    } else if (f == "--parts") {
      a.attention = v.find("attention") != std::string::npos;
      a.decode = v.find("decode") != std::string::npos;
    } else {
      std::cerr << "gpu_bench: unknown flag " << f << "\n";
      return 2;
    }
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::cerr << "gpu_bench: no CUDA device\n";
    return 1;
  }
  const std::string device = DeviceLine();
  std::cout << "device: " << device << "\n";
  if (a.attention) AttentionPart(a, device);
  if (a.decode) DecodePart(a, device);
  return 0;
}

}  // namespace
}  // namespace quantkv::bench

int main(int argc, char** argv) { return quantkv::bench::Main(argc, argv); }
