#include "runtime/engine/attn_correction.h"

#include <cmath>
#include <regex>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/dequantize.h"
#include "runtime/model/safetensors.h"
#include "runtime/model/safetensors_writer.h"
#include "runtime/util/status_macros.h"

namespace quantkv {
namespace {

std::string TensorName(int64_t layer, const char* part) {
  return absl::StrFormat("layers.%d.attn_corr.%s", layer, part);
}

}  // namespace

absl::Status WriteAttnCorrection(const std::string& path, const AttnCorrection& c) {
  if (static_cast<int64_t>(c.layers.size()) != c.n_layers) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: %d layer adapters for %d layers", path, c.layers.size(), c.n_layers));
  }
  std::map<std::string, std::string> meta = c.metadata;
  meta["format"] = kAttnCorrectionFormat;
  meta["kv_spec"] = c.kv_spec;
  meta["n_layers"] = std::to_string(c.n_layers);
  meta["dim"] = std::to_string(c.dim);
  meta["rank"] = std::to_string(c.rank);
  std::vector<SafetensorsOutTensor> tensors;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const LowRankAdapter& a = c.layers[l];
    if (a.empty()) continue;
    QKV_RETURN_IF_ERROR(a.Validate(absl::StrFormat("%s: layer %d", path, l)));
    if (a.in != c.dim || a.out != c.dim || a.scale != 1.0f) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: layer %d adapter is not a scale-1 map of width %d", path, l, c.dim));
    }
    tensors.push_back({TensorName(l, "a"), {a.rank, a.in}, a.a});
    tensors.push_back({TensorName(l, "b"), {a.out, a.rank}, a.b});
    if (!a.bias.empty()) tensors.push_back({TensorName(l, "bias"), {a.out}, a.bias});
  }
  return WriteSafetensors(path, tensors, meta);
}

absl::StatusOr<AttnCorrection> ReadAttnCorrection(const std::string& path) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> opened = SafetensorsFile::Open(path);
  if (!opened.ok()) {
    // The reader's message starts with the path already.
    return absl::Status(opened.status().code(),
                        absl::StrCat("KV correction: ", opened.status().message()));
  }
  const SafetensorsFile& st = **opened;
  auto bad = [&](const std::string& msg) {
    return absl::InvalidArgumentError(absl::StrFormat("KV correction %s: %s", path, msg));
  };
  AttnCorrection c;
  c.origin = path;
  c.metadata = st.metadata();
  auto take = [&](const char* key) -> std::string {
    auto it = c.metadata.find(key);
    if (it == c.metadata.end()) return "";
    std::string v = it->second;
    c.metadata.erase(it);
    return v;
  };
  const std::string format = take("format");
  if (format != kAttnCorrectionFormat) {
    return bad(absl::StrFormat(
        "__metadata__ format is '%s', not '%s' (not a file written by `quantkv fit-correction`)",
        format, kAttnCorrectionFormat));
  }
  c.kv_spec = take("kv_spec");
  for (auto [key, dst] : {std::pair<const char*, int64_t*>{"n_layers", &c.n_layers},
                          {"dim", &c.dim},
                          {"rank", &c.rank}}) {
    const std::string v = take(key);
    if (!absl::SimpleAtoi(v, dst) || *dst < 1 || *dst > (int64_t{1} << 20)) {
      return bad(absl::StrFormat("__metadata__ '%s' = '%s' is not a positive integer", key, v));
    }
  }
  if (c.kv_spec.empty()) return bad("__metadata__ lacks the 'kv_spec' it was fitted for");
  c.layers.resize(c.n_layers);

  static const std::regex kName(R"(^layers\.(\d+)\.attn_corr\.(a|b|bias)$)");
  for (const SafetensorsTensor& t : st.tensors()) {
    std::smatch m;
    if (!std::regex_match(t.name, m, kName)) {
      return bad(absl::StrFormat("unexpected tensor '%s'", t.name));
    }
    int64_t layer = 0;
    if (!absl::SimpleAtoi(m[1].str(), &layer) || layer >= c.n_layers) {
      return bad(
          absl::StrFormat("tensor '%s' names a layer past n_layers = %d", t.name, c.n_layers));
    }
    LowRankAdapter& a = c.layers[layer];
    const std::string part = m[2];
    std::vector<float>& dst = part == "a" ? a.a : part == "b" ? a.b : a.bias;
    // a is [rank, dim], b [dim, rank], bias [dim].
    const size_t want_dims = part == "bias" ? 1 : 2;
    int64_t rank = 0;
    bool shape_ok = t.shape.size() == want_dims;
    if (shape_ok && part == "bias") shape_ok = t.shape[0] == c.dim;
    if (shape_ok && part == "a") {
      rank = t.shape[0];
      shape_ok = t.shape[1] == c.dim;
    }
    if (shape_ok && part == "b") {
      rank = t.shape[1];
      shape_ok = t.shape[0] == c.dim;
    }
    if (!shape_ok || (part != "bias" && (rank < 1 || rank > c.dim))) {
      return bad(absl::StrFormat(
          "tensor '%s' has the wrong shape: want %s with dim = %d, rank 1..%d", t.name,
          part == "a"   ? "[rank, dim]"
          : part == "b" ? "[dim, rank]"
                        : "[dim]",
          c.dim, c.dim));
    }
    if (!dst.empty()) return bad(absl::StrFormat("tensor '%s' appears twice", t.name));
    if (part != "bias") {
      if (a.rank != 0 && a.rank != rank) {
        return bad(
            absl::StrFormat("layer %d: lora factors of ranks %d and %d", layer, a.rank, rank));
      }
      a.rank = rank;
    }
    dst.resize(static_cast<size_t>(t.n_elements));
    QKV_RETURN_IF_ERROR(kernels::DequantizeRow(t.type, t.data, dst.data(), t.n_elements));
    for (float v : dst) {
      if (!std::isfinite(v))
        return bad(absl::StrFormat("tensor '%s' holds a non-finite value", t.name));
    }
  }
  int64_t corrected = 0;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    LowRankAdapter& a = c.layers[l];
    if (a.a.empty() != a.b.empty() || (a.a.empty() && !a.bias.empty())) {
      return bad(absl::StrFormat("layer %d has only some of its tensors (a, b, bias)", l));
    }
    if (a.a.empty()) continue;
    a.in = a.out = c.dim;
    a.scale = 1.0f;
    QKV_RETURN_IF_ERROR(a.Validate(absl::StrFormat("KV correction %s: layer %d", path, l)));
    ++corrected;
  }
  if (corrected == 0) return bad("no layer has a correction");
  return c;
}

absl::Status CheckAttnCorrectionFitsModel(const AttnCorrection& c, const ModelConfig& model) {
  const int64_t dim = model.n_heads * model.head_dim;
  if (c.n_layers != model.n_layers || c.dim != dim) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "KV correction %s was fitted for %d layers of attention width %d, but the model has %d "
        "layers of width %d (%d heads x %d)",
        c.origin.empty() ? "(in memory)" : c.origin, c.n_layers, c.dim, model.n_layers, dim,
        model.n_heads, model.head_dim));
  }
  return absl::OkStatus();
}

absl::Status CheckAttnCorrectionKv(const AttnCorrection& c, std::string_view kv) {
  if (c.kv_spec == kv) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrFormat(
      "KV correction %s was fitted for --kv %s, not --kv %s: it corrects that cache's error "
      "and may add error to another",
      c.origin.empty() ? "(in memory)" : c.origin, c.kv_spec, kv));
}

}  // namespace quantkv
