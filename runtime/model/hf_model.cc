#include "runtime/model/hf_model.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "runtime/model/safetensors.h"
#include "runtime/util/mapped_file.h"
#include "runtime/util/status_macros.h"

namespace quantkv {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// Upper bound on every size field, far above any real model, so that products of two of
// them (rows x cols) cannot overflow int64 and absurd configs fail early.
constexpr int64_t kMaxDim = int64_t{1} << 24;

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrFormat("[%s]", absl::StrJoin(shape, ", "));
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  QKV_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> map, MappedFile::Open(path));
  if (map->size() == 0) return std::string();
  return std::string(reinterpret_cast<const char*>(map->data()), map->size());
}

absl::StatusOr<json> ParseJson(std::string_view text, const std::string& origin) {
  try {
    return json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: not valid JSON: %s", origin, e.what()));
  }
}

// Typed access to the fields of one JSON object; JSON null counts as absent, which is how
// transformers writes unset optional fields.
class Fields {
 public:
  Fields(const json& obj, std::string where) : obj_(obj), where_(std::move(where)) {}

  const json* Get(const std::string& key) const {
    auto it = obj_.find(key);
    if (it == obj_.end() || it->is_null()) return nullptr;
    return &*it;
  }
  bool Has(const std::string& key) const { return Get(key) != nullptr; }

  absl::Status Missing(const std::string& key) const {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: required field '%s' is missing", where_, key));
  }

  absl::StatusOr<std::optional<int64_t>> OptInt(const std::string& key) const {
    const json* v = Get(key);
    if (v == nullptr) return std::optional<int64_t>();
    if (!v->is_number_integer()) {
      return absl::InvalidArgumentError(absl::StrFormat("%s: field '%s' must be an integer, got %s",
                                                        where_, key, v->type_name()));
    }
    if (v->is_number_unsigned() &&
        v->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field '%s' is out of range", where_, key));
    }
    return std::optional<int64_t>(v->get<int64_t>());
  }

  // A size field in [1, kMaxDim].
  absl::StatusOr<int64_t> Dim(const std::string& key, std::optional<int64_t> fallback) const {
    QKV_ASSIGN_OR_RETURN(std::optional<int64_t> v, OptInt(key));
    if (!v.has_value()) {
      if (!fallback.has_value()) return Missing(key);
      v = fallback;
    }
    if (*v < 1 || *v > kMaxDim) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field '%s' = %d is outside [1, %d]", where_, key, *v, kMaxDim));
    }
    return *v;
  }

  absl::StatusOr<std::optional<double>> OptFloat(const std::string& key) const {
    const json* v = Get(key);
    if (v == nullptr) return std::optional<double>();
    if (!v->is_number()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field '%s' must be a number, got %s", where_, key, v->type_name()));
    }
    const double d = v->get<double>();
    if (!std::isfinite(d)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field '%s' must be finite", where_, key));
    }
    return std::optional<double>(d);
  }

  // A number that must be > 0 (epsilons, factors, theta).
  absl::StatusOr<double> Positive(const std::string& key, std::optional<double> fallback) const {
    QKV_ASSIGN_OR_RETURN(std::optional<double> v, OptFloat(key));
    if (!v.has_value()) {
      if (!fallback.has_value()) return Missing(key);
      v = fallback;
    }
    if (!(*v > 0)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field '%s' = %g must be positive", where_, key, *v));
    }
    return *v;
  }

  absl::StatusOr<bool> Bool(const std::string& key, bool fallback) const {
    const json* v = Get(key);
    if (v == nullptr) return fallback;
    if (!v->is_boolean()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field '%s' must be a boolean, got %s", where_, key, v->type_name()));
    }
    return v->get<bool>();
  }

  absl::StatusOr<std::optional<std::string>> OptString(const std::string& key) const {
    const json* v = Get(key);
    if (v == nullptr) return std::optional<std::string>();
    if (!v->is_string()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field '%s' must be a string, got %s", where_, key, v->type_name()));
    }
    return std::optional<std::string>(v->get<std::string>());
  }

  const std::string& where() const { return where_; }

 private:
  const json& obj_;
  std::string where_;
};

struct ArchInfo {
  std::string_view hf_class;
  std::string_view model_type;
  std::string_view name;  // ModelConfig::architecture
};

constexpr ArchInfo kArchs[] = {
    {"LlamaForCausalLM", "llama", "llama"},           {"MistralForCausalLM", "mistral", "mistral"},
    {"Qwen2ForCausalLM", "qwen2", "qwen2"},           {"MixtralForCausalLM", "mixtral", "mixtral"},
    {"Qwen2MoeForCausalLM", "qwen2_moe", "qwen2moe"}, {"Qwen3ForCausalLM", "qwen3", "qwen3"},
    {"Qwen3MoeForCausalLM", "qwen3_moe", "qwen3moe"},
};

