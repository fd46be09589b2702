#include "runtime/kv/kv_policy.h"

#include <algorithm>
#include <charconv>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"

namespace quantkv {
namespace {

absl::StatusOr<int64_t> ParseCount(std::string_view key, std::string_view value, int64_t lo,
                                   int64_t hi) {
  int64_t v = 0;
  const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), v);
  if (ec != std::errc() || end != value.data() + value.size() || v < lo || v > hi) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KV spec: %s=%s is not an integer in [%d, %d]", std::string(key),
                        std::string(value), lo, hi));
  }
  return v;
}

struct Limits {
  int64_t n_layers = 0;    // > 0: layer indices are checked
  int64_t n_kv_heads = 0;  // > 0: head indices are checked
};

void SetCodecs(LayerKvPolicy& lp, std::string_view which, const kernels::KvCodecSpec& c) {
  if (which != "v") lp.k = c;
  if (which != "k") lp.v = c;
}

absl::Status ApplyItem(KvPolicy& p, std::string_view item, const Limits& lim,
                       bool expand_presets = true) {
  const size_t eq = item.find('=');
  if (eq == std::string_view::npos) {
    // A preset name stands for its items, so "int2-comp,rope=pre" amends a preset. (Preset
    // specs are plain items: no recursion past one level.)
    for (const KvPreset& preset : KvPresets()) {
      if (!expand_presets || preset.name != item) continue;
      for (absl::string_view sub : absl::StrSplit(preset.spec, ',')) {
        if (absl::Status s = ApplyItem(p, std::string_view(sub.data(), sub.size()), lim, false);
            !s.ok()) {
          return s;
        }
      }
      return absl::OkStatus();
    }
    absl::StatusOr<kernels::KvCodecSpec> c = kernels::ParseKvCodecSpec(item);
    if (!c.ok()) return c.status();
    p.all.k = p.all.v = *c;
    p.layers.clear();
    p.heads.clear();
    return absl::OkStatus();
  }
  const std::string_view key = item.substr(0, eq);
  const std::string_view value = item.substr(eq + 1);
  if (key == "sink") {
    absl::StatusOr<int64_t> v = ParseCount(key, value, 0, 1 << 20);
    if (!v.ok()) return v.status();
    p.sink_tokens = *v;
    return absl::OkStatus();
  }
  if (key == "window") {
    absl::StatusOr<int64_t> v = ParseCount(key, value, 0, 1 << 20);
    if (!v.ok()) return v.status();
    p.window_tokens = *v;
    return absl::OkStatus();
  }
  if (key == "block") {
    absl::StatusOr<int64_t> v = ParseCount(key, value, 1, 4096);
    if (!v.ok()) return v.status();
    p.block_tokens = *v;
    return absl::OkStatus();
  }
  if (key == "rope") {
    if (value != "pre" && value != "post") {
      return absl::InvalidArgumentError(
          absl::StrFormat("KV spec: rope=%s (want rope=pre or rope=post)", std::string(value)));
    }
    p.pre_rope_keys = value == "pre";
    return absl::OkStatus();
  }
  const auto parse_temp = [&](std::string_view v) -> absl::StatusOr<float> {
    float t = 0;
    const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), t);
    if (ec != std::errc() || end != v.data() + v.size() || !(t >= 0.5f && t <= 2.0f)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "KV spec: %s=%s is not a temperature in [0.5, 2]", std::string(key), std::string(v)));
    }
    return t;
  };
  if (key == "temp") {
    absl::StatusOr<float> t = parse_temp(value);
    if (!t.ok()) return t.status();
    p.temperature = *t;
    p.layer_temperature.clear();
    return absl::OkStatus();
  }
  if (key.size() > 5 && key.substr(key.size() - 5) == ".temp") {
    absl::StatusOr<int64_t> layer = ParseCount("layer", key.substr(0, key.size() - 5), 0,
                                               lim.n_layers > 0 ? lim.n_layers - 1 : 1 << 20);
    if (!layer.ok()) return layer.status();
    absl::StatusOr<float> t = parse_temp(value);
    if (!t.ok()) return t.status();
    p.layer_temperature[*layer] = *t;
    return absl::OkStatus();
  }
  if (key == "rotate") {
    if (value != "none" && value != "k" && value != "v" && value != "kv") {
      return absl::InvalidArgumentError(
          absl::StrFormat("KV spec: rotate=%s (want rotate=none, k, v or kv)", std::string(value)));
    }
    p.rotate_k = value == "k" || value == "kv";
    p.rotate_v = value == "v" || value == "kv";
    return absl::OkStatus();
  }
  absl::StatusOr<kernels::KvCodecSpec> c = kernels::ParseKvCodecSpec(value);
  if (!c.ok()) return c.status();
  if (key == "k" || key == "v" || key == "kv") {
    SetCodecs(p.all, key, *c);
    for (auto& [l, lp] : p.layers) SetCodecs(lp, key, *c);
    for (auto& [lh, hp] : p.heads) SetCodecs(hp, key, *c);
    return absl::OkStatus();
  }
  // L.k / L.v / L.kv, or L.hH.k / L.hH.v / L.hH.kv
  const std::vector<absl::string_view> parts =
      absl::StrSplit(absl::string_view(key.data(), key.size()), '.');
  const std::string_view which(parts.back().data(), parts.back().size());
  if ((parts.size() == 2 || parts.size() == 3) && (which == "k" || which == "v" || which == "kv")) {
    absl::StatusOr<int64_t> layer =
        ParseCount("layer", std::string_view(parts[0].data(), parts[0].size()), 0,
                   lim.n_layers > 0 ? lim.n_layers - 1 : 1 << 20);
    if (!layer.ok()) return layer.status();
    if (parts.size() == 2) {
      SetCodecs(p.layers.try_emplace(*layer, p.all).first->second, which, *c);
      for (auto& [lh, hp] : p.heads) {
        if (lh.first == *layer) SetCodecs(hp, which, *c);
      }
      return absl::OkStatus();
    }
    if (!absl::StartsWith(parts[1], "h")) {
      return absl::InvalidArgumentError(
          absl::StrFormat("KV spec: '%s' wants a head as hH (e.g. %d.h1.%s)", std::string(key),
                          *layer, std::string(which)));
    }
    absl::StatusOr<int64_t> head =
        ParseCount("head", std::string_view(parts[1].data() + 1, parts[1].size() - 1), 0,
                   lim.n_kv_heads > 0 ? lim.n_kv_heads - 1 : 1 << 16);
    if (!head.ok()) return head.status();
    SetCodecs(p.heads.try_emplace({*layer, *head}, p.ForLayer(*layer)).first->second, which, *c);
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrFormat(
      "KV spec: unknown key '%s' (expected k, v, kv, L.k, L.v, L.hH.k, L.hH.v, sink, window, "
      "block, rope, rotate, temp, L.temp)",
      std::string(key)));
}

