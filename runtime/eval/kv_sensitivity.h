// Measured KV-cache sensitivity (`quantkv sensitivity`): for each layer, the quality lost
// when only that layer's K (then only its V) is stored with a candidate codec while every
// other layer keeps the base policy (fp16 by default): PPL, ΔPPL and KL / top-1 agreement
// against the base run, on the same windows as `quantkv perplexity` (ctx tokens each, second
// halves scored). The result is a sensitivity file (runtime/kv/kv_sensitivity_file.h) for
// `quantkv kv-allocate`.
//
// Per KV head a full sweep would cost n_kv_heads times as much, so heads get a cheap proxy:
//  - "mse": the codec's relative reconstruction error of that head's K or V rows, recorded
//    during the base run (free: no extra forward passes; recorded with "kl" too). Keys are
//    taken as the cache encodes them (post-RoPE, or pre-RoPE under rope=pre) but without a
//    base's Hadamard rotation;
//  - "kl": KL against the base with only that head changed, on a shorter slice of the text
//    (proxy_ctx x proxy_chunks tokens; needs per-head policies, "L.hH.k=CODEC").
// How well each proxy ranks layers like the full measurement does (Spearman over layers,
// a layer's proxy being the sum over its heads) goes into the file's report.
//
// Speed: one window per forward pass on a multi-cache engine (each configuration is its own
// KV cache of one engine, so weights load once per `caches_per_engine` configurations), and
// logits only for the scored second half.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/engine/engine.h"
#include "runtime/kv/kv_sensitivity_file.h"

namespace quantkv {

struct KvSensitivityOptions {
  // The KV spec every run starts from (a preset or spec; no static scales).
  std::string base = "fp16";
  std::vector<std::string> k_codecs;  // candidate codecs for keys, e.g. "int2:g64:asym"
  std::vector<std::string> v_codecs;  // and for values
  std::vector<int64_t> layers;        // layers to measure; empty: all
  int64_t ctx = 512;
  int64_t chunks = 1;              // windows (at most what the text holds)
  int32_t bos_id = -1;             // >= 0: the first token of each window is replaced by BOS
  std::string head_proxy = "mse";  // "mse", "kl" or "none"
  int64_t proxy_ctx = 256;         // "kl": window of the per-head runs
  int64_t proxy_chunks = 1;
  int64_t caches_per_engine = 16;
  // Called after every run: a stage name ("layers", "heads"), runs done and in that stage.
  std::function<void(const std::string& stage, int64_t done, int64_t total)> progress;
};

// Makes an engine from a config that this module fills in (kv_spec, more_kv_specs,
// kv_max_bytes, max_chunk_tokens, kv_observer); the factory adds threads and the weights.
using KvEngineFactory =
    std::function<absl::StatusOr<std::unique_ptr<Engine>>(const EngineConfig& config)>;

absl::StatusOr<KvSensitivity> MeasureKvSensitivity(const KvEngineFactory& make_engine,
                                                   std::span<const int32_t> tokens,
                                                   const KvSensitivityOptions& options);

// Spearman's rank correlation of two equally long series (ties get their average rank);
// 0 when either series is constant or shorter than 2.
double SpearmanRho(std::span<const double> a, std::span<const double> b);

}  // namespace quantkv