absl::StatusOr<const ArchInfo*> FindArch(const Fields& f) {
  // `architectures` names the class that wrote the weights; `model_type` is the fallback that
  // transformers itself uses when the list is absent.
  if (const json* archs = f.Get("architectures")) {
    if (!archs->is_array() || archs->empty() || !(*archs)[0].is_string()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: field 'architectures' must be a non-empty array of strings", f.where()));
    }
    const std::string name = (*archs)[0].get<std::string>();
    for (const ArchInfo& a : kArchs) {
      if (a.hf_class == name) return &a;
    }
    return absl::UnimplementedError(
        absl::StrFormat("%s: field 'architectures' = '%s' is not supported (LlamaForCausalLM, "
                        "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
                        "MixtralForCausalLM, Qwen2MoeForCausalLM and Qwen3MoeForCausalLM are)",
                        f.where(), name.substr(0, 80)));
  }
  QKV_ASSIGN_OR_RETURN(std::optional<std::string> model_type, f.OptString("model_type"));
  if (!model_type.has_value()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: neither field 'architectures' nor 'model_type' is present", f.where()));
  }
  for (const ArchInfo& a : kArchs) {
    if (a.model_type == *model_type) return &a;
  }
  return absl::UnimplementedError(absl::StrFormat(
      "%s: field 'model_type' = '%s' is not supported (llama, mistral, qwen2, qwen3, mixtral, "
      "qwen2_moe, qwen3_moe are)",
      f.where(), model_type->substr(0, 80)));
}

// MoE fields as transformers' MixtralConfig / Qwen2MoeConfig name them. Qwen2-MoE layers
// that stay dense (decoder_sparse_step > 1, mlp_only_layers) are refused rather than run
// wrong.
absl::Status ParseMoe(const Fields& f, ModelConfig& c) {
  MoeConfig& m = c.moe;
  if (c.architecture == "mixtral") {
    QKV_ASSIGN_OR_RETURN(m.n_experts, f.Dim("num_local_experts", 8));
    QKV_ASSIGN_OR_RETURN(m.top_k, f.Dim("num_experts_per_tok", 2));
    m.expert_intermediate = c.intermediate;
    m.weighting = moe::RouterWeighting::kSoftmaxTopKNormalized;
  } else if (c.architecture == "qwen2moe" || c.architecture == "qwen3moe") {
    // Defaults as Qwen2MoeConfig / Qwen3MoeConfig have them; Qwen3-MoE has no shared expert.
    const bool q3 = c.architecture == "qwen3moe";
    // transformers 5 writes Qwen3-MoE's count as num_local_experts; the Hub's files say
    // num_experts.
    const char* count =
        !f.Has("num_experts") && f.Has("num_local_experts") ? "num_local_experts" : "num_experts";
    QKV_ASSIGN_OR_RETURN(m.n_experts, f.Dim(count, q3 ? 128 : 60));
    QKV_ASSIGN_OR_RETURN(m.top_k, f.Dim("num_experts_per_tok", q3 ? 8 : 4));
    QKV_ASSIGN_OR_RETURN(m.expert_intermediate, f.Dim("moe_intermediate_size", q3 ? 768 : 1408));
    QKV_ASSIGN_OR_RETURN(std::optional<int64_t> shared,
                         f.OptInt("shared_expert_intermediate_size"));
    m.shared_intermediate = q3 ? 0 : shared.value_or(5632);
    if (m.shared_intermediate < 0 || m.shared_intermediate > kMaxDim) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field 'shared_expert_intermediate_size' = %d is outside [0, %d]",
                          f.where(), m.shared_intermediate, kMaxDim));
    }
    QKV_ASSIGN_OR_RETURN(const bool norm, f.Bool("norm_topk_prob", false));
    m.weighting =
        norm ? moe::RouterWeighting::kSoftmaxTopKNormalized : moe::RouterWeighting::kSoftmaxTopK;
    QKV_ASSIGN_OR_RETURN(const int64_t step, f.Dim("decoder_sparse_step", 1));
    if (step != 1) {
      return absl::UnimplementedError(absl::StrFormat(
          "%s: field 'decoder_sparse_step' = %d: only every-layer MoE (1) is supported", f.where(),
          step));
    }
    if (const json* dense = f.Get("mlp_only_layers"); dense != nullptr && !dense->empty()) {
      return absl::UnimplementedError(absl::StrFormat(
          "%s: field 'mlp_only_layers' is not empty: dense layers inside a MoE model are not "
          "supported",
          f.where()));
    }
  } else {
    return absl::OkStatus();
  }
  if (m.top_k > m.n_experts) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: field 'num_experts_per_tok' = %d exceeds the %d experts", f.where(),
                        m.top_k, m.n_experts));
  }
  return absl::OkStatus();
}

