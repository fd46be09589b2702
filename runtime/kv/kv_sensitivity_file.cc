#include "runtime/kv/kv_sensitivity_file.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_format.h"
#include "kernels/kv_codec.h"
#include "nlohmann/json.hpp"
#include "runtime/kv/kv_policy.h"
#include "runtime/util/status_macros.h"

namespace quantkv {
namespace {

using nlohmann::json;

constexpr const char* kFormat = "quantkv-kv-sensitivity";
constexpr int kVersion = 1;

json MeasureJson(const KvSensitivityMeasure& m) {
  return {{"codec", m.codec},       {"bits_per_element", m.bits_per_element},
          {"ppl", m.ppl},           {"dppl", m.dppl},
          {"dppl_pct", m.dppl_pct}, {"kl", m.kl},
          {"top1", m.top1}};
}

json HeadJson(const KvHeadMeasure& m) {
  json j = {{"codec", m.codec}};
  if (m.mse >= 0) j["mse"] = m.mse;
  if (m.kl >= 0) j["kl"] = m.kl;
  return j;
}

// Field readers: every error names the source and the field's path in the file.
class Reader {
 public:
  explicit Reader(const std::string& source) : source_(source) {}

  absl::Status Error(const std::string& field, const std::string& what) const {
    return absl::InvalidArgumentError(
        absl::StrFormat("sensitivity file %s: %s %s", source_, field, what));
  }
  absl::StatusOr<const json*> Get(const json& o, const std::string& key,
                                  const std::string& path) const {
    if (!o.is_object() || !o.contains(key)) return Error(path + key, "is missing");
    return &o[key];
  }
  absl::StatusOr<int64_t> Int(const json& o, const std::string& key, const std::string& path,
                              int64_t lo, int64_t hi) const {
    QKV_ASSIGN_OR_RETURN(const json* v, Get(o, key, path));
    if (!v->is_number_integer() || v->get<int64_t>() < lo || v->get<int64_t>() > hi) {
      return Error(path + key, absl::StrFormat("must be an integer in [%d, %d]", lo, hi));
    }
    return v->get<int64_t>();
  }
  absl::StatusOr<double> Number(const json& o, const std::string& key, const std::string& path,
                                bool non_negative) const {
    QKV_ASSIGN_OR_RETURN(const json* v, Get(o, key, path));
    if (!v->is_number() || !std::isfinite(v->get<double>())) {
      return Error(path + key, "must be a finite number");
    }
    // KL is >= 0 mathematically; rounding may leave it a hair below.
    if (non_negative && v->get<double>() < -1e-9) return Error(path + key, "must be >= 0");
    return v->get<double>();
  }
  // An optional number: `fallback` when absent.
  absl::StatusOr<double> OptNumber(const json& o, const std::string& key, const std::string& path,
                                   double fallback) const {
    if (!o.contains(key)) return fallback;
    return Number(o, key, path, false);
  }
  absl::StatusOr<std::string> String(const json& o, const std::string& key,
                                     const std::string& path) const {
    QKV_ASSIGN_OR_RETURN(const json* v, Get(o, key, path));
    if (!v->is_string()) return Error(path + key, "must be a string");
    return v->get<std::string>();
  }
  absl::StatusOr<const json*> Array(const json& o, const std::string& key,
                                    const std::string& path) const {
    QKV_ASSIGN_OR_RETURN(const json* v, Get(o, key, path));
    if (!v->is_array() || v->empty()) return Error(path + key, "must be a non-empty array");
    return v;
  }
  absl::StatusOr<std::string> Codec(const json& o, const std::string& path) const {
    QKV_ASSIGN_OR_RETURN(std::string c, String(o, "codec", path));
    absl::StatusOr<kernels::KvCodecSpec> spec = kernels::ParseKvCodecSpec(c);
    if (!spec.ok()) return Error(path + "codec", "'" + c + "': " + spec.status().ToString());
    return c;
  }