absl::StatusOr<KvPolicy> ParseSpec(std::string_view text, const Limits& lim) {
  KvPolicy p;
  p.name = std::string(text);
  if (text.empty()) return absl::InvalidArgumentError("KV spec is empty");
  for (absl::string_view item : absl::StrSplit(absl::string_view(text.data(), text.size()), ',')) {
    if (item.empty()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("KV spec '%s' has an empty item", std::string(text)));
    }
    absl::Status s = ApplyItem(p, std::string_view(item.data(), item.size()), lim);
    if (!s.ok()) return s;
  }
  return p;
}

// "FIELD": {"L": {"k": [numbers], "v": [numbers]}, ...} into out[L].
absl::Status ParseLayerVectors(const nlohmann::json& j, const char* field, const std::string& path,
                               int64_t n_layers,
                               absl::flat_hash_map<int64_t, LayerKvVectors>& out) {
  if (!j.contains(field)) return absl::OkStatus();
  const nlohmann::json& all = j[field];
  if (!all.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KV policy file %s: '%s' must be an object", path, field));
  }
  for (const auto& [layer_key, entry] : all.items()) {
    absl::StatusOr<int64_t> layer = ParseCount(absl::StrFormat("%s layer", field), layer_key, 0,
                                               n_layers > 0 ? n_layers - 1 : 1 << 20);
    if (!layer.ok()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("KV policy file %s: %s", path, layer.status().message()));
    }
    LayerKvVectors& dst = out[*layer];
    for (const char* kv : {"k", "v"}) {
      if (!entry.is_object() || !entry.contains(kv)) continue;
      const nlohmann::json& a = entry[kv];
      if (!a.is_array()) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "KV policy file %s: %s.%s.%s must be an array of numbers", path, field, layer_key, kv));
      }
      for (const nlohmann::json& x : a) {
        if (!x.is_number()) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "KV policy file %s: %s.%s.%s holds a non-number", path, field, layer_key, kv));
        }
        (kv[0] == 'k' ? dst.k : dst.v).push_back(x.get<float>());
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<KvPolicy> ParseFile(const std::string& path, const Limits& lim) {
  const int64_t n_layers = lim.n_layers;
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrFormat("KV policy file %s: cannot open", path));
  std::stringstream buf;
  buf << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(buf.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KV policy file %s: not a JSON object", path));
  }
  std::string spec;
  auto add = [&spec](const std::string& item) { spec += (spec.empty() ? "" : ",") + item; };
  auto field_string = [&](const nlohmann::json& o, const char* key,
                          std::string* out) -> absl::Status {
    if (!o.contains(key)) return absl::OkStatus();
    if (!o[key].is_string()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("KV policy file %s: field '%s' must be a string", path, key));
    }
    *out = o[key].get<std::string>();
    return absl::OkStatus();
  };
  std::string s;
  if (absl::Status st = field_string(j, "spec", &s); !st.ok()) return st;
  if (!s.empty()) add(s);
  for (const char* key : {"block", "sink", "window"}) {
    if (!j.contains(key)) continue;
    if (!j[key].is_number_integer()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("KV policy file %s: field '%s' must be an integer", path, key));
    }
    add(absl::StrFormat("%s=%d", key, j[key].get<int64_t>()));
  }
  for (const char* key : {"k", "v", "rope", "rotate"}) {
    std::string c;
    if (absl::Status st = field_string(j, key, &c); !st.ok()) return st;
    if (!c.empty()) add(absl::StrFormat("%s=%s", key, c));
  }
  if (j.contains("layers")) {
    if (!j["layers"].is_object()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("KV policy file %s: 'layers' must be an object", path));
    }
    for (const auto& [layer, lp] : j["layers"].items()) {
      for (const char* key : {"k", "v"}) {
        std::string c;
        if (!lp.is_object()) {
          return absl::InvalidArgumentError(
              absl::StrFormat("KV policy file %s: layers.%s must be an object", path, layer));
        }
        if (absl::Status st = field_string(lp, key, &c); !st.ok()) return st;
        if (!c.empty()) add(absl::StrFormat("%s.%s=%s", layer, key, c));
      }
      if (!lp.contains("heads")) continue;
      if (!lp["heads"].is_object()) {
        return absl::InvalidArgumentError(
            absl::StrFormat("KV policy file %s: layers.%s.heads must be an object", path, layer));
      }
      for (const auto& [head, hp] : lp["heads"].items()) {
        if (!hp.is_object()) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "KV policy file %s: layers.%s.heads.%s must be an object", path, layer, head));
        }
        for (const char* key : {"k", "v"}) {
          std::string c;
          if (absl::Status st = field_string(hp, key, &c); !st.ok()) return st;
          if (!c.empty()) add(absl::StrFormat("%s.h%s.%s=%s", layer, head, key, c));
        }
      }
    }
  }
  absl::StatusOr<KvPolicy> p = ParseSpec(spec, lim);
  if (!p.ok()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KV policy file %s: %s", path, p.status().message()));
  }
  p->name = "@" + path;
  if (j.contains("static_scales")) {
    const nlohmann::json& ss = j["static_scales"];
    if (!ss.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("KV policy file %s: 'static_scales' must be an object", path));
    }
    for (const auto& [layer_key, entry] : ss.items()) {
      absl::StatusOr<int64_t> layer =
          ParseCount("static_scales layer", layer_key, 0, n_layers > 0 ? n_layers - 1 : 1 << 20);
      if (!layer.ok()) {
        return absl::InvalidArgumentError(
            absl::StrFormat("KV policy file %s: %s", path, layer.status().message()));
      }
      LayerStaticScales& out = p->static_scales[*layer];
      for (const char* kv : {"k", "v"}) {
        if (!entry.is_object() || !entry.contains(kv)) continue;
        StaticScales& dst = kv[0] == 'k' ? out.k : out.v;
        for (const char* list : {"scale", "min"}) {
          const nlohmann::json& o = entry[kv];
          if (!o.is_object() || !o.contains(list)) continue;
          const nlohmann::json& a = o[list];
          std::vector<float>& values = list[0] == 's' ? dst.scale : dst.min;
          if (!a.is_array()) {
            return absl::InvalidArgumentError(absl::StrFormat(
                "KV policy file %s: static_scales.%s.%s.%s must be an array of numbers", path,
                layer_key, kv, list));
          }
          for (const nlohmann::json& x : a) {
            if (!x.is_number()) {
              return absl::InvalidArgumentError(
                  absl::StrFormat("KV policy file %s: static_scales.%s.%s.%s holds a non-number",
                                  path, layer_key, kv, list));
            }
            values.push_back(x.get<float>());
          }
        }
      }
    }
  }
  for (const char* field : {"codebooks", "clip_models"}) {
    absl::Status st =
        ParseLayerVectors(j, field, path, n_layers,
                          std::string_view(field) == "codebooks" ? p->codebooks : p->clip_models);
    if (!st.ok()) return st;
  }
  return p;
}

}  // namespace