// YaRN's magnitude correction as transformers computes it.
double YarnMscale(double scale, double mscale) {
  return scale <= 1 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

// RoPE parameters: transformers 5 writes `rope_parameters` (theta included); 4.x wrote
// `rope_theta` and an optional `rope_scaling` dict with `type` or `rope_type`.
absl::Status ParseRope(const Fields& top, int64_t context_length, RopeConfig& rope) {
  const json* params = top.Get("rope_parameters");
  std::string field = "rope_parameters";
  if (params == nullptr) {
    params = top.Get("rope_scaling");
    field = "rope_scaling";
  }
  QKV_ASSIGN_OR_RETURN(const double top_theta, top.Positive("rope_theta", 10000.0));
  rope = RopeConfig();
  rope.theta = static_cast<float>(top_theta);
  if (params == nullptr) return absl::OkStatus();
  if (!params->is_object()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: field '%s' must be an object, got %s",
                                                      top.where(), field, params->type_name()));
  }
  const Fields p(*params, absl::StrFormat("%s: %s", top.where(), field));
  QKV_ASSIGN_OR_RETURN(const double theta, p.Positive("rope_theta", top_theta));
  rope.theta = static_cast<float>(theta);

  QKV_ASSIGN_OR_RETURN(std::optional<std::string> type, p.OptString("rope_type"));
  if (!type.has_value()) {
    QKV_ASSIGN_OR_RETURN(type, p.OptString("type"));
  }
  const std::string kind = type.value_or("default");

  QKV_ASSIGN_OR_RETURN(std::optional<double> partial, p.OptFloat("partial_rotary_factor"));
  if (partial.has_value() && *partial != 1.0) {
    return absl::UnimplementedError(
        absl::StrFormat("%s: field 'partial_rotary_factor' = %g is not supported (only 1.0 is)",
                        p.where(), *partial));
  }
  // transformers gives a top-level original_max_position_embeddings priority over the dict's.
  auto original_context = [&]() -> absl::StatusOr<int64_t> {
    if (top.Has("original_max_position_embeddings")) {
      return top.Dim("original_max_position_embeddings", std::nullopt);
    }
    return p.Dim("original_max_position_embeddings", context_length);
  };

  if (kind == "default") return absl::OkStatus();
  if (kind == "linear") {
    rope.scaling = RopeScalingType::kLinear;
    QKV_ASSIGN_OR_RETURN(const double factor, p.Positive("factor", std::nullopt));
    rope.factor = static_cast<float>(factor);
    return absl::OkStatus();
  }
  if (kind == "yarn") {
    rope.scaling = RopeScalingType::kYarn;
    QKV_ASSIGN_OR_RETURN(rope.original_context, original_context());
    QKV_ASSIGN_OR_RETURN(std::optional<double> factor, p.OptFloat("factor"));
    if (!factor.has_value()) {
      factor = static_cast<double>(context_length) / static_cast<double>(rope.original_context);
    }
    if (!(*factor > 0)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field 'factor' = %g must be positive", p.where(), *factor));
    }
    rope.factor = static_cast<float>(*factor);
    // transformers treats 0 like absent for the betas ("or 32").
    QKV_ASSIGN_OR_RETURN(std::optional<double> beta_fast, p.OptFloat("beta_fast"));
    QKV_ASSIGN_OR_RETURN(std::optional<double> beta_slow, p.OptFloat("beta_slow"));
    rope.yarn_beta_fast = static_cast<float>(beta_fast.value_or(0) != 0 ? *beta_fast : 32.0);
    rope.yarn_beta_slow = static_cast<float>(beta_slow.value_or(0) != 0 ? *beta_slow : 1.0);
    QKV_ASSIGN_OR_RETURN(const bool truncate, p.Bool("truncate", true));
    if (!truncate) {
      return absl::UnimplementedError(
          absl::StrFormat("%s: field 'truncate' = false is not supported", p.where()));
    }
    // RopeConfig multiplies the default correction 0.1*ln(s)+1, so an explicit attention_factor
    // (or DeepSeek's mscale pair) is expressed relative to it.
    const double base = YarnMscale(*factor, 1.0);
    QKV_ASSIGN_OR_RETURN(std::optional<double> attention_factor, p.OptFloat("attention_factor"));
    QKV_ASSIGN_OR_RETURN(std::optional<double> mscale, p.OptFloat("mscale"));
    QKV_ASSIGN_OR_RETURN(std::optional<double> mscale_all_dim, p.OptFloat("mscale_all_dim"));
    double effective = base;
    if (attention_factor.has_value()) {
      effective = *attention_factor;
    } else if (mscale.value_or(0) != 0 && mscale_all_dim.value_or(0) != 0) {
      effective = YarnMscale(*factor, *mscale) / YarnMscale(*factor, *mscale_all_dim);
    }
    rope.yarn_attn_factor = static_cast<float>(effective / base);
    return absl::OkStatus();
  }
  if (kind == "llama3") {
    rope.scaling = RopeScalingType::kLlama3;
    QKV_ASSIGN_OR_RETURN(const double factor, p.Positive("factor", std::nullopt));
    QKV_ASSIGN_OR_RETURN(const double low, p.Positive("low_freq_factor", std::nullopt));
    QKV_ASSIGN_OR_RETURN(const double high, p.Positive("high_freq_factor", std::nullopt));
    if (!(high > low)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field 'high_freq_factor' = %g must exceed 'low_freq_factor' = %g",
                          p.where(), high, low));
    }
    rope.factor = static_cast<float>(factor);
    rope.llama3_low_freq_factor = static_cast<float>(low);
    rope.llama3_high_freq_factor = static_cast<float>(high);
    QKV_ASSIGN_OR_RETURN(rope.original_context, original_context());
    return absl::OkStatus();
  }
  return absl::UnimplementedError(
      absl::StrFormat("%s: RoPE type '%s' is not supported (default, linear, yarn and llama3 are)",
                      p.where(), kind.substr(0, 80)));
}

