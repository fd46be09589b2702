#include "runtime/model/gguf_model.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "runtime/util/status_macros.h"

namespace quantkv {

namespace {

// llama.cpp's MoE keys: Mixtral is arch "llama" with expert_count (its feed_forward_length is
// the expert's); qwen2moe has expert_feed_forward_length and a shared expert. Top-k weights
// are renormalised for llama and not for qwen2moe (llama.cpp's defaults), unless the file
// says expert_weights_norm.
absl::Status MoeConfigFromGguf(const GgufFile& f, const std::string& a, ModelConfig& c) {
  QKV_ASSIGN_OR_RETURN(c.moe.n_experts, f.GetIntOr(a + "expert_count", 0));
  if (c.moe.n_experts == 0) {
    if (c.architecture.ends_with("moe")) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: %sexpert_count is missing", f.name(), a));
    }
    return absl::OkStatus();
  }
  QKV_ASSIGN_OR_RETURN(c.moe.top_k, f.GetInt(a + "expert_used_count"));
  QKV_ASSIGN_OR_RETURN(c.moe.expert_intermediate,
                       f.GetIntOr(a + "expert_feed_forward_length", c.intermediate));
  QKV_ASSIGN_OR_RETURN(c.moe.shared_intermediate,
                       f.GetIntOr(a + "expert_shared_feed_forward_length", 0));
  // qwen3moe renormalises (norm_topk_prob in its HF configs), qwen2moe does not.
  QKV_ASSIGN_OR_RETURN(bool norm,
                       f.GetBoolOr(a + "expert_weights_norm", c.architecture != "qwen2moe"));
  c.moe.weighting =
      norm ? moe::RouterWeighting::kSoftmaxTopKNormalized : moe::RouterWeighting::kSoftmaxTopK;
  if (c.moe.n_experts < 0 || c.moe.n_experts > 4096 || c.moe.top_k < 1 ||
      c.moe.top_k > c.moe.n_experts || c.moe.expert_intermediate <= 0 ||
      c.moe.shared_intermediate < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: inconsistent MoE metadata: %sexpert_count %d, expert_used_count %d, "
                        "expert_feed_forward_length %d, expert_shared_feed_forward_length %d",
                        f.name(), a, c.moe.n_experts, c.moe.top_k, c.moe.expert_intermediate,
                        c.moe.shared_intermediate));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ModelConfigFromGguf(const GgufFile& f) {
  ModelConfig c;
  QKV_ASSIGN_OR_RETURN(c.architecture, f.GetString("general.architecture"));
  if (c.architecture != "llama" && c.architecture != "mistral" && c.architecture != "qwen2" &&
      c.architecture != "qwen3" && c.architecture != "qwen2moe" && c.architecture != "qwen3moe") {
    return absl::UnimplementedError(absl::StrFormat(
        "%s: general.architecture '%s' is not supported (llama, mistral, qwen2, qwen3, qwen2moe, "
        "qwen3moe)",
        f.name(), c.architecture));
  }
  const std::string a = c.architecture + ".";
  QKV_ASSIGN_OR_RETURN(c.name, f.GetStringOr("general.name", ""));
  QKV_ASSIGN_OR_RETURN(c.n_layers, f.GetInt(a + "block_count"));
  QKV_ASSIGN_OR_RETURN(c.hidden, f.GetInt(a + "embedding_length"));
  QKV_ASSIGN_OR_RETURN(c.intermediate, f.GetInt(a + "feed_forward_length"));
  QKV_ASSIGN_OR_RETURN(c.n_heads, f.GetInt(a + "attention.head_count"));
  QKV_ASSIGN_OR_RETURN(c.n_kv_heads, f.GetIntOr(a + "attention.head_count_kv", c.n_heads));
  QKV_ASSIGN_OR_RETURN(c.context_length, f.GetIntOr(a + "context_length", 2048));
  QKV_ASSIGN_OR_RETURN(double eps, f.GetFloatOr(a + "attention.layer_norm_rms_epsilon", 1e-5));
  c.rms_eps = static_cast<float>(eps);
  if (c.n_heads <= 0 || c.hidden <= 0 || c.n_layers <= 0 || c.intermediate <= 0 ||
      c.n_kv_heads <= 0 || c.n_heads % c.n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: inconsistent shape metadata: %sblock_count %d, embedding_length %d, "
        "feed_forward_length %d, head_count %d, head_count_kv %d",
        f.name(), a, c.n_layers, c.hidden, c.intermediate, c.n_heads, c.n_kv_heads));
  }
  QKV_ASSIGN_OR_RETURN(c.head_dim, f.GetIntOr(a + "attention.key_length", c.hidden / c.n_heads));
  QKV_ASSIGN_OR_RETURN(int64_t rot, f.GetIntOr(a + "rope.dimension_count", c.head_dim));
  if (rot != c.head_dim || c.head_dim % 2 != 0) {
    return absl::UnimplementedError(absl::StrFormat(
        "%s: %srope.dimension_count %d != head dim %d (partial rotary is not supported)", f.name(),
        a, rot, c.head_dim));
  }
  QKV_ASSIGN_OR_RETURN(double theta, f.GetFloatOr(a + "rope.freq_base", 10000.0));
  c.rope.theta = static_cast<float>(theta);
  QKV_ASSIGN_OR_RETURN(std::string scaling, f.GetStringOr(a + "rope.scaling.type", "none"));
  QKV_ASSIGN_OR_RETURN(double factor, f.GetFloatOr(a + "rope.scaling.factor", 1.0));
  QKV_ASSIGN_OR_RETURN(c.rope.original_context,
                       f.GetIntOr(a + "rope.scaling.original_context_length", c.context_length));
  c.rope.factor = static_cast<float>(factor);
  if (scaling == "none" || (scaling == "linear" && factor == 1.0)) {
    c.rope.scaling = RopeScalingType::kNone;
  } else if (scaling == "linear") {
    c.rope.scaling = RopeScalingType::kLinear;
  } else if (scaling == "yarn") {
    c.rope.scaling = RopeScalingType::kYarn;
    QKV_ASSIGN_OR_RETURN(double bf, f.GetFloatOr(a + "rope.scaling.yarn_beta_fast", 32.0));
    QKV_ASSIGN_OR_RETURN(double bs, f.GetFloatOr(a + "rope.scaling.yarn_beta_slow", 1.0));
    c.rope.yarn_beta_fast = static_cast<float>(bf);
    c.rope.yarn_beta_slow = static_cast<float>(bs);
  } else {
    return absl::UnimplementedError(
        absl::StrFormat("%s: %srope.scaling.type '%s' is not supported (none, linear, yarn)",
                        f.name(), a, scaling));
  }
  if (f.FindTensor("rope_freqs.weight") != nullptr) {
    return absl::UnimplementedError(absl::StrFormat(
        "%s: per-frequency RoPE factors (rope_freqs.weight, llama3 scaling) are not supported",
        f.name()));
  }
  // Qwen2 keeps HF's rotate-half layout in GGUF (llama.cpp runs it with NeoX RoPE).
  c.rope_neox = c.architecture.starts_with("qwen");
  c.qk_norm = f.FindTensor("blk.0.attn_q_norm.weight") != nullptr;
  QKV_RETURN_IF_ERROR(MoeConfigFromGguf(f, a, c));
  c.attention_bias = f.FindTensor("blk.0.attn_q.bias") != nullptr;
  c.tied_embeddings = f.FindTensor("output.weight") == nullptr;
  QKV_ASSIGN_OR_RETURN(const GgufTensor* emb, f.GetTensor("token_embd.weight"));
  if (emb->dims.size() != 2 || emb->dims[0] != c.hidden) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: token_embd.weight has %d dims with row %d, expected rows of %sembedding_length %d",
        f.name(), emb->dims.size(), emb->dims[0], a, c.hidden));
  }
  c.vocab_size = emb->dims[1];
  if (f.Has(a + "vocab_size")) {
    QKV_ASSIGN_OR_RETURN(int64_t v, f.GetInt(a + "vocab_size"));
    if (v != c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: %svocab_size %d contradicts token_embd.weight's %d rows", f.name(),
                          a, v, c.vocab_size));
    }
  }
  return c;
}

absl::StatusOr<std::unique_ptr<GgufModel>> GgufModel::Open(const std::string& path,
                                                           MappedFile::Mode mode) {
  QKV_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> file, GgufFile::Open(path, mode));
  return FromFile(std::move(file));
}

absl::StatusOr<std::unique_ptr<GgufModel>> GgufModel::FromFile(std::unique_ptr<GgufFile> file) {
  std::unique_ptr<GgufModel> m(new GgufModel());
  QKV_ASSIGN_OR_RETURN(m->config_, ModelConfigFromGguf(*file));
  for (const GgufTensor& t : file->tensors()) {
    WeightTensor w;
    w.name = t.name;
    w.dims = t.dims;
    w.type = t.type;
    w.data = t.data;
    w.n_bytes = t.n_bytes;
    m->tensors_.emplace(t.name, std::move(w));
  }
  m->file_ = std::move(file);
  return m;
}

const WeightTensor* GgufModel::Find(std::string_view gguf_name) const {
  auto it = tensors_.find(std::string(gguf_name));
  return it == tensors_.end() ? nullptr : &it->second;
}

}  // namespace quantkv
