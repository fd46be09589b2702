#include "runtime/model/lora.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kernels/dequantize.h"
#include "nlohmann/json.hpp"
#include "runtime/model/hf_model.h"
#include "runtime/model/safetensors.h"
#include "runtime/util/status_macros.h"

namespace quantkv {
namespace {

using nlohmann::json;

constexpr const char* kProjections[] = {"q_proj", "k_proj", "v_proj", "o_proj"};

int ProjectionIndex(std::string_view name) {
  for (int i = 0; i < 4; ++i) {
    if (name == kProjections[i]) return i;
  }
  return -1;
}

struct PeftConfig {
  int64_t r = 0;
  double alpha = 0;
  bool rslora = false;
  bool targets[4] = {};
  std::vector<int64_t> layers_to_transform;  // empty: all
};

// A PEFT option that changes the math QuantKV would do is refused rather than ignored.
absl::StatusOr<PeftConfig> ParsePeftConfig(const std::string& file, const json& j) {
  auto err = [&](const std::string& msg) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: %s", file, msg));
  };
  auto unsupported = [&](const std::string& msg) {
    return absl::UnimplementedError(absl::StrFormat("%s: %s", file, msg));
  };
  if (!j.is_object()) return err("not a JSON object");
  PeftConfig c;
  if (j.contains("peft_type") && j["peft_type"] != "LORA") {
    return unsupported(absl::StrFormat("peft_type %s is not LORA", j["peft_type"].dump()));
  }
  if (!j.contains("r") || !j["r"].is_number_integer() || j["r"].get<int64_t>() < 1) {
    return err("field 'r' must be a positive integer");
  }
  c.r = j["r"].get<int64_t>();
  if (!j.contains("lora_alpha") || !j["lora_alpha"].is_number()) {
    return err("field 'lora_alpha' must be a number");
  }
  c.alpha = j["lora_alpha"].get<double>();
  if (!std::isfinite(c.alpha)) return err("field 'lora_alpha' is not finite");
  auto flag = [&](const char* key) {
    return j.contains(key) && j[key].is_boolean() && j[key].get<bool>();
  };
  c.rslora = flag("use_rslora");
  if (flag("use_dora")) return unsupported("use_dora (DoRA) is not supported, only plain LoRA");
  if (flag("fan_in_fan_out"))
    return unsupported("fan_in_fan_out (Conv1D weights) is not supported");
  if (j.contains("bias") && j["bias"].is_string() && j["bias"] != "none") {
    return unsupported(
        absl::StrFormat("bias %s is not supported (only \"none\")", j["bias"].dump()));
  }
  for (const char* key : {"rank_pattern", "alpha_pattern"}) {
    if (j.contains(key) && !j[key].is_null() && !j[key].empty()) {
      return unsupported(absl::StrFormat("per-module %s is not supported", key));
    }
  }
  if (j.contains("modules_to_save") && !j["modules_to_save"].is_null() &&
      !j["modules_to_save"].empty()) {
    return unsupported("modules_to_save (fully trained modules) is not supported");
  }
  if (!j.contains("target_modules")) return err("field 'target_modules' is missing");
  std::vector<std::string> targets;
  const json& t = j["target_modules"];
  if (t.is_string()) {
    targets.push_back(t.get<std::string>());
  } else if (t.is_array()) {
    for (const json& e : t) {
      if (!e.is_string()) return err("'target_modules' entries must be strings");
      targets.push_back(e.get<std::string>());
    }
  } else {
    return err("'target_modules' must be a list of module names");
  }
  for (const std::string& name : targets) {
    // PEFT matches a list entry against the end of a module path.
    const std::string leaf =
        name.substr(name.rfind('.') == std::string::npos ? 0 : name.rfind('.') + 1);
    const int p = ProjectionIndex(leaf);
    if (p < 0) {
      return unsupported(absl::StrFormat(
          "target module '%s' is not supported: QuantKV applies LoRA to q_proj, k_proj, v_proj "
          "and o_proj only",
          name));
    }
    c.targets[p] = true;
  }
  if (j.contains("layers_to_transform") && !j["layers_to_transform"].is_null()) {
    const json& l = j["layers_to_transform"];
    if (l.is_number_integer()) {
      c.layers_to_transform.push_back(l.get<int64_t>());
    } else if (l.is_array()) {
      for (const json& e : l) {
        if (!e.is_number_integer()) return err("'layers_to_transform' entries must be integers");
        c.layers_to_transform.push_back(e.get<int64_t>());
      }
    } else {
      return err("'layers_to_transform' must be an integer or a list of them");
    }
  }
  return c;
}

absl::StatusOr<json> ReadJson(const std::filesystem::path& p) {
  std::ifstream in(p);
  if (!in) return absl::NotFoundError(absl::StrFormat("%s: cannot open", p.string()));
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: not valid JSON", p.string()));
  }
  return j;
}

}  // namespace