// One GGUF tensor name split into its layer (-1 for global tensors) and suffix.
struct GgufName {
  int64_t layer = -1;
  std::string suffix;  // "attn_q.weight", or the whole name for globals
};

struct LayerSuffix {
  std::string_view hf;
  std::string_view gguf;
};

constexpr LayerSuffix kLayerSuffixes[] = {
    {"self_attn.q_proj.weight", "attn_q.weight"},
    {"self_attn.k_proj.weight", "attn_k.weight"},
    {"self_attn.v_proj.weight", "attn_v.weight"},
    {"self_attn.o_proj.weight", "attn_output.weight"},
    {"self_attn.q_proj.bias", "attn_q.bias"},
    {"self_attn.k_proj.bias", "attn_k.bias"},
    {"self_attn.v_proj.bias", "attn_v.bias"},
    {"self_attn.o_proj.bias", "attn_output.bias"},
    {"self_attn.q_norm.weight", "attn_q_norm.weight"},
    {"self_attn.k_norm.weight", "attn_k_norm.weight"},
    {"mlp.gate_proj.weight", "ffn_gate.weight"},
    {"mlp.up_proj.weight", "ffn_up.weight"},
    {"mlp.down_proj.weight", "ffn_down.weight"},
    {"input_layernorm.weight", "attn_norm.weight"},
    {"post_attention_layernorm.weight", "ffn_norm.weight"},
};

// Per-expert tensors keep one GGUF-style name each, "blk.L.ffn_gate.E.weight" (llama.cpp's
// naming before experts were merged into 3-D tensors); the engine reads either layout.
std::optional<GgufName> MapExpertName(int64_t layer, std::string_view rest) {
  struct Family {
    std::string_view prefix, router, gate, up, down;
  };
  constexpr Family kFamilies[] = {
      {"block_sparse_moe.", "gate.weight", "w1.weight", "w3.weight", "w2.weight"},  // Mixtral
      {"mlp.", "gate.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"},
  };
  for (const Family& f : kFamilies) {
    if (!rest.starts_with(f.prefix)) continue;
    std::string_view r = rest.substr(f.prefix.size());
    if (r == f.router) return GgufName{layer, "ffn_gate_inp.weight"};
    if (f.prefix == "mlp.") {
      if (r == "shared_expert.gate_proj.weight") return GgufName{layer, "ffn_gate_shexp.weight"};
      if (r == "shared_expert.up_proj.weight") return GgufName{layer, "ffn_up_shexp.weight"};
      if (r == "shared_expert.down_proj.weight") return GgufName{layer, "ffn_down_shexp.weight"};
      if (r == "shared_expert_gate.weight") return GgufName{layer, "ffn_gate_inp_shexp.weight"};
    }
    constexpr std::string_view kExperts = "experts.";
    if (!r.starts_with(kExperts)) return std::nullopt;
    r.remove_prefix(kExperts.size());
    const size_t dot = r.find('.');
    if (dot == std::string_view::npos || dot == 0 || dot > 5) return std::nullopt;
    if (dot > 1 && r[0] == '0') return std::nullopt;
    int64_t e = 0;
    auto [ptr, ec] = std::from_chars(r.data(), r.data() + dot, e);
    if (ec != std::errc() || ptr != r.data() + dot) return std::nullopt;
    const std::string_view w = r.substr(dot + 1);
    const char* kind = w == f.gate   ? "ffn_gate"
                       : w == f.up   ? "ffn_up"
                       : w == f.down ? "ffn_down"
                                     : nullptr;
    if (kind == nullptr) return std::nullopt;
    return GgufName{layer, absl::StrFormat("%s.%d.weight", kind, e)};
  }
  return std::nullopt;
}

std::optional<GgufName> MapName(std::string_view hf) {
  if (hf == "model.embed_tokens.weight") return GgufName{-1, "token_embd.weight"};
  if (hf == "model.norm.weight") return GgufName{-1, "output_norm.weight"};
  if (hf == "lm_head.weight") return GgufName{-1, "output.weight"};
  constexpr std::string_view kPrefix = "model.layers.";
  if (!hf.starts_with(kPrefix)) return std::nullopt;
  hf.remove_prefix(kPrefix.size());
  const size_t dot = hf.find('.');
  if (dot == std::string_view::npos || dot == 0 || dot > 9) return std::nullopt;
  const std::string_view digits = hf.substr(0, dot);
  if (digits.size() > 1 && digits[0] == '0') return std::nullopt;  // one spelling per layer
  int64_t layer = 0;
  auto [ptr, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), layer);
  if (ec != std::errc() || ptr != digits.data() + digits.size()) return std::nullopt;
  const std::string_view rest = hf.substr(dot + 1);
  for (const LayerSuffix& s : kLayerSuffixes) {
    if (s.hf == rest) return GgufName{layer, std::string(s.gguf)};
  }
  return MapExpertName(layer, rest);
}