const LayerKvPolicy& KvPolicy::ForLayer(int64_t layer) const {
  auto it = layers.find(layer);
  return it == layers.end() ? all : it->second;
}

const LayerKvPolicy& KvPolicy::ForHead(int64_t layer, int64_t head) const {
  auto it = heads.find({layer, head});
  return it == heads.end() ? ForLayer(layer) : it->second;
}

bool KvPolicy::HasHeadOverrides(int64_t layer) const {
  for (const auto& [lh, hp] : heads) {
    if (lh.first == layer) return true;
  }
  return false;
}

const LayerKvVectors* KvPolicy::CodebooksFor(int64_t layer) const {
  auto it = codebooks.find(layer);
  return it == codebooks.end() ? nullptr : &it->second;
}

const LayerKvVectors* KvPolicy::ClipModelsFor(int64_t layer) const {
  auto it = clip_models.find(layer);
  return it == clip_models.end() ? nullptr : &it->second;
}

const LayerStaticScales* KvPolicy::StaticScalesFor(int64_t layer) const {
  auto it = static_scales.find(layer);
  return it == static_scales.end() ? nullptr : &it->second;
}

std::string KvPolicy::ToSpec() const {
  std::string s = absl::StrFormat("k=%s,v=%s", all.k.ToString(), all.v.ToString());
  std::vector<int64_t> ids;
  for (const auto& [l, lp] : layers) ids.push_back(l);
  std::sort(ids.begin(), ids.end());
  for (int64_t l : ids) {
    const LayerKvPolicy& lp = layers.at(l);
    s += absl::StrFormat(",%d.k=%s,%d.v=%s", l, lp.k.ToString(), l, lp.v.ToString());
  }
  std::vector<std::pair<int64_t, int64_t>> head_ids;
  for (const auto& [lh, hp] : heads) head_ids.push_back(lh);
  std::sort(head_ids.begin(), head_ids.end());
  for (const auto& [l, h] : head_ids) {
    const LayerKvPolicy& hp = heads.at({l, h});
    s += absl::StrFormat(",%d.h%d.k=%s,%d.h%d.v=%s", l, h, hp.k.ToString(), l, h, hp.v.ToString());
  }
  s += absl::StrFormat(",sink=%d,window=%d,block=%d", sink_tokens, window_tokens, block_tokens);
  if (pre_rope_keys) s += ",rope=pre";
  if (rotate_k || rotate_v)
    s += rotate_k && rotate_v ? ",rotate=kv" : rotate_k ? ",rotate=k" : ",rotate=v";
  auto temp = [](float t) {
    char buf[32];
    const auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), t);
    return std::string(buf, ec == std::errc() ? end : buf);
  };
  if (temperature != 1.0f) s += ",temp=" + temp(temperature);
  std::vector<int64_t> temp_layers;
  for (const auto& [l, t] : layer_temperature) temp_layers.push_back(l);
  std::sort(temp_layers.begin(), temp_layers.end());
  for (int64_t l : temp_layers)
    s += absl::StrFormat(",%d.temp=", l) + temp(layer_temperature.at(l));
  return s;
}