absl::StatusOr<LoraAdapters> LoadLoraAdapters(const std::string& path, const ModelConfig& config) {
  namespace fs = std::filesystem;
  fs::path dir = path, weights = path;
  if (fs::is_directory(path)) {
    weights = dir / "adapter_model.safetensors";
  } else {
    dir = fs::path(path).parent_path();
    if (dir.empty()) dir = ".";
  }
  const fs::path config_path = dir / "adapter_config.json";
  if (!fs::exists(config_path)) {
    return absl::NotFoundError(absl::StrFormat(
        "LoRA %s: no adapter_config.json beside the weights (PEFT writes both; lora_alpha and "
        "target_modules come from it)",
        path));
  }
  QKV_ASSIGN_OR_RETURN(json cj, ReadJson(config_path));
  QKV_ASSIGN_OR_RETURN(PeftConfig pc, ParsePeftConfig(config_path.string(), cj));
  if (!fs::exists(weights)) {
    return absl::NotFoundError(absl::StrFormat(
        "LoRA %s: %s not found (only safetensors adapters are read)", path, weights.string()));
  }
  QKV_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> st,
                       SafetensorsFile::Open(weights.string()));
  const std::string file = weights.string();

  LoraAdapters out;
  out.origin = path;
  out.rank = pc.r;
  out.alpha = pc.alpha;
  out.scale = static_cast<float>(pc.rslora ? pc.alpha / std::sqrt(static_cast<double>(pc.r))
                                           : pc.alpha / static_cast<double>(pc.r));
  for (int p = 0; p < 4; ++p) {
    if (pc.targets[p]) out.targets.push_back(kProjections[p]);
  }
  out.layers.resize(config.n_layers);
  for (int64_t l : pc.layers_to_transform) {
    if (l < 0 || l >= config.n_layers) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: layers_to_transform names layer %d, the model has %d",
                          config_path.string(), l, config.n_layers));
    }
  }
  const int64_t q_dim = config.n_heads * config.head_dim;
  const int64_t kv_dim = config.n_kv_heads * config.head_dim;
  const int64_t in_dims[4] = {config.hidden, config.hidden, config.hidden, q_dim};
  const int64_t out_dims[4] = {q_dim, kv_dim, kv_dim, config.hidden};

  // PEFT prefixes the model's module path with base_model.model.; an in-memory state dict
  // also carries the adapter name (".default") before ".weight".
  static const std::regex kName(
      R"(^(?:base_model\.model\.)?model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$)");
  for (const SafetensorsTensor& t : st->tensors()) {
    std::smatch m;
    if (!std::regex_match(t.name, m, kName)) {
      return absl::UnimplementedError(absl::StrFormat(
          "%s: tensor '%s' is not a lora_A/lora_B weight of a q/k/v/o projection; QuantKV "
          "supports nothing else in a LoRA adapter",
          file, t.name));
    }
    const int64_t layer = std::stoll(m[1].str());
    const int p = ProjectionIndex(m[2].str());
    const bool is_a = m[3] == "A";
    if (layer >= config.n_layers) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: tensor '%s' is for layer %d, the model has %d", file, t.name, layer,
                          config.n_layers));
    }
    if (!pc.targets[p]) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: tensor '%s' adapts %s, which adapter_config.json's target_modules does not list",
          file, t.name, kProjections[p]));
    }
    const int64_t rows = is_a ? pc.r : out_dims[p];
    const int64_t cols = is_a ? in_dims[p] : pc.r;
    if (t.shape.size() != 2 || t.shape[0] != rows || t.shape[1] != cols) {
      std::vector<std::string> dims;
      for (int64_t d : t.shape) dims.push_back(std::to_string(d));
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: tensor '%s' has shape [%s], but r = %d and the model's %s is [%d, %d] (out, in) "
          "imply [%d, %d]",
          file, t.name, absl::StrJoin(dims, ", "), pc.r, kProjections[p], out_dims[p], in_dims[p],
          rows, cols));
    }
    LoraAdapters::Layer& L = out.layers[layer];
    LowRankAdapter& a = p == 0 ? L.q : p == 1 ? L.k : p == 2 ? L.v : L.o;
    std::vector<float>& dst = is_a ? a.a : a.b;
    if (!dst.empty()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: tensor '%s' appears twice (under two adapter names?)", file, t.name));
    }
    dst.resize(static_cast<size_t>(rows * cols));
    QKV_RETURN_IF_ERROR(kernels::DequantizeRow(t.type, t.data, dst.data(), rows * cols));
    for (float v : dst) {
      if (!std::isfinite(v)) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s: tensor '%s' holds a non-finite value", file, t.name));
      }
    }
  }

  // Every targeted projection of every transformed layer must have both factors.
  int64_t found = 0;
  for (int64_t l = 0; l < config.n_layers; ++l) {
    const bool transformed = pc.layers_to_transform.empty() ||
                             std::find(pc.layers_to_transform.begin(), pc.layers_to_transform.end(),
                                       l) != pc.layers_to_transform.end();
    LoraAdapters::Layer& L = out.layers[l];
    LowRankAdapter* adapters[4] = {&L.q, &L.k, &L.v, &L.o};
    for (int p = 0; p < 4; ++p) {
      LowRankAdapter& a = *adapters[p];
      const bool has_a = !a.a.empty(), has_b = !a.b.empty();
      if (has_a != has_b || (pc.targets[p] && transformed && !has_a)) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s: layer %d %s lacks its lora_%s weight", file, l, kProjections[p],
                            has_a ? "B" : "A"));
      }
      if (!has_a) continue;
      if (!transformed) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s: layer %d %s has weights but layers_to_transform excludes it", file,
                            l, kProjections[p]));
      }
      a.in = in_dims[p];
      a.out = out_dims[p];
      a.rank = pc.r;
      a.scale = out.scale;
      // The engine's Q/K rows are in llama.cpp's order (adjacent RoPE pairs) unless the
      // model ropes NeoX-style: B's rows must follow the weights they add to.
      if ((p == 0 || p == 1) && !config.rope_neox) {
        std::vector<float> permuted(a.b.size());
        PermuteQkRows(reinterpret_cast<const uint8_t*>(a.b.data()),
                      reinterpret_cast<uint8_t*>(permuted.data()),
                      p == 0 ? config.n_heads : config.n_kv_heads, a.out,
                      pc.r * static_cast<int64_t>(sizeof(float)));
        a.b = std::move(permuted);
      }
      QKV_RETURN_IF_ERROR(a.Validate(absl::StrFormat("%s: layer %d %s", file, l, kProjections[p])));
      ++found;
    }
  }
  if (found == 0) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: no LoRA weights in the file", file));
  }
  return out;
}