std::string FullName(const GgufName& n) {
  if (n.layer < 0) return n.suffix;
  return absl::StrFormat("blk.%d.%s", n.layer, n.suffix);
}

// The HF (row-major) shape config.json implies for a tensor, and how, for error messages.
std::pair<std::vector<int64_t>, std::string> ExpectedShape(const GgufName& n,
                                                           const ModelConfig& c) {
  const int64_t q_rows = c.n_heads * c.head_dim;
  const int64_t kv_rows = c.n_kv_heads * c.head_dim;
  const std::string q_how =
      absl::StrFormat("num_attention_heads=%d x head_dim=%d", c.n_heads, c.head_dim);
  const std::string kv_how =
      absl::StrFormat("num_key_value_heads=%d x head_dim=%d", c.n_kv_heads, c.head_dim);
  const std::string h = absl::StrFormat("hidden_size=%d", c.hidden);
  const std::string ff = absl::StrFormat("intermediate_size=%d", c.intermediate);
  const std::string v = absl::StrFormat("vocab_size=%d", c.vocab_size);
  const std::string& s = n.suffix;
  if (s == "token_embd.weight" || s == "output.weight") {
    return {{c.vocab_size, c.hidden}, v + ", " + h};
  }
  if (s == "output_norm.weight" || s == "attn_norm.weight" || s == "ffn_norm.weight") {
    return {{c.hidden}, h};
  }
  if (s == "attn_q.weight") return {{q_rows, c.hidden}, q_how + ", " + h};
  if (s == "attn_k.weight" || s == "attn_v.weight") return {{kv_rows, c.hidden}, kv_how + ", " + h};
  if (s == "attn_output.weight") return {{c.hidden, q_rows}, h + ", " + q_how};
  if (s == "attn_q.bias") return {{q_rows}, q_how};
  if (s == "attn_k.bias" || s == "attn_v.bias") return {{kv_rows}, kv_how};
  if (s == "attn_output.bias") return {{c.hidden}, h};
  if (s == "attn_q_norm.weight" || s == "attn_k_norm.weight") {
    return {{c.head_dim}, absl::StrFormat("head_dim=%d", c.head_dim)};
  }
  if (s == "ffn_gate.weight" || s == "ffn_up.weight") {
    return {{c.intermediate, c.hidden}, ff + ", " + h};
  }
  if (s == "ffn_down.weight") return {{c.hidden, c.intermediate}, h + ", " + ff};
  const std::string e = absl::StrFormat("num_experts=%d", c.moe.n_experts);
  const std::string eff = absl::StrFormat("expert intermediate=%d", c.moe.expert_intermediate);
  const std::string sff =
      absl::StrFormat("shared_expert_intermediate_size=%d", c.moe.shared_intermediate);
  if (s == "ffn_gate_inp.weight") return {{c.moe.n_experts, c.hidden}, e + ", " + h};
  if (s == "ffn_gate_inp_shexp.weight") return {{1, c.hidden}, "1, " + h};
  if (s == "ffn_gate_shexp.weight" || s == "ffn_up_shexp.weight") {
    return {{c.moe.shared_intermediate, c.hidden}, sff + ", " + h};
  }
  if (s == "ffn_down_shexp.weight") return {{c.hidden, c.moe.shared_intermediate}, h + ", " + sff};
  // ffn_{gate,up,down}.E.weight: the expert index must exist.
  for (const char* kind : {"ffn_gate.", "ffn_up.", "ffn_down."}) {
    if (!s.starts_with(kind) || s.find(".weight") == std::string::npos) continue;
    const int64_t idx = std::atoll(s.c_str() + std::string_view(kind).size());
    if (idx >= c.moe.n_experts) return {{}, e + " (no such expert)"};
    if (std::string_view(kind) == "ffn_down.") {
      return {{c.hidden, c.moe.expert_intermediate}, h + ", " + eff};
    }
    return {{c.moe.expert_intermediate, c.hidden}, eff + ", " + h};
  }
  return {{}, "unknown"};
}

