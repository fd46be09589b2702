// Which codec stores each layer's keys and values, and which tokens stay in full
// precision. Selected with `--kv SPEC`: a preset name, a spec string, or @policy.json.
//
// Spec grammar (comma-separated, later items override earlier ones):
//   PRESET                 a preset's items, to amend: "int2-comp,rope=pre"
//   CODEC                  keys and values (e.g. "int4", "int4:g32:sym", "fp8")
//   k=CODEC | v=CODEC      keys or values only ("k=int2:chan,v=int2:g32")
//   L.k=CODEC | L.v=CODEC  one layer (0-based), e.g. "0.k=int8"
//   L.hH.k=CODEC | L.hH.v=CODEC  one KV head H of layer L (mixed precision per head), e.g.
//                          "3.h1.k=int2"; starts from the layer's codecs at that point
//   sink=N                 the first N tokens stay in fp16 (attention sinks)
//   window=N               the most recent N tokens stay in fp16
//   block=N                tokens per cache block (default 32)
//   rope=pre|post          keys encoded before or after the rotary embedding (default post)
//   rotate=none|k|v|kv     Hadamard-rotate K and/or V rows before encoding (QuaRot)
//   temp=X | L.temp=X      softmax temperature of attention (0.5 <= X <= 2; default 1)
// A policy file holds {"spec": "..."} or {"block":32,"sink":4,"window":32,"rope":"pre",
//   "k":"int4:chan","v":"int4","layers":{"0":{"k":"int8","v":"int8","heads":{"1":{"k":"int2"}}}}},
//   and for codecs
//   with static scales (`quantkv calibrate` writes such files) "static_scales":
//   {"0":{"k":{"scale":[...],"min":[...]},"v":{...}}, ...} with n_kv_heads * head_dim
//   values per list, head-major; for codebooks fitted by calibration (nlN:lloyd)
//   "codebooks": {"0":{"k":[2^bits levels],"v":[...]}, ...}; for learnclip codecs
//   "clip_models": {"0":{"k":[5 weights],"v":[...]}, ...}.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "kernels/kv_codec.h"

namespace quantkv {

struct LayerKvPolicy {
  kernels::KvCodecSpec k;
  kernels::KvCodecSpec v;
};

// Calibrated per-channel scales of one layer's K or V for codecs with static scales:
// [n_kv_heads][head_dim] each; `min` is empty for symmetric codecs.
struct StaticScales {
  std::vector<float> scale;
  std::vector<float> min;
};

struct LayerStaticScales {
  StaticScales k, v;
};

// Calibrated vectors of one layer's K and V codecs, empty where a side has none: codebook
// levels (nlN:lloyd: 2^bits ascending values in [-1, 1]), centroids (pqMxB), or clip-model
// weights (learnclip, kernels/kv_clip_model.h).
struct LayerKvVectors {
  std::vector<float> k, v;
};

struct KvPolicy {
  std::string name;  // the preset or the spec it was parsed from
  LayerKvPolicy all;
  absl::flat_hash_map<int64_t, LayerKvPolicy> layers;  // per-layer overrides
  // Per-head overrides, keyed by (layer, kv head): heads of one layer may differ.
  absl::flat_hash_map<std::pair<int64_t, int64_t>, LayerKvPolicy> heads;
  int64_t block_tokens = 32;
  int64_t sink_tokens = 0;
  int64_t window_tokens = 0;
  // Keys are encoded before RoPE and rotated after decoding (KVQuant's pre-RoPE keys).
  bool pre_rope_keys = false;
  // Encoded K / V rows are stored randomized-Hadamard rotated (kernels/hadamard.h).
  bool rotate_k = false;
  bool rotate_v = false;
  // Softmax temperature of attention over this cache (scores divided by it): quantization
  // noise in keys widens the spread of scores, and a temperature slightly above 1 takes that
  // back. Per-layer values override the global one.
  float temperature = 1.0f;
  absl::flat_hash_map<int64_t, float> layer_temperature;
  absl::flat_hash_map<int64_t, LayerStaticScales> static_scales;  // by layer
  absl::flat_hash_map<int64_t, LayerKvVectors> codebooks;         // by layer
  absl::flat_hash_map<int64_t, LayerKvVectors> clip_models;       // by layer

  const LayerKvPolicy& ForLayer(int64_t layer) const;
  // The codecs of one KV head: its override, else the layer's.
  const LayerKvPolicy& ForHead(int64_t layer, int64_t head) const;
  bool HasHeadOverrides(int64_t layer) const;
  // Scales of `layer`, or nullptr when the file gave none.
  const LayerStaticScales* StaticScalesFor(int64_t layer) const;
  // Codebooks of `layer`, or nullptr when the file gave none.
  const LayerKvVectors* CodebooksFor(int64_t layer) const;
  const LayerKvVectors* ClipModelsFor(int64_t layer) const;
  // 1 / temperature of `layer`: the factor on its attention scores.
  float ScoreScale(int64_t layer) const;
  // The spec grammar for everything but static scales ("k=...,v=...,L.k=...,sink=..").
  std::string ToSpec() const;
  // Protected tokens live in fp32 when the whole cache is fp32, else fp16.
  bool protected_fp32() const;
};

struct KvPreset {
  std::string name;
  std::string spec;
  std::string description;
};

// The named presets, in the order `quantkv kv-presets` lists them.
const std::vector<KvPreset>& KvPresets();

// A preset name, a spec string, or "@FILE" (JSON). Layer indices are checked against
// n_layers when given (> 0), head indices against n_kv_heads when given (> 0). Errors name
// the offending item.
absl::StatusOr<KvPolicy> ParseKvPolicy(std::string_view text, int64_t n_layers = 0,
                                       int64_t n_kv_heads = 0);

}  // namespace quantkv