absl::Status CheckLoraFitsModel(const LoraAdapters& lora, const ModelConfig& config) {
  const int64_t q_dim = config.n_heads * config.head_dim;
  const int64_t kv_dim = config.n_kv_heads * config.head_dim;
  bool fits = static_cast<int64_t>(lora.layers.size()) == config.n_layers;
  for (size_t l = 0; fits && l < lora.layers.size(); ++l) {
    const LoraAdapters::Layer& L = lora.layers[l];
    const std::pair<const LowRankAdapter*, std::pair<int64_t, int64_t>> shapes[4] = {
        {&L.q, {config.hidden, q_dim}},
        {&L.k, {config.hidden, kv_dim}},
        {&L.v, {config.hidden, kv_dim}},
        {&L.o, {q_dim, config.hidden}}};
    for (const auto& [a, in_out] : shapes) {
      if (!a->empty() && (a->in != in_out.first || a->out != in_out.second)) fits = false;
    }
  }
  if (fits) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrFormat(
      "LoRA %s was loaded for another model: its layers or projection shapes differ from this "
      "model's (%d layers, hidden %d, %d heads, %d KV heads of %d)",
      lora.origin, config.n_layers, config.hidden, config.n_heads, config.n_kv_heads,
      config.head_dim));
}

}  // namespace quantkv