class HfModelSource final : public WeightSource {
 public:
  const ModelConfig& config() const override { return config_; }
  const WeightTensor* Find(std::string_view gguf_name) const override {
    auto it = index_.find(std::string(gguf_name));  // absl here lacks std::string_view lookup
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  const std::string& origin() const override { return origin_; }

  absl::Status Load(const std::string& dir);

 private:
  absl::Status AddTensor(const SafetensorsFile& file, const SafetensorsTensor& t);
  absl::StatusOr<std::vector<std::string>> ShardsFromIndex(const std::string& index_path);

  ModelConfig config_;
  std::string origin_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::vector<std::unique_ptr<uint8_t[]>> owned_;  // permuted or realigned copies
  std::vector<WeightTensor> tensors_;
  absl::flat_hash_map<std::string, size_t> index_;
  absl::flat_hash_map<std::string, std::string> weight_map_;  // HF name -> shard file name
};

absl::StatusOr<std::vector<std::string>> HfModelSource::ShardsFromIndex(
    const std::string& index_path) {
  QKV_ASSIGN_OR_RETURN(const std::string text, ReadTextFile(index_path));
  QKV_ASSIGN_OR_RETURN(const json index, ParseJson(text, index_path));
  if (!index.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: must be a JSON object, got %s", index_path, index.type_name()));
  }
  auto wm = index.find("weight_map");
  if (wm == index.end() || !wm->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: field 'weight_map' is missing or not an object", index_path));
  }
  if (wm->empty()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: field 'weight_map' is empty", index_path));
  }
  std::vector<std::string> shards;
  absl::flat_hash_set<std::string> seen;
  for (const auto& [tensor, file] : wm->items()) {
    if (!file.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: field 'weight_map' entry '%s' must be a file name string",
                          index_path, tensor.substr(0, 80)));
    }
    const std::string shard = file.get<std::string>();
    // Shards are siblings of the index; anything else could escape the model directory.
    if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: field 'weight_map' entry '%s' names '%s', which is not a file in the directory",
          index_path, tensor.substr(0, 80), shard.substr(0, 80)));
    }
    weight_map_[tensor] = shard;
    if (seen.insert(shard).second) shards.push_back(shard);
  }
  return shards;
}

absl::Status HfModelSource::AddTensor(const SafetensorsFile& file, const SafetensorsTensor& t) {
  // Rotary tables saved as buffers by old transformers versions are recomputed by the engine.
  if (std::string_view(t.name).ends_with(".rotary_emb.inv_freq")) return absl::OkStatus();
  if (!weight_map_.empty()) {
    auto it = weight_map_.find(t.name);
    const std::string base = fs::path(file.name()).filename().string();
    if (it == weight_map_.end() || it->second != base) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: tensor '%s' is not assigned to this shard by the index's field 'weight_map'",
          file.name(), t.name));
    }
  }
  std::optional<GgufName> mapped = MapName(t.name);
  if (!mapped.has_value()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: tensor '%s' is not part of a %s decoder",
                                                      file.name(), t.name.substr(0, 120),
                                                      config_.architecture));
  }
  if (mapped->layer >= config_.n_layers) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: tensor '%s' belongs to layer %d but config.json has "
                        "num_hidden_layers=%d",
                        file.name(), t.name, mapped->layer, config_.n_layers));
  }
  const std::string gguf_name = FullName(*mapped);
  if (index_.contains(gguf_name)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: tensor '%s' appears in more than one file", file.name(), t.name));
  }
  auto [expected, how] = ExpectedShape(*mapped, config_);
  if (t.shape != expected) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: tensor '%s' has shape %s but config.json (%s) implies %s", file.name(),
                        t.name, ShapeString(t.shape), how, ShapeString(expected)));
  }

  WeightTensor w;
  w.name = gguf_name;
  w.dims.assign(t.shape.rbegin(), t.shape.rend());
  w.type = t.type;
  w.n_bytes = t.n_bytes;
  w.data = t.data;

  // llama.cpp's converter permutes Q/K (weights and biases) for the LLaMA family so ggml's
  // adjacent-pair RoPE applies; qwen2 keeps HF's order and uses NeoX RoPE instead.
  const bool permute =
      !config_.rope_neox && (mapped->suffix == "attn_q.weight" || mapped->suffix == "attn_q.bias" ||
                             mapped->suffix == "attn_k.weight" || mapped->suffix == "attn_k.bias");
  const int64_t elem_bytes = t.n_elements == 0 ? 1 : t.n_bytes / t.n_elements;
  const bool misaligned = reinterpret_cast<uintptr_t>(t.data) % elem_bytes != 0;
  if (permute || misaligned) {
    auto buf = std::make_unique<uint8_t[]>(static_cast<size_t>(std::max<int64_t>(t.n_bytes, 1)));
    if (permute) {
      const int64_t n_head =
          mapped->suffix.starts_with("attn_q") ? config_.n_heads : config_.n_kv_heads;
      const int64_t rows = t.shape[0];
      PermuteQkRows(t.data, buf.get(), n_head, rows, t.n_bytes / rows);
    } else if (t.n_bytes > 0) {
      // Kernels read elements in place; a header length that is not a multiple of the element
      // size would leave every one of them misaligned.
      std::memcpy(buf.get(), t.data, static_cast<size_t>(t.n_bytes));
    }
    w.data = buf.get();
    owned_.push_back(std::move(buf));
  }
  index_[gguf_name] = tensors_.size();
  tensors_.push_back(std::move(w));
  return absl::OkStatus();
}

