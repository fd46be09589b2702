// The KV sensitivity file: how much quality each layer's (and each KV head's) K or V costs
// when it alone is stored with a cheaper codec. `quantkv sensitivity` writes it
// (runtime/eval/kv_sensitivity.h measures), `quantkv kv-allocate` reads it
// (runtime/kv/kv_bit_allocation.h). JSON, format version 1:
//
// {
//   "format": "quantkv-kv-sensitivity", "version": 1,
//   "model": "SmolLM2-135M-Instruct.Q4_1.gguf", "text": "GPL-3",   (provenance, free text)
//   "base": "fp16",                  every run's KV spec; one layer's K or V is changed
//   "n_layers": 30, "n_kv_heads": 3, "head_dim": 64, "block": 32,
//   "ctx": 512, "chunks": 1, "tokens_scored": 255,
//   "baseline": {"ppl": 14.37, "mean_nll": 2.665},                   the base's own run
//   "head_proxy": "kl",              what ranks heads within a layer: "kl" | "mse" | ""
//   "layers": [
//     {"layer": 0,
//      "k": [{"codec": "int8:g64:asym", "bits_per_element": 8.5,
//             "ppl": 14.37, "dppl": 0.001, "dppl_pct": 0.01, "kl": 2e-5, "top1": 0.996}, ...],
//      "v": [ ...same, one entry per candidate codec... ],
//      "heads": [                    optional: one entry per KV head, same codecs in order
//        {"head": 0, "k": [{"codec": "int8:g64:asym", "mse": 1e-5, "kl": 1e-6}, ...],
//                    "v": [...]}, ...]},
//     ...],
//   "seconds": 412.0,
//   "report": {"spearman": {...}, ...}     how it was measured and how well the proxies rank
//                                          layers; free-form, kept as is, not interpreted
// }
//
// "kl" is the mean KL divergence of the next-token distribution against the base run over
// the scored tokens (runtime/eval/logits_baseline.h), "dppl" = ppl - baseline ppl. Per head,
// "mse" is the codec's relative reconstruction error of that head's rows (sum of squared
// errors over sum of squares) and "kl" the KL with only that head changed, on a shorter
// slice of the text; the field named by head_proxy must be present in every head entry.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace quantkv {

struct KvSensitivityMeasure {
  std::string codec;
  double bits_per_element = 0;
  double ppl = 0;
  double dppl = 0;
  double dppl_pct = 0;
  double kl = 0;
  double top1 = 0;
};

struct KvHeadMeasure {
  std::string codec;
  double mse = -1;  // < 0: not measured
  double kl = -1;
};

struct KvHeadSensitivity {
  int64_t head = 0;
  std::vector<KvHeadMeasure> k, v;  // the layer's codecs, in order
};

struct KvLayerSensitivity {
  int64_t layer = 0;
  std::vector<KvSensitivityMeasure> k, v;  // one per candidate codec
  std::vector<KvHeadSensitivity> heads;    // empty: no per-head data
};

struct KvSensitivity {
  std::string model, text;
  std::string base = "fp16";
  int64_t n_layers = 0, n_kv_heads = 0, head_dim = 0, block = 0;
  int64_t ctx = 0, chunks = 0, tokens_scored = 0;
  double baseline_ppl = 0, baseline_mean_nll = 0;
  std::string head_proxy;  // "kl", "mse" or "" (no per-head data)
  std::vector<KvLayerSensitivity> layers;
  double seconds = 0;
  std::string report_json = "{}";  // a JSON object, written and read back as is
};

// The file's JSON text (pretty-printed).
std::string KvSensitivityToJson(const KvSensitivity& s);
// Parses and checks a file's text; errors name `source` and the offending field
// ("layers[3].k[1].kl").
absl::StatusOr<KvSensitivity> KvSensitivityFromJson(const std::string& text,
                                                    const std::string& source);
absl::StatusOr<KvSensitivity> ReadKvSensitivity(const std::string& path);
absl::Status WriteKvSensitivity(const std::string& path, const KvSensitivity& s);

}  // namespace quantkv