float KvPolicy::ScoreScale(int64_t layer) const {
  auto it = layer_temperature.find(layer);
  return 1.0f / (it == layer_temperature.end() ? temperature : it->second);
}

bool KvPolicy::protected_fp32() const {
  auto fp32 = [](const LayerKvPolicy& l) {
    return l.k.type == kernels::KvCodecType::kF32 && l.v.type == kernels::KvCodecType::kF32;
  };
  if (!fp32(all)) return false;
  for (const auto& [l, lp] : layers) {
    if (!fp32(lp)) return false;
  }
  for (const auto& [lh, hp] : heads) {
    if (!fp32(hp)) return false;
  }
  return true;
}

const std::vector<KvPreset>& KvPresets() {
  static const std::vector<KvPreset> presets = {
      {"fp32", "fp32", "full precision (reference)"},
      {"fp16", "fp16", "IEEE half, the usual serving cache"},
      {"bf16", "bf16", "bfloat16"},
      {"fp8", "fp8:g64", "FP8 E4M3 with one fp16 scale per token per 64 channels"},
      {"int8", "int8:g64:asym", "8-bit per-token min-max (scale + zero per 64 channels)"},
      {"int4", "int4:g64:asym", "4-bit per-token min-max, no compensation (baseline)"},
      {"int2", "int2:g64:asym", "2-bit per-token min-max, no compensation (baseline)"},
      {"int4-comp", "k=int4:chan,v=int4:g64:asym,sink=4,window=8,block=128",
       "<= 4.5 bits/element at 2048 tokens: per-channel keys (KIVI), fp16 sinks + window"},
      // 3-bit: per-channel uniform keys (KIVI), NormalFloat values after a Hadamard rotation
      // (which makes each token's values near-Gaussian, what NF levels are made for). In
      // bench/results/kv_table_ctx512.md it beat NF3 keys, Lloyd-fitted levels and PQ 2x6.
      {"int3-comp", "k=int3:chan,v=nl3:g64:sym:nf,rotate=v,sink=4,window=8,block=128",
       "<= 3.5 bits/element at 2048 tokens: per-channel int3 keys, rotated NF3 values, fp16 "
       "sinks + window"},
      // Clip ratios from a grid search on GPL-3 text (not WikiText): K 0.6-1.0, V 0.8-1.0.
      {"int2-comp", "k=int2:chan:clip0.7,v=int2:g64:asym:clip0.9,sink=4,window=8,block=128",
       "<= 2.5 bits/element at 2048 tokens: per-channel keys, clipped scales, fp16 sinks + "
       "window"},
      // The floor of int4-comp for elastic precision (--kv-floor): a layer's K and V take
      // exactly half of an int4-comp block (per-channel scales only for values), so two
      // requantized blocks share one.
      {"int2-floor", "k=int2:chan:clip0.7,v=int2:chan:sym,sink=4,window=8,block=128",
       "--kv-floor of int4-comp: 2-bit per-channel keys and values in half an int4-comp "
       "block"},
  };
  return presets;
}

absl::StatusOr<KvPolicy> ParseKvPolicy(std::string_view text, int64_t n_layers,
                                       int64_t n_kv_heads) {
  const Limits lim{n_layers, n_kv_heads};
  if (!text.empty() && text[0] == '@') return ParseFile(std::string(text.substr(1)), lim);
  for (const KvPreset& p : KvPresets()) {
    if (p.name == text) {
      absl::StatusOr<KvPolicy> policy = ParseSpec(p.spec, lim);
      if (policy.ok()) policy->name = p.name;
      return policy;
    }
  }
  return ParseSpec(text, lim);
}

}  // namespace quantkv