 private:
  std::string source_;
};

absl::StatusOr<std::vector<KvSensitivityMeasure>> ReadMeasures(const Reader& r, const json& layer,
                                                               const char* kind,
                                                               const std::string& path) {
  QKV_ASSIGN_OR_RETURN(const json* a, r.Array(layer, kind, path));
  std::vector<KvSensitivityMeasure> out;
  for (size_t i = 0; i < a->size(); ++i) {
    const json& e = (*a)[i];
    const std::string p = absl::StrFormat("%s%s[%d].", path, kind, i);
    if (!e.is_object()) return r.Error(p.substr(0, p.size() - 1), "must be an object");
    KvSensitivityMeasure m;
    QKV_ASSIGN_OR_RETURN(m.codec, r.Codec(e, p));
    QKV_ASSIGN_OR_RETURN(m.kl, r.Number(e, "kl", p, /*non_negative=*/true));
    QKV_ASSIGN_OR_RETURN(m.dppl, r.Number(e, "dppl", p, false));
    QKV_ASSIGN_OR_RETURN(m.ppl, r.OptNumber(e, "ppl", p, 0));
    QKV_ASSIGN_OR_RETURN(m.dppl_pct, r.OptNumber(e, "dppl_pct", p, 0));
    QKV_ASSIGN_OR_RETURN(m.top1, r.OptNumber(e, "top1", p, 0));
    QKV_ASSIGN_OR_RETURN(m.bits_per_element, r.OptNumber(e, "bits_per_element", p, 0));
    out.push_back(std::move(m));
  }
  return out;
}

absl::StatusOr<std::vector<KvHeadMeasure>> ReadHeadMeasures(
    const Reader& r, const json& head, const char* kind, const std::string& path,
    const std::vector<KvSensitivityMeasure>& layer_measures, const std::string& proxy) {
  QKV_ASSIGN_OR_RETURN(const json* a, r.Array(head, kind, path));
  if (a->size() != layer_measures.size()) {
    return r.Error(path + kind, absl::StrFormat("has %d entries; the layer's %s has %d", a->size(),
                                                kind, layer_measures.size()));
  }
  std::vector<KvHeadMeasure> out;
  for (size_t i = 0; i < a->size(); ++i) {
    const json& e = (*a)[i];
    const std::string p = absl::StrFormat("%s%s[%d].", path, kind, i);
    KvHeadMeasure m;
    QKV_ASSIGN_OR_RETURN(m.codec, r.Codec(e, p));
    if (m.codec != layer_measures[i].codec) {
      return r.Error(p + "codec", absl::StrFormat("is %s but the layer's entry %d is %s", m.codec,
                                                  i, layer_measures[i].codec));
    }
    for (const char* key : {"mse", "kl"}) {
      double& dst = key[0] == 'm' ? m.mse : m.kl;
      if (e.contains(key) || proxy == key) {
        QKV_ASSIGN_OR_RETURN(dst, r.Number(e, key, p, /*non_negative=*/true));
        dst = std::max(dst, 0.0);
      }
    }
    out.push_back(std::move(m));
  }
  return out;
}

}  // namespace

std::string KvSensitivityToJson(const KvSensitivity& s) {
  json layers = json::array();
  for (const KvLayerSensitivity& l : s.layers) {
    json jl = {{"layer", l.layer}, {"k", json::array()}, {"v", json::array()}};
    for (const auto& m : l.k) jl["k"].push_back(MeasureJson(m));
    for (const auto& m : l.v) jl["v"].push_back(MeasureJson(m));
    if (!l.heads.empty()) {
      jl["heads"] = json::array();
      for (const KvHeadSensitivity& h : l.heads) {
        json jh = {{"head", h.head}, {"k", json::array()}, {"v", json::array()}};
        for (const auto& m : h.k) jh["k"].push_back(HeadJson(m));
        for (const auto& m : h.v) jh["v"].push_back(HeadJson(m));
        jl["heads"].push_back(std::move(jh));
      }
    }
    layers.push_back(std::move(jl));
  }
  json report = json::parse(s.report_json, nullptr, /*allow_exceptions=*/false);
  if (report.is_discarded()) report = json::object();
  json j = {{"format", kFormat},
            {"version", kVersion},
            {"model", s.model},
            {"text", s.text},
            {"base", s.base},
            {"n_layers", s.n_layers},
            {"n_kv_heads", s.n_kv_heads},
            {"head_dim", s.head_dim},
            {"block", s.block},
            {"ctx", s.ctx},
            {"chunks", s.chunks},
            {"tokens_scored", s.tokens_scored},
            {"baseline", {{"ppl", s.baseline_ppl}, {"mean_nll", s.baseline_mean_nll}}},
            {"head_proxy", s.head_proxy},
            {"seconds", s.seconds},
            {"report", report},
            {"layers", layers}};
  return j.dump(1) + "\n";
}

absl::StatusOr<KvSensitivity> KvSensitivityFromJson(const std::string& text,
                                                    const std::string& source) {
  const Reader r(source);
  const json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("sensitivity file %s: not a JSON object", source));
  }
  QKV_ASSIGN_OR_RETURN(std::string format, r.String(j, "format", ""));
  if (format != kFormat) return r.Error("format", "must be \"" + std::string(kFormat) + "\"");
  QKV_ASSIGN_OR_RETURN(int64_t version, r.Int(j, "version", "", 0, 1 << 20));
  if (version != kVersion) {
    return r.Error("version", absl::StrFormat("%d is not supported (want %d)", version, kVersion));
  }
  KvSensitivity s;
  QKV_ASSIGN_OR_RETURN(s.base, r.String(j, "base", ""));
  QKV_ASSIGN_OR_RETURN(s.n_layers, r.Int(j, "n_layers", "", 1, 1 << 16));
  QKV_ASSIGN_OR_RETURN(s.n_kv_heads, r.Int(j, "n_kv_heads", "", 1, 1 << 16));
  QKV_ASSIGN_OR_RETURN(s.head_dim, r.Int(j, "head_dim", "", 1, 1 << 16));
  QKV_ASSIGN_OR_RETURN(s.block, r.Int(j, "block", "", 1, 4096));
  if (absl::StatusOr<KvPolicy> p = ParseKvPolicy(s.base, s.n_layers); !p.ok()) {
    return r.Error("base", "'" + s.base + "': " + std::string(p.status().message()));
  }
  if (j.contains("model") && j["model"].is_string()) s.model = j["model"];
  if (j.contains("text") && j["text"].is_string()) s.text = j["text"];
  for (auto [key, dst] : {std::pair{"ctx", &s.ctx}, std::pair{"chunks", &s.chunks},
                          std::pair{"tokens_scored", &s.tokens_scored}}) {
    if (j.contains(key)) {
      QKV_ASSIGN_OR_RETURN(*dst, r.Int(j, key, "", 0, int64_t{1} << 40));
    }
  }
  if (j.contains("baseline")) {
    QKV_ASSIGN_OR_RETURN(s.baseline_ppl, r.OptNumber(j["baseline"], "ppl", "baseline.", 0));
    QKV_ASSIGN_OR_RETURN(s.baseline_mean_nll,
                         r.OptNumber(j["baseline"], "mean_nll", "baseline.", 0));
  }
  if (j.contains("head_proxy")) {
    QKV_ASSIGN_OR_RETURN(s.head_proxy, r.String(j, "head_proxy", ""));
    if (s.head_proxy != "" && s.head_proxy != "kl" && s.head_proxy != "mse") {
      return r.Error("head_proxy", "must be \"kl\", \"mse\" or \"\"");
    }
  }
  QKV_ASSIGN_OR_RETURN(s.seconds, r.OptNumber(j, "seconds", "", 0));
  if (j.contains("report")) s.report_json = j["report"].dump();

  QKV_ASSIGN_OR_RETURN(const json* layers, r.Array(j, "layers", ""));
  absl::flat_hash_set<int64_t> seen;
  for (size_t i = 0; i < layers->size(); ++i) {
    const json& jl = (*layers)[i];
    const std::string p = absl::StrFormat("layers[%d].", i);
    if (!jl.is_object()) return r.Error(p.substr(0, p.size() - 1), "must be an object");
    KvLayerSensitivity l;
    QKV_ASSIGN_OR_RETURN(l.layer, r.Int(jl, "layer", p, 0, s.n_layers - 1));
    if (!seen.insert(l.layer).second) {
      return r.Error(p + "layer", absl::StrFormat("%d appears twice", l.layer));
    }
    QKV_ASSIGN_OR_RETURN(l.k, ReadMeasures(r, jl, "k", p));
    QKV_ASSIGN_OR_RETURN(l.v, ReadMeasures(r, jl, "v", p));
    if (jl.contains("heads")) {
      if (s.head_proxy.empty()) {
        return r.Error(p + "heads", "is given but head_proxy does not say which field ranks them");
      }
      QKV_ASSIGN_OR_RETURN(const json* heads, r.Array(jl, "heads", p));
      if (static_cast<int64_t>(heads->size()) != s.n_kv_heads) {
        return r.Error(p + "heads", absl::StrFormat("has %d entries, want n_kv_heads = %d",
                                                    heads->size(), s.n_kv_heads));
      }
      for (size_t h = 0; h < heads->size(); ++h) {
        const std::string ph = absl::StrFormat("%sheads[%d].", p, h);
        const json& jh = (*heads)[h];
        KvHeadSensitivity hs;
        QKV_ASSIGN_OR_RETURN(hs.head, r.Int(jh, "head", ph, 0, s.n_kv_heads - 1));
        if (hs.head != static_cast<int64_t>(h)) {
          return r.Error(ph + "head",
                         absl::StrFormat("is %d, want %d (heads in order)", hs.head, h));
        }
        QKV_ASSIGN_OR_RETURN(hs.k, ReadHeadMeasures(r, jh, "k", ph, l.k, s.head_proxy));
        QKV_ASSIGN_OR_RETURN(hs.v, ReadHeadMeasures(r, jh, "v", ph, l.v, s.head_proxy));
        l.heads.push_back(std::move(hs));
      }
    }
    s.layers.push_back(std::move(l));
  }
  return s;
}

absl::StatusOr<KvSensitivity> ReadKvSensitivity(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrFormat("sensitivity file %s: cannot open", path));
  std::stringstream buf;
  buf << in.rdbuf();
  return KvSensitivityFromJson(buf.str(), path);
}

absl::Status WriteKvSensitivity(const std::string& path, const KvSensitivity& s) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out || !(out << KvSensitivityToJson(s)) || !out.flush()) {
    return absl::PermissionDeniedError(absl::StrFormat("%s: cannot write", path));
  }
  return absl::OkStatus();
}

}  // namespace quantkv