absl::Status HfModelSource::Load(const std::string& dir) {
  origin_ = dir;
  const fs::path root(dir);
  std::error_code ec;
  if (!fs::is_directory(root, ec)) {
    return absl::NotFoundError(absl::StrFormat("%s: not a directory", dir));
  }
  const std::string config_path = (root / "config.json").string();
  QKV_ASSIGN_OR_RETURN(const std::string config_text, ReadTextFile(config_path));
  QKV_ASSIGN_OR_RETURN(config_, ParseHfConfig(config_text, config_path));
  // config.json carries no usable name (transformers 4 stored a local path), so the directory
  // name stands in, as it does on the Hub.
  config_.name = root.filename().string();
  if (config_.name.empty()) config_.name = root.parent_path().filename().string();

  // transformers prefers the single file when both exist.
  std::vector<std::string> paths;
  const fs::path single = root / "model.safetensors";
  const fs::path index = root / "model.safetensors.index.json";
  if (fs::exists(single, ec)) {
    paths.push_back(single.string());
  } else if (fs::exists(index, ec)) {
    QKV_ASSIGN_OR_RETURN(std::vector<std::string> shards, ShardsFromIndex(index.string()));
    for (const std::string& s : shards) {
      // Checked up front: a missing shard explains the tensors it would have held.
      if (!fs::exists(root / s, ec)) {
        return absl::NotFoundError(absl::StrFormat(
            "%s: field 'weight_map' names shard %s, which does not exist", index.string(), s));
      }
      paths.push_back((root / s).string());
    }
  } else {
    return absl::NotFoundError(absl::StrFormat(
        "%s: neither model.safetensors nor model.safetensors.index.json is present", dir));
  }
  for (const std::string& path : paths) {
    QKV_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(path));
    for (const SafetensorsTensor& t : file->tensors()) {
      QKV_RETURN_IF_ERROR(AddTensor(*file, t));
    }
    files_.push_back(std::move(file));
  }
  if (!weight_map_.empty()) {
    for (const auto& [name, shard] : weight_map_) {
      bool found = false;
      for (const auto& f : files_) {
        if (fs::path(f->name()).filename() == shard && f->Find(name) != nullptr) found = true;
      }
      if (!found) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s: field 'weight_map' places tensor '%s' in %s, which does not contain it",
            index.string(), name.substr(0, 120), shard));
      }
    }
  }

  // Everything the engine reads must be there; listing all that is missing at once saves a
  // round trip per tensor when a conversion went wrong.
  std::vector<std::string> required = {"token_embd.weight", "output_norm.weight"};
  if (!config_.tied_embeddings) required.push_back("output.weight");
  for (int64_t l = 0; l < config_.n_layers; ++l) {
    for (const char* s : {"attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                          "attn_norm.weight", "ffn_norm.weight"}) {
      required.push_back(absl::StrFormat("blk.%d.%s", l, s));
    }
    if (config_.qk_norm) {
      for (const char* s : {"attn_q_norm.weight", "attn_k_norm.weight"}) {
        required.push_back(absl::StrFormat("blk.%d.%s", l, s));
      }
    }
    if (!config_.moe.enabled()) {
      for (const char* s : {"ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"}) {
        required.push_back(absl::StrFormat("blk.%d.%s", l, s));
      }
    } else {
      required.push_back(absl::StrFormat("blk.%d.ffn_gate_inp.weight", l));
      for (int64_t e = 0; e < config_.moe.n_experts; ++e) {
        for (const char* s : {"ffn_gate", "ffn_up", "ffn_down"}) {
          required.push_back(absl::StrFormat("blk.%d.%s.%d.weight", l, s, e));
        }
      }
      if (config_.moe.shared_intermediate > 0) {
        for (const char* s : {"ffn_gate_shexp.weight", "ffn_up_shexp.weight",
                              "ffn_down_shexp.weight", "ffn_gate_inp_shexp.weight"}) {
          required.push_back(absl::StrFormat("blk.%d.%s", l, s));
        }
      }
    }
    if (config_.attention_bias) {
      for (const char* s : {"attn_q.bias", "attn_k.bias", "attn_v.bias"}) {
        required.push_back(absl::StrFormat("blk.%d.%s", l, s));
      }
      // LLaMA's attention_bias also covers o_proj; qwen2 has none there.
      if (config_.architecture != "qwen2" && config_.architecture != "qwen2moe") {
        required.push_back(absl::StrFormat("blk.%d.attn_output.bias", l));
      }
    }
  }
  std::vector<std::string> missing;
  for (const std::string& name : required) {
    if (!index_.contains(name)) missing.push_back(name);
  }
  if (!missing.empty()) {
    if (missing.size() > 8) {
      const size_t more = missing.size() - 8;
      missing.resize(8);
      missing.push_back(absl::StrFormat("and %d more", more));
    }
    return absl::NotFoundError(
        absl::StrFormat("%s: missing tensors (GGUF names): %s", dir, absl::StrJoin(missing, ", ")));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ParseHfConfig(std::string_view json_text, const std::string& origin) {
  QKV_ASSIGN_OR_RETURN(const json cfg, ParseJson(json_text, origin));
  if (!cfg.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: must be a JSON object, got %s", origin, cfg.type_name()));
  }
  const Fields f(cfg, origin);
  ModelConfig c;
  QKV_ASSIGN_OR_RETURN(const ArchInfo* arch, FindArch(f));
  c.architecture = std::string(arch->name);
  c.rope_neox = c.architecture.starts_with("qwen");
  c.qk_norm = c.architecture.starts_with("qwen3");

  QKV_ASSIGN_OR_RETURN(c.hidden, f.Dim("hidden_size", std::nullopt));
  QKV_ASSIGN_OR_RETURN(c.intermediate, f.Dim("intermediate_size", std::nullopt));
  QKV_ASSIGN_OR_RETURN(c.n_layers, f.Dim("num_hidden_layers", std::nullopt));
  QKV_ASSIGN_OR_RETURN(c.n_heads, f.Dim("num_attention_heads", std::nullopt));
  QKV_ASSIGN_OR_RETURN(c.n_kv_heads, f.Dim("num_key_value_heads", c.n_heads));
  QKV_ASSIGN_OR_RETURN(c.vocab_size, f.Dim("vocab_size", std::nullopt));
  if (c.n_heads % c.n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: field 'num_attention_heads' = %d is not a multiple of 'num_key_value_heads' = %d",
        origin, c.n_heads, c.n_kv_heads));
  }
  if (!f.Has("head_dim") && c.hidden % c.n_heads != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: field 'head_dim' is absent and 'hidden_size' = %d is not a multiple of "
        "'num_attention_heads' = %d",
        origin, c.hidden, c.n_heads));
  }
  QKV_ASSIGN_OR_RETURN(c.head_dim, f.Dim("head_dim", c.hidden / c.n_heads));
  if (c.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: field 'head_dim' = %d must be even for RoPE", origin, c.head_dim));
  }
  if (c.n_heads * c.head_dim > kMaxDim) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: 'num_attention_heads' x 'head_dim' = %d is too large", origin,
                        c.n_heads * c.head_dim));
  }

  // Defaults as the transformers config classes define them.
  const int64_t default_context = c.architecture.starts_with("qwen") ? 32768
                                  : c.architecture == "mistral" || c.architecture == "mixtral"
                                      ? 4096 * 32
                                      : 2048;
  QKV_ASSIGN_OR_RETURN(c.context_length, f.Dim("max_position_embeddings", default_context));
  QKV_ASSIGN_OR_RETURN(const double eps, f.Positive("rms_norm_eps", 1e-6));
  c.rms_eps = static_cast<float>(eps);
  QKV_ASSIGN_OR_RETURN(c.tied_embeddings, f.Bool("tie_word_embeddings", false));
  QKV_RETURN_IF_ERROR(ParseRope(f, c.context_length, c.rope));

  QKV_RETURN_IF_ERROR(ParseMoe(f, c));
  if (c.architecture == "qwen2" || c.architecture == "qwen2moe") {
    c.attention_bias = true;  // Qwen2 always has q/k/v biases (Qwen3 none by default)
  } else {
    QKV_ASSIGN_OR_RETURN(c.attention_bias, f.Bool("attention_bias", false));
  }
  QKV_ASSIGN_OR_RETURN(const bool mlp_bias, f.Bool("mlp_bias", false));
  if (mlp_bias) {
    return absl::UnimplementedError(
        absl::StrFormat("%s: field 'mlp_bias' = true is not supported", origin));
  }
  // GPTQ/AWQ/bitsandbytes checkpoints store packed integer weights this reader cannot use;
  // saying so beats a dtype error on the first packed tensor.
  if (f.Has("quantization_config")) {
    return absl::UnimplementedError(absl::StrFormat(
        "%s: field 'quantization_config' is present; quantized HF checkpoints are not "
        "supported (use a GGUF file instead)",
        origin));
  }
  QKV_ASSIGN_OR_RETURN(std::optional<std::string> act, f.OptString("hidden_act"));
  if (act.has_value() && *act != "silu") {
    return absl::UnimplementedError(
        absl::StrFormat("%s: field 'hidden_act' = '%s' is not supported (only silu is)", origin,
                        act->substr(0, 80)));
  }
  return c;
}

std::optional<std::string> HfToGgufName(std::string_view hf_name) {
  std::optional<GgufName> n = MapName(hf_name);
  if (!n.has_value()) return std::nullopt;
  return FullName(*n);
}

void PermuteQkRows(const uint8_t* src, uint8_t* dst, int64_t n_head, int64_t rows,
                   int64_t row_bytes) {
  const int64_t per_head = rows / n_head;
  const int64_t half = per_head / 2;
  for (int64_t h = 0; h < n_head; ++h) {
    for (int64_t j = 0; j < half; ++j) {
      for (int64_t s = 0; s < 2; ++s) {
        const int64_t to = h * per_head + 2 * j + s;
        const int64_t from = h * per_head + s * half + j;
        std::memcpy(dst + to * row_bytes, src + from * row_bytes, static_cast<size_t>(row_bytes));
      }
    }
  }
}

absl::StatusOr<std::unique_ptr<WeightSource>> OpenHfModelDir(const std::string& dir) {
  auto source = std::make_unique<HfModelSource>();
  QKV_RETURN_IF_ERROR(source->Load(dir));
  return std::unique_ptr<WeightSource>(std::move(source));
}

}  // namespace quantkv
