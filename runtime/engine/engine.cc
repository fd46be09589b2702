#include "runtime/engine/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <random>

#include "absl/strings/str_format.h"
#include "kernels/activation.h"
#include "kernels/attention.h"
#include "kernels/attention_mass.h"
#include "kernels/dequantize.h"
#include "kernels/rmsnorm.h"
#include "runtime/model/rope_scaling.h"
#include "runtime/util/status_macros.h"

namespace quantkv {
namespace {

kernels::RopeSpec RopeSpecFor(const ModelConfig& c) {
  kernels::RopeSpec s;
  s.head_dim = c.head_dim;
  s.theta = c.rope.theta;
  s.factor = c.rope.factor;
  s.original_context = c.rope.original_context;
  s.yarn_beta_fast = c.rope.yarn_beta_fast;
  s.yarn_beta_slow = c.rope.yarn_beta_slow;
  s.yarn_attn_factor = c.rope.yarn_attn_factor;
  s.llama3_low_freq_factor = c.rope.llama3_low_freq_factor;
  s.llama3_high_freq_factor = c.rope.llama3_high_freq_factor;
  s.neox = c.rope_neox;
  switch (c.rope.scaling) {
    case RopeScalingType::kNone:
      s.scaling = kernels::RopeScaling::kNone;
      break;
    case RopeScalingType::kLinear:
      s.scaling = kernels::RopeScaling::kLinear;
      break;
    case RopeScalingType::kYarn:
      s.scaling = kernels::RopeScaling::kYarn;
      break;
    case RopeScalingType::kLlama3:
      s.scaling = kernels::RopeScaling::kLlama3;
      break;
  }
  return s;
}

std::string DimsString(const std::vector<int64_t>& dims) {
  std::string s = "{";
  for (size_t i = 0; i < dims.size(); ++i) s += absl::StrFormat("%s%d", i ? ", " : "", dims[i]);
  return s + "}";
}

// A [rows x cols] matrix tensor (GGUF dims {cols, rows}) checked against the config.
absl::StatusOr<kernels::WeightMatrix> Matrix(const WeightSource& w, const std::string& name,
                                             int64_t rows, int64_t cols) {
  const WeightTensor* t = w.Find(name);
  if (t == nullptr) {
    return absl::NotFoundError(absl::StrFormat("%s: missing tensor '%s'", w.origin(), name));
  }
  if (t->dims.size() != 2 || t->dims[0] != cols || t->dims[1] != rows) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: tensor '%s' has dims %s, the config implies {%d, %d}", w.origin(),
                        name, DimsString(t->dims), cols, rows));
  }
  if (!kernels::GgmlTypeInfoOf(t->type).dequantizable) {
    return absl::UnimplementedError(
        absl::StrFormat("%s: tensor '%s' has type %s, which QuantKV cannot compute with",
                        w.origin(), name, kernels::GgmlTypeInfoOf(t->type).name));
  }
  return kernels::WeightMatrix{t->type, t->data, rows, cols};
}

// A vector tensor dequantized to fp32 (norm weights, biases).
absl::StatusOr<std::vector<float>> Vector(const WeightSource& w, const std::string& name,
                                          int64_t n) {
  const WeightTensor* t = w.Find(name);
  if (t == nullptr) {
    return absl::NotFoundError(absl::StrFormat("%s: missing tensor '%s'", w.origin(), name));
  }
  if (t->dims.size() != 1 || t->dims[0] != n) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: tensor '%s' has dims %s, the config implies {%d}", w.origin(), name,
                        DimsString(t->dims), n));
  }
  std::vector<float> v(static_cast<size_t>(n));
  QKV_RETURN_IF_ERROR(kernels::DequantizeRow(t->type, t->data, v.data(), n));
  return v;
}

std::vector<float> SliceVector(const std::vector<float>& v, ShardRange r) {
  if (v.empty()) return v;
  return std::vector<float>(v.begin() + r.begin, v.begin() + r.end());
}

// Calibrated static scales are [n_kv_heads][head_dim] per layer: keep this rank's heads.
// Lists of another length are left alone for KvCache::Create to reject with its message.
void SliceStaticScales(KvPolicy& policy, int64_t full, ShardRange r) {
  for (auto& [layer, scales] : policy.static_scales) {
    for (StaticScales* kv : {&scales.k, &scales.v}) {
      for (std::vector<float>* list : {&kv->scale, &kv->min}) {
        if (static_cast<int64_t>(list->size()) == full) *list = SliceVector(*list, r);
      }
    }
  }
}

// Per-head codec overrides name global KV heads; a rank's cache numbers its own heads from 0.
void SliceHeadOverrides(KvPolicy& policy, ShardRange r) {
  absl::flat_hash_map<std::pair<int64_t, int64_t>, LayerKvPolicy> local;
  for (const auto& [lh, hp] : policy.heads) {
    if (lh.second >= r.begin && lh.second < r.begin + r.size) {
      local[{lh.first, lh.second - r.begin}] = hp;
    }
  }
  policy.heads = std::move(local);
}

}  // namespace

Engine::~Engine() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(std::unique_ptr<WeightSource> weights,
                                                       const EngineConfig& config) {
  if (!(config.page_fraction > 0.0 && config.page_fraction <= 1.0) || config.page_min_blocks < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("--page-fraction %g must be in (0, 1] and --page-min-blocks %d at least 1",
                        config.page_fraction, config.page_min_blocks));
  }
  if (config.threads < 1 || config.max_chunk_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("engine: threads (%d) and max_chunk_tokens (%d) must be positive",
                        config.threads, config.max_chunk_tokens));
  }
  std::unique_ptr<Engine> e(new Engine());
  e->config_ = config;
  e->weights_ = std::move(weights);
  e->model_config_ = e->weights_->config();
  QKV_RETURN_IF_ERROR(ApplyRopeScaling(config.rope_scaling, &e->model_config_));
  QKV_RETURN_IF_ERROR(e->PlanShard());
  if (config.moe_dispatch != MoeDispatch::kAllReduce) {
    const std::string flag =
        absl::StrFormat("--ep-dispatch %s", MoeDispatchName(config.moe_dispatch));
    if (!e->model_config_.moe.enabled()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: %s is not a mixture-of-experts model", flag, e->weights_->origin()));
    }
    if (config.moe_tensor_parallel && !e->shard_.whole()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s sends tokens to the ranks holding their experts: it needs experts split over the "
          "ranks (--ep N), not inside each expert (--ep 1)",
          flag));
    }
  }
  if (!config.moe_payload.exact()) {
    const std::string flag = "--ep-payload " + config.moe_payload.ToString();
    if (config.moe_dispatch == MoeDispatch::kAllReduce) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s encodes the records of --ep-dispatch all-to-all or combine-only; with "
          "all-reduce there are none (compress that all-reduce with --comm-compress)",
          flag));
    }
    const bool split = config.moe_payload.low.has_value() != config.moe_payload.high.has_value() ||
                       (config.moe_payload.low &&
                        config.moe_payload.low->ToString() != config.moe_payload.high->ToString());
    if (split && config.expert_levels.size() < 2) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s sends the sensitive experts' records at the second precision: the sensitive "
          "experts are those elastic precision holds at its highest level, so it needs "
          "--expert-levels with two or more levels",
          flag));
    }
  }
  if (config.device != "cpu" && config.device != "cuda" && config.device != "auto") {
    return absl::InvalidArgumentError(
        absl::StrFormat("--device '%s' is not one of cpu, cuda, auto", config.device));
  }
  if (!(config.gpu_memory_fraction > 0.0 && config.gpu_memory_fraction <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("--gpu-memory-fraction %g must be in (0, 1]", config.gpu_memory_fraction));
  }
  // Weights go to the CPU kernels unless the forward will run on a device (which loads its
  // own copy); "auto" that falls back to the CPU loads them then.
  const bool maybe_device =
      config.device == "cuda" || (config.device == "auto" && CudaDeviceUsable());
  if (!maybe_device) QKV_RETURN_IF_ERROR(e->LoadWeights());
  const ModelConfig& c = e->model_config_;
  if (c.moe.enabled()) {
    e->router_.n_experts = static_cast<int>(c.moe.n_experts);
    e->router_.top_k = static_cast<int>(config.moe_top_k > 0 ? config.moe_top_k : c.moe.top_k);
    e->router_.weighting = c.moe.weighting;
    absl::Status s = moe::CheckRouterConfig(e->router_);
    if (!s.ok()) return absl::InvalidArgumentError(absl::StrFormat("--moe-top-k: %s", s.message()));
  } else if (config.moe_top_k > 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("--moe-top-k %d: %s is not a mixture-of-experts model", config.moe_top_k,
                        e->weights_->origin()));
  }
  e->rope_ = std::make_unique<kernels::RopeTable>(RopeSpecFor(c));
  std::vector<std::string> specs = {config.kv_spec};
  specs.insert(specs.end(), config.more_kv_specs.begin(), config.more_kv_specs.end());
  // Each rank caches only its own KV heads; codecs are per head, so the policy is the same.
  auto rank_policy = [&](const std::string& spec) -> absl::StatusOr<KvPolicy> {
    QKV_ASSIGN_OR_RETURN(KvPolicy policy, ParseKvPolicy(spec, c.n_layers, c.n_kv_heads));
    if (!e->shard_.whole()) {
      SliceStaticScales(
          policy, c.n_kv_heads * c.head_dim,
          {e->shard_.kv_heads.begin * c.head_dim, e->shard_.kv_heads.size * c.head_dim});
      SliceHeadOverrides(policy, e->shard_.kv_heads);
    }
    return policy;
  };
  auto make_cache = [&](const std::string& spec, const std::string& floor,
                        int64_t max_bytes) -> absl::StatusOr<std::unique_ptr<KvCache>> {
    KvCacheConfig kv;
    kv.n_layers = c.n_layers;
    kv.n_kv_heads = e->shard_.kv_heads.size;
    kv.head_dim = c.head_dim;
    QKV_ASSIGN_OR_RETURN(kv.policy, rank_policy(spec));
    if (!floor.empty()) {
      QKV_ASSIGN_OR_RETURN(kv.floor, rank_policy(floor));
    }
    kv.max_bytes = max_bytes;
    kv.max_step_tokens = config.max_chunk_tokens;
    // Pre-RoPE keys are rotated again for every decoded key row: cache cos/sin per position.
    if (kv.policy.pre_rope_keys) {
      e->rope_->Precompute(std::min<int64_t>(c.context_length, 1 << 17));
    }
    kv.rope = e->rope_.get();
    kv.page_summaries = config.page_fraction < 1.0;
    absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(kv);
    if (!cache.ok()) {
      return absl::Status(cache.status().code(),
                          absl::StrFormat("KV cache '%s': %s", spec, cache.status().message()));
    }
    return cache;
  };
  int64_t kv_bytes = config.kv_max_bytes;
  if (maybe_device && e->CheckDeviceSupports().ok()) {
    // The device pool mirrors cache 0 block for block: size it within the device's memory.
    absl::StatusOr<DeviceInfo> info = OpenCudaDevice();
    if (info.ok()) {
      // An upper bound of the uploaded weights (f32; untied lm_head) and a margin for
      // activations, cuBLAS and the runtime.
      const ModelConfig& m = e->weights_->config();
      const int64_t q_dim = m.n_heads * m.head_dim, kv_dim = m.n_kv_heads * m.head_dim;
      const int64_t params =
          2 * m.vocab_size * m.hidden +
          m.n_layers * (m.hidden * (2 * q_dim + 2 * kv_dim) + 3 * m.hidden * m.intermediate);
      const int64_t weights_estimate = 4 * params + (int64_t{1} << 30);
      kv_bytes = std::min<int64_t>(
          kv_bytes, static_cast<int64_t>(config.gpu_memory_fraction *
                                         static_cast<double>(std::max<int64_t>(
                                             0, info->free_bytes - weights_estimate))));
    }
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    QKV_ASSIGN_OR_RETURN(std::unique_ptr<KvCache> cache,
                         make_cache(specs[i], i == 0 ? config.kv_floor : std::string(),
                                    kv_bytes / static_cast<int64_t>(specs.size())));
    e->kv_.push_back(std::move(cache));
  }
  // Adapters act on whole attention outputs and projections; under tensor parallelism
  // a rank holds only some heads, so they are refused rather than half applied.
  if (!e->shard_.whole() && (config.attn_correction || config.lora || config.attn_observer)) {
    return absl::UnimplementedError(
        "engine: KV corrections, LoRA adapters and attention observers need --tp 1");
  }
  if (config.attn_correction) {
    QKV_RETURN_IF_ERROR(CheckAttnCorrectionFitsModel(*config.attn_correction, c));
  }
  if (config.lora) QKV_RETURN_IF_ERROR(CheckLoraFitsModel(*config.lora, c));
  if (!config.kv_promote.empty()) {
    if (config.kv_promote == "key-norm") {
      e->promote_ = Promote::kKeyNorm;
    } else if (config.kv_promote == "attention") {
      e->promote_ = Promote::kAttention;
    } else if (config.kv_promote == "snapkv") {
      if (config.snapkv_window < 1 || config.snapkv_pool < 1 || config.snapkv_pool % 2 == 0) {
        return absl::InvalidArgumentError(
            absl::StrFormat("--kv-promote snapkv: window %d must be >= 1 and pooling %d odd",
                            config.snapkv_window, config.snapkv_pool));
      }
      e->promote_ = Promote::kSnapKv;
    } else if (config.kv_promote == "router-entropy") {
      if (!c.moe.enabled()) {
        return absl::InvalidArgumentError(
            "--kv-promote router-entropy: the model is not a mixture of experts");
      }
      e->promote_ = Promote::kRouterEntropy;
    } else {
      return absl::InvalidArgumentError(
          absl::StrFormat("--kv-promote '%s' is not one of key-norm, attention, snapkv, "
                          "router-entropy",
                          config.kv_promote));
    }
    bool any = false;
    for (const auto& cache : e->kv_) any = any || cache->promotes();
    if (!any) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "--kv-promote %s needs a KV codec that keeps promoted rows (add :keepN, e.g. "
          "k=int2:chan:keep4)",
          config.kv_promote));
    }
  }
  if (config.attn_observer) {
    // The shadow holds exactly what cache 0 holds, so it gets that cache's budget.
    QKV_ASSIGN_OR_RETURN(e->shadow_kv_,
                         make_cache(config.attn_observer_exact_kv, std::string(),
                                    config.kv_max_bytes / static_cast<int64_t>(specs.size())));
  }
  e->pool_ = std::make_unique<kernels::ThreadPool>(config.threads);
  if (maybe_device) {
    QKV_ASSIGN_OR_RETURN(const bool on_device, e->SetUpDevice());
    if (!on_device) QKV_RETURN_IF_ERROR(e->LoadWeights());
  }
  QKV_RETURN_IF_ERROR(e->SetUpExpertPrecision());
  return e;
}

absl::Status Engine::CheckDeviceSupports() const {
  const EngineConfig& k = config_;
  auto refuse = [](const std::string& what) {
    return absl::UnimplementedError(
        absl::StrFormat("--device cuda does not run %s yet (use --device cpu)", what));
  };
  if (model_config_.moe.enabled()) return refuse("mixture-of-experts models");
  if (!k.more_kv_specs.empty()) return refuse("several KV presets per server");
  if (!k.kv_floor.empty()) return refuse("--kv-floor (elastic re-quantization)");
  if (!k.kv_promote.empty()) return refuse("--kv-promote");
  if (k.page_fraction < 1.0) return refuse("--page-fraction (page selection)");
  if (k.attn_correction) return refuse("attention corrections");
  if (k.lora) return refuse("LoRA adapters");
  if (k.attn_observer || k.kv_observer || k.mlp_observer) {
    return refuse("observers (calibration, sensitivity, moefy)");
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> Engine::SetUpDevice() {
  const bool automatic = config_.device == "auto";
  absl::Status supported = CheckDeviceSupports();
  if (!supported.ok()) {
    if (automatic) return false;
    return supported;
  }
  DeviceForwardConfig dc;
  dc.weights = config_.gpu_weights;
  dc.max_chunk_tokens = config_.max_chunk_tokens;
  absl::StatusOr<std::unique_ptr<DeviceForward>> device =
      CreateCudaForward(*weights_, model_config_, shard_, *rope_, *kv_[0], config_.comm, dc);
  if (!device.ok()) {
    // "auto" runs on the CPU what the device path does not (yet) run; an explicit
    // --device cuda, or a device that fails for another reason, is an error.
    if (automatic && absl::IsUnimplemented(device.status())) return false;
    return device.status();
  }
  device_ = std::move(*device);
  return true;
}

absl::Status Engine::PlanShard() {
  const ModelConfig& c = model_config_;
  const int ranks = config_.comm != nullptr ? config_.comm->size() : 1;
  if (ranks == 1) {
    shard_ = TensorShard{};
    shard_.kv_heads = {0, c.n_kv_heads};
    shard_.heads = {0, c.n_heads};
    shard_.intermediate = {0, c.intermediate};
    return absl::OkStatus();
  }
  ShardShape shape;
  shape.n_heads = c.n_heads;
  shape.n_kv_heads = c.n_kv_heads;
  shape.head_dim = c.head_dim;
  shape.intermediate = c.intermediate;
  // Cuts fall on whole blocks of every layer's row-parallel weights (types may vary by
  // layer, e.g. Q6_K in a few); a missing tensor is LoadWeights' error to report.
  for (int64_t i = 0; i < c.n_layers; ++i) {
    const std::string p = absl::StrFormat("blk.%d.", i);
    if (const WeightTensor* t = weights_->Find(p + "ffn_down.weight")) {
      shape.intermediate_align =
          std::lcm<int64_t>(shape.intermediate_align, kernels::GgmlTypeInfoOf(t->type).block_size);
    }
    if (const WeightTensor* t = weights_->Find(p + "attn_output.weight")) {
      shape.o_align = std::lcm<int64_t>(shape.o_align, kernels::GgmlTypeInfoOf(t->type).block_size);
    }
  }
  absl::StatusOr<TensorShard> shard = PlanTensorShard(shape, config_.comm->rank(), ranks);
  if (!shard.ok()) {
    return absl::Status(shard.status().code(),
                        absl::StrFormat("%s: %s", weights_->origin(), shard.status().message()));
  }
  shard_ = *shard;
  return absl::OkStatus();
}

// Megatron layout: Q/K/V and gate/up are column-parallel (this rank's output rows: a view
// of the mapped file), attn_output and ffn_down row-parallel (this rank's input columns:
// copied, see sliced_). The embedding, norms and lm_head are replicated on every rank.
absl::Status Engine::LoadWeights() {
  const WeightSource& w = *weights_;
  const ModelConfig& c = w.config();
  const int64_t q_dim = c.n_heads * c.head_dim;
  const int64_t kv_dim = c.n_kv_heads * c.head_dim;
  const ShardRange q_rows{shard_.heads.begin * c.head_dim, shard_.heads.size * c.head_dim};
  const ShardRange kv_rows{shard_.kv_heads.begin * c.head_dim, shard_.kv_heads.size * c.head_dim};
  const ShardRange ff = shard_.intermediate;
  auto rows = [&](const std::string& name, int64_t n_rows, int64_t cols,
                  ShardRange r) -> absl::StatusOr<kernels::WeightMatrix> {
    QKV_ASSIGN_OR_RETURN(kernels::WeightMatrix m, Matrix(w, name, n_rows, cols));
    return kernels::SliceRows(m, r.begin, r.size);
  };
  auto columns = [&](const std::string& name, int64_t n_rows, int64_t cols,
                     ShardRange r) -> absl::StatusOr<kernels::WeightMatrix> {
    QKV_ASSIGN_OR_RETURN(kernels::WeightMatrix m, Matrix(w, name, n_rows, cols));
    if (r.begin == 0 && r.size == cols) return m;
    sliced_.emplace_back();  // moving the outer vector keeps the inner buffers in place
    return kernels::SliceColumns(m, r.begin, r.size, &sliced_.back());
  };
  QKV_ASSIGN_OR_RETURN(embedding_, Matrix(w, "token_embd.weight", c.vocab_size, c.hidden));
  if (w.Find("output.weight") != nullptr) {
    QKV_ASSIGN_OR_RETURN(lm_head_, Matrix(w, "output.weight", c.vocab_size, c.hidden));
  } else {
    lm_head_ = embedding_;  // tied embeddings
  }
  QKV_ASSIGN_OR_RETURN(output_norm_, Vector(w, "output_norm.weight", c.hidden));
  layers_.resize(c.n_layers);
  for (int64_t i = 0; i < c.n_layers; ++i) {
    Layer& l = layers_[i];
    const std::string p = absl::StrFormat("blk.%d.", i);
    QKV_ASSIGN_OR_RETURN(l.q, rows(p + "attn_q.weight", q_dim, c.hidden, q_rows));
    QKV_ASSIGN_OR_RETURN(l.k, rows(p + "attn_k.weight", kv_dim, c.hidden, kv_rows));
    QKV_ASSIGN_OR_RETURN(l.v, rows(p + "attn_v.weight", kv_dim, c.hidden, kv_rows));
    QKV_ASSIGN_OR_RETURN(l.o, columns(p + "attn_output.weight", c.hidden, q_dim, q_rows));
    if (c.moe.enabled()) {
      QKV_RETURN_IF_ERROR(LoadMoeLayer(i, l));
    } else {
      QKV_ASSIGN_OR_RETURN(l.gate, rows(p + "ffn_gate.weight", c.intermediate, c.hidden, ff));
      QKV_ASSIGN_OR_RETURN(l.up, rows(p + "ffn_up.weight", c.intermediate, c.hidden, ff));
      QKV_ASSIGN_OR_RETURN(l.down, columns(p + "ffn_down.weight", c.hidden, c.intermediate, ff));
    }
    QKV_ASSIGN_OR_RETURN(l.attn_norm, Vector(w, p + "attn_norm.weight", c.hidden));
    QKV_ASSIGN_OR_RETURN(l.ffn_norm, Vector(w, p + "ffn_norm.weight", c.hidden));
    if (c.qk_norm) {
      QKV_ASSIGN_OR_RETURN(l.q_norm, Vector(w, p + "attn_q_norm.weight", c.head_dim));
      QKV_ASSIGN_OR_RETURN(l.k_norm, Vector(w, p + "attn_k_norm.weight", c.head_dim));
    }
    if (c.attention_bias) {
      QKV_ASSIGN_OR_RETURN(l.q_bias, Vector(w, p + "attn_q.bias", q_dim));
      QKV_ASSIGN_OR_RETURN(l.k_bias, Vector(w, p + "attn_k.bias", kv_dim));
      QKV_ASSIGN_OR_RETURN(l.v_bias, Vector(w, p + "attn_v.bias", kv_dim));
      l.q_bias = SliceVector(l.q_bias, q_rows);
      l.k_bias = SliceVector(l.k_bias, kv_rows);
      l.v_bias = SliceVector(l.v_bias, kv_rows);
    }
    // LLaMA checkpoints with attention_bias also carry an output-projection bias (Qwen2
    // does not): use it when present rather than silently dropping it. Replicated: it is
    // added once, after the partial outputs are summed.
    if (w.Find(p + "attn_output.bias") != nullptr) {
      QKV_ASSIGN_OR_RETURN(l.o_bias, Vector(w, p + "attn_output.bias", c.hidden));
    }
  }
  if (config_.pack_weights) return PackWeights();
  return absl::OkStatus();
}

// An MoE layer: the router, every expert (merged 3-D tensors "ffn_gate_exps" as llama.cpp
// writes them, or one tensor per expert "ffn_gate.E"), and the shared expert. Under tensor
// parallelism the experts are split over the ranks instead (expert parallelism: rank r
// computes experts e with e % N == r; the shared expert split by neuron), with every rank
// holding all tokens' activations, so dispatch needs no communication and the combine is the
// sum the dense layer's down projection already ends with; or, with the all-to-all or
// combine-only dispatch (moe_dispatch.h), tokens go to their experts' ranks and back, and
// every rank holds the shared expert whole.
absl::Status Engine::LoadMoeLayer(int64_t layer, Layer& l) {
  const WeightSource& w = *weights_;
  const ModelConfig& c = w.config();
  const MoeConfig& m = c.moe;
  const std::string p = absl::StrFormat("blk.%d.", layer);
  MoeFfnWeights& f = l.moe;
  QKV_ASSIGN_OR_RETURN(f.router, Matrix(w, p + "ffn_gate_inp.weight", m.n_experts, c.hidden));
  if (w.Find(p + "ffn_gate_inp.bias") != nullptr) {
    QKV_ASSIGN_OR_RETURN(f.router_bias, Vector(w, p + "ffn_gate_inp.bias", m.n_experts));
  }
  f.experts.resize(m.n_experts);
  struct Part {
    const char* name;
    int64_t rows, cols;
    kernels::WeightMatrix ExpertMatrices::*field;
  };
  const Part parts[] = {{"ffn_gate", m.expert_intermediate, c.hidden, &ExpertMatrices::gate},
                        {"ffn_up", m.expert_intermediate, c.hidden, &ExpertMatrices::up},
                        {"ffn_down", c.hidden, m.expert_intermediate, &ExpertMatrices::down}};
  for (const Part& part : parts) {
    const std::string merged = p + part.name + "_exps.weight";
    if (const WeightTensor* t = w.Find(merged)) {
      if (t->dims.size() != 3 || t->dims[0] != part.cols || t->dims[1] != part.rows ||
          t->dims[2] != m.n_experts) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s: tensor '%s' has dims %s, the config implies {%d, %d, %d}", w.origin(), merged,
            DimsString(t->dims), part.cols, part.rows, m.n_experts));
      }
      if (!kernels::GgmlTypeInfoOf(t->type).dequantizable) {
        return absl::UnimplementedError(
            absl::StrFormat("%s: tensor '%s' has type %s, which QuantKV cannot compute with",
                            w.origin(), merged, kernels::GgmlTypeInfoOf(t->type).name));
      }
      const int64_t expert_bytes = part.rows * *kernels::GgmlRowBytes(t->type, part.cols);
      for (int64_t e = 0; e < m.n_experts; ++e) {
        f.experts[e].*part.field =
            kernels::WeightMatrix{t->type, t->data + e * expert_bytes, part.rows, part.cols};
      }
      continue;
    }
    for (int64_t e = 0; e < m.n_experts; ++e) {
      QKV_ASSIGN_OR_RETURN(
          f.experts[e].*part.field,
          Matrix(w, absl::StrFormat("%s%s.%d.weight", p, part.name, e), part.rows, part.cols));
    }
  }
  if (m.shared_intermediate > 0) {
    const int64_t S = m.shared_intermediate;
    QKV_ASSIGN_OR_RETURN(f.shared.gate, Matrix(w, p + "ffn_gate_shexp.weight", S, c.hidden));
    QKV_ASSIGN_OR_RETURN(f.shared.up, Matrix(w, p + "ffn_up_shexp.weight", S, c.hidden));
    QKV_ASSIGN_OR_RETURN(f.shared.down, Matrix(w, p + "ffn_down_shexp.weight", c.hidden, S));
    // GGUF stores the gate as {hidden}, HF as [1, hidden] ({hidden, 1} here).
    if (const WeightTensor* g = w.Find(p + "ffn_gate_inp_shexp.weight")) {
      if (g->n_elements() != c.hidden || g->dims[0] != c.hidden) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s: tensor '%sffn_gate_inp_shexp.weight' has dims %s, the config implies {%d}",
            w.origin(), p, DimsString(g->dims), c.hidden));
      }
      f.shared_gate.resize(static_cast<size_t>(c.hidden));
      QKV_RETURN_IF_ERROR(kernels::DequantizeRow(g->type, g->data, f.shared_gate.data(), c.hidden));
    }
  }
  if (shard_.whole()) return absl::OkStatus();
  // Tensor parallelism inside an expert: this rank's share of its intermediate neurons (whole
  // blocks of the down projection's type; a rank may get none of a small expert).
  const int ranks = config_.comm->size(), rank = config_.comm->rank();
  auto split = [&](ExpertMatrices& e) -> absl::Status {
    const int64_t I = e.gate.rows;
    const int64_t align = kernels::GgmlTypeInfoOf(e.down.type).block_size;
    const int64_t blocks = I / align;
    const int64_t b0 = blocks * rank / ranks, b1 = blocks * (rank + 1) / ranks;
    if (b1 == b0) {
      e = ExpertMatrices{};
      return absl::OkStatus();
    }
    QKV_ASSIGN_OR_RETURN(e.gate, kernels::SliceRows(e.gate, b0 * align, (b1 - b0) * align));
    QKV_ASSIGN_OR_RETURN(e.up, kernels::SliceRows(e.up, b0 * align, (b1 - b0) * align));
    sliced_.emplace_back();
    QKV_ASSIGN_OR_RETURN(
        e.down, kernels::SliceColumns(e.down, b0 * align, (b1 - b0) * align, &sliced_.back()));
    return absl::OkStatus();
  };
  // The shared expert runs for every token: split it, so no rank carries it alone; except
  // under the all-to-all dispatches, where each rank runs it whole on its share of the rows
  // (the layer's output is all-gathered, not summed).
  if (f.shared.present() && config_.moe_dispatch == MoeDispatch::kAllReduce) {
    QKV_RETURN_IF_ERROR(split(f.shared));
  }
  if (config_.moe_tensor_parallel) {
    for (ExpertMatrices& e : f.experts) QKV_RETURN_IF_ERROR(split(e));
  } else {
    // Expert parallelism: rank r computes experts e with e % N == r, in full.
    f.owned.assign(static_cast<size_t>(m.n_experts), 0);
    for (int64_t e = 0; e < m.n_experts; ++e) f.owned[e] = ExpertOwner(e, ranks) == rank;
  }
  return absl::OkStatus();
}

absl::Status Engine::SetUpExpertPrecision() {
  const ModelConfig& c = model_config_;
  if (config_.expert_levels.empty()) {
    if (!config_.expert_fixed_levels.empty() || config_.expert_budget_bytes > 0) {
      return absl::InvalidArgumentError(
          "engine: an expert budget or fixed expert levels need expert precision levels");
    }
    return absl::OkStatus();
  }
  if (!c.moe.enabled()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--expert-levels: %s is not a mixture-of-experts model", weights_->origin()));
  }
  std::vector<std::vector<ExpertMatrices>> source;
  for (const Layer& l : layers_) source.push_back(l.moe.experts);
  ExpertStoreConfig sc;
  sc.levels = config_.expert_levels;
  sc.pack = config_.pack_weights;
  sc.activations = config_.decode_activations;
  QKV_ASSIGN_OR_RETURN(expert_store_, ExpertStore::Build(source, sc, pool_.get()));
  const int64_t E = c.moe.n_experts;
  expert_levels_.assign(static_cast<size_t>(c.n_layers * E), 0);
  if (!config_.expert_fixed_levels.empty()) {
    if (static_cast<int64_t>(config_.expert_fixed_levels.size()) != c.n_layers * E) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "engine: expert_fixed_levels has %d entries, the model has %d layers x %d experts",
          config_.expert_fixed_levels.size(), c.n_layers, E));
    }
    for (int64_t i = 0; i < c.n_layers * E; ++i) {
      QKV_RETURN_IF_ERROR(SetExpertLevel(i / E, i % E, config_.expert_fixed_levels[i]));
    }
    return absl::OkStatus();
  }
  moe::ExpertPrecisionConfig pc;
  pc.n_layers = static_cast<int>(c.n_layers);
  pc.n_experts = static_cast<int>(E);
  pc.level_bytes = expert_store_->LevelBytes();
  int64_t lowest = 0;
  for (const auto& b : pc.level_bytes) lowest += b[0];
  pc.budget_bytes = config_.expert_budget_bytes > 0 ? config_.expert_budget_bytes : lowest;
  pc.half_life_tokens = config_.expert_half_life_tokens;
  pc.decide_every_tokens = config_.expert_decide_every_tokens;
  pc.hysteresis = config_.expert_hysteresis;
  pc.min_dwell_decisions = config_.expert_min_dwell;
  absl::StatusOr<moe::ExpertPrecisionPolicy> policy = moe::ExpertPrecisionPolicy::Create(pc);
  if (!policy.ok()) {
    return absl::Status(policy.status().code(),
                        absl::StrFormat("--expert-budget: %s", policy.status().message()));
  }
  expert_policy_ = std::make_unique<moe::ExpertPrecisionPolicy>(std::move(*policy));
  if (config_.expert_weight_error_sensitivity && expert_store_->n_levels() > 1) {
    std::vector<double> err(static_cast<size_t>(c.n_layers * E));
    double mean = 0;
    for (int64_t i = 0; i < c.n_layers * E; ++i) {
      err[i] = expert_store_->RelativeError(i / E, i % E, 0, expert_store_->n_levels() - 1);
      mean += err[i] / static_cast<double>(err.size());
    }
    for (int64_t i = 0; i < c.n_layers * E && mean > 0; ++i) {
      QKV_RETURN_IF_ERROR(expert_policy_->SetSensitivity(static_cast<int>(i / E),
                                                         static_cast<int>(i % E), err[i] / mean));
    }
  }
  for (int64_t i = 0; i < c.n_layers * E; ++i) QKV_RETURN_IF_ERROR(SetExpertLevel(i / E, i % E, 0));
  return absl::OkStatus();
}

absl::Status Engine::SetExpertLevel(int64_t layer, int64_t expert, int level) {
  if (level < 0 || level >= expert_store_->n_levels()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("engine: expert level %d of layer %d expert %d is not in [0, %d)", level,
                        layer, expert, expert_store_->n_levels()));
  }
  layers_[layer].moe.experts[expert] = expert_store_->At(layer, expert, level);
  expert_levels_[layer * model_config_.moe.n_experts + expert] = level;
  return absl::OkStatus();
}

int Engine::expert_level(int64_t layer, int64_t expert) const {
  if (expert_levels_.empty()) return -1;
  return expert_levels_[layer * model_config_.moe.n_experts + expert];
}

int64_t Engine::active_expert_bytes() const {
  int64_t total = 0;
  const auto bytes = kernels::WeightBytes;
  for (const Layer& l : layers_) {
    for (const ExpertMatrices& m : l.moe.experts) {
      total += bytes(m.gate) + bytes(m.up) + bytes(m.down);
    }
  }
  return total;
}

absl::Status Engine::PackWeights() {
  auto pack = [&](kernels::WeightMatrix& m, kernels::ActivationPrecision act) -> absl::Status {
    if (!kernels::CanPackWeights(m.type, act)) return absl::OkStatus();
    QKV_ASSIGN_OR_RETURN(std::unique_ptr<kernels::PackedWeights> packed,
                         kernels::PackWeights(m, act));
    m.packed = packed.get();
    packed_.push_back(std::move(packed));
    return absl::OkStatus();
  };
  for (Layer& l : layers_) {
    for (kernels::WeightMatrix* m : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down}) {
      QKV_RETURN_IF_ERROR(pack(*m, config_.decode_activations));
    }
    std::vector<ExpertMatrices*> experts;
    // Elastic precision computes the expert store's copies (packed there), not these.
    if (config_.expert_levels.empty()) {
      for (ExpertMatrices& m : l.moe.experts) experts.push_back(&m);
    }
    if (l.moe.shared.present()) experts.push_back(&l.moe.shared);
    for (ExpertMatrices* m : experts) {
      for (kernels::WeightMatrix* w : {&m->gate, &m->up, &m->down}) {
        QKV_RETURN_IF_ERROR(pack(*w, config_.decode_activations));
      }
    }
  }
  // lm_head_ is its own view even when tied to the embedding, which keeps reading the file.
  return pack(lm_head_, config_.lm_head_activations);
}

absl::Status Engine::ReduceSum(std::vector<float>& x, int64_t n, int64_t layer) {
  if (shard_.whole()) return absl::OkStatus();
  const auto start = std::chrono::steady_clock::now();
  // The layer lets a compressing group (--comm-compress) keep chosen layers exact.
  absl::Status s = config_.comm->AllReduceSumForLayer(x.data(), n, layer);
  const int64_t ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
          .count();
  last_step_.comm_ns += ns;
  comm_ns_total_ += ns;
  return s;
}

absl::Status Engine::GatherKvHeads(const float* mine, int64_t n, std::vector<float>* out) {
  const int64_t d = model_config_.head_dim, H = model_config_.n_kv_heads;
  const int ranks = shard_.ranks;
  // Uneven splits: every rank sends as many heads as the largest share (the first).
  const int64_t most = SplitEvenly(H, 0, ranks).size;
  std::vector<float> send(static_cast<size_t>(n * most * d), 0.0f);
  const int64_t own = shard_.kv_heads.size;
  for (int64_t t = 0; t < n; ++t) {
    std::copy_n(mine + t * own * d, own * d, send.data() + t * most * d);
  }
  std::vector<float>& all = buffers_.gather;
  all.resize(send.size() * ranks);
  QKV_RETURN_IF_ERROR(config_.comm->AllGather(
      send.data(), static_cast<int64_t>(send.size() * sizeof(float)), all.data()));
  out->resize(static_cast<size_t>(n * H * d));
  for (int r = 0; r < ranks; ++r) {
    const ShardRange heads = SplitEvenly(H, r, ranks);
    const float* src = all.data() + r * send.size();
    for (int64_t t = 0; t < n; ++t) {
      std::copy_n(src + t * most * d, heads.size * d, out->data() + (t * H + heads.begin) * d);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<SequenceId> Engine::NewSequenceIn(int kv_cache) {
  if (kv_cache < 0 || kv_cache >= kv_cache_count()) {
    return absl::OutOfRangeError(
        absl::StrFormat("engine: no KV cache %d (the engine has %d)", kv_cache, kv_cache_count()));
  }
  const SequenceId id = next_seq_++;
  Sequence seq;
  seq.cache = kv_cache;
  if (promote_ == Promote::kSnapKv && kv_[kv_cache]->promotes()) {
    kv_[kv_cache]->RetainRows(seq.kv, true);
    seq.snap_pending = true;
    seq.snap_q.resize(static_cast<size_t>(model_config_.n_layers));
  }
  sequences_.emplace(id, std::move(seq));
  return id;
}

absl::StatusOr<int> Engine::SequenceCache(SequenceId seq) const {
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrFormat("engine: unknown sequence %d", seq));
  }
  return it->second.cache;
}

absl::Status Engine::Release(SequenceId seq) {
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrFormat("engine: unknown sequence %d", seq));
  }
  kv_[it->second.cache]->Free(it->second.kv);
  if (shadow_kv_) shadow_kv_->Free(it->second.shadow);
  if (device_) device_->Release(seq);
  sequences_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Engine::RequantizeOldest(SequenceId seq, int64_t pairs) {
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrFormat("engine: unknown sequence %d", seq));
  }
  return kv_[it->second.cache]->Requantize(it->second.kv, pairs);
}

absl::Status Engine::FillSyntheticKv(SequenceId seq, int64_t n_tokens, uint32_t seed) {
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrFormat("engine: unknown sequence %d", seq));
  }
  if (promote_ != Promote::kNone || shadow_kv_ || device_) {
    return absl::UnimplementedError(
        "engine: synthetic KV with promoted tokens, an exact shadow cache or on a device");
  }
  Sequence& s = it->second;
  KvCache& cache = *kv_[s.cache];
  QKV_RETURN_IF_ERROR(cache.Reserve(s.kv, s.kv.length + n_tokens));
  const int64_t row = shard_.kv_heads.size * model_config_.head_dim;
  const int64_t step = config_.max_chunk_tokens;  // Write's ring holds one step's tokens
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> k(static_cast<size_t>(step * row)), v(k.size());
  for (int64_t pos = s.kv.length; pos < s.kv.length + n_tokens; pos += step) {
    const int64_t n = std::min(step, s.kv.length + n_tokens - pos);
    for (int64_t l = 0; l < model_config_.n_layers; ++l) {
      for (int64_t i = 0; i < n * row; ++i) {
        k[i] = nd(rng);
        v[i] = nd(rng);
      }
      cache.Write(s.kv, l, pos, n, k.data(), v.data());
    }
  }
  s.kv.length += n_tokens;
  return absl::OkStatus();
}

absl::StatusOr<double> Engine::SequenceKvBits(SequenceId seq) const {
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrFormat("engine: unknown sequence %d", seq));
  }
  return kv_[it->second.cache]->SequenceBitsPerElement(it->second.kv);
}

absl::StatusOr<int64_t> Engine::SequenceLength(SequenceId seq) const {
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrFormat("engine: unknown sequence %d", seq));
  }
  return it->second.kv.length;
}

void Engine::Embed(std::span<const int32_t> tokens, float* out) const {
  const int64_t hidden = embedding_.cols;
  const int64_t row_bytes = *kernels::GgmlRowBytes(embedding_.type, hidden);
  for (size_t i = 0; i < tokens.size(); ++i) {
    (void)kernels::DequantizeRow(embedding_.type, embedding_.data + tokens[i] * row_bytes,
                                 out + i * hidden, hidden);
  }
}

int64_t Engine::WeightBytesPerToken() const {
  if (device_) return device_->weight_bytes();  // as uploaded (bf16 or f32)
  const auto bytes = kernels::WeightBytes;
  int64_t total = bytes(lm_head_) + *kernels::GgmlRowBytes(embedding_.type, embedding_.cols);
  auto mlp = [&](const ExpertMatrices& m) {
    return m.present() ? bytes(m.gate) + bytes(m.up) + bytes(m.down) : 0;
  };
  for (const Layer& l : layers_) {
    total += bytes(l.q) + bytes(l.k) + bytes(l.v) + bytes(l.o);
    if (l.moe.experts.empty()) {
      total += bytes(l.gate) + bytes(l.up) + bytes(l.down);
      continue;
    }
    // A token reads the router, the shared expert and top_k experts (their mean size).
    int64_t experts = 0;
    for (const ExpertMatrices& m : l.moe.experts) experts += mlp(m);
    total += bytes(l.moe.router) + mlp(l.moe.shared) +
             experts * router_.top_k / static_cast<int64_t>(l.moe.experts.size());
  }
  return total;
}

absl::StatusOr<int64_t> Engine::CheckStep(std::span<const StepInput> inputs) const {
  const ModelConfig& c = model_config_;
  int64_t total = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const StepInput& in = inputs[i];
    for (size_t j = 0; j < i; ++j) {
      if (inputs[j].seq == in.seq) {
        return absl::InvalidArgumentError(
            absl::StrFormat("engine: sequence %d appears twice in one step", in.seq));
      }
    }
    if (!sequences_.contains(in.seq)) {
      return absl::NotFoundError(absl::StrFormat("engine: unknown sequence %d", in.seq));
    }
    if (in.tokens.empty() || static_cast<int64_t>(in.tokens.size()) > config_.max_chunk_tokens) {
      return absl::InvalidArgumentError(
          absl::StrFormat("engine: a step input has %d tokens (1..%d allowed)", in.tokens.size(),
                          config_.max_chunk_tokens));
    }
    for (int32_t t : in.tokens) {
      if (t < 0 || t >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrFormat("engine: token id %d outside the vocabulary [0, %d)", t, c.vocab_size));
      }
    }
    const int64_t end = sequences_.at(in.seq).kv.length + static_cast<int64_t>(in.tokens.size());
    if (end > c.context_length * 16) {  // far past any trained/scaled window: refuse
      return absl::OutOfRangeError(absl::StrFormat(
          "engine: sequence %d would reach %d tokens, beyond 16x the context length %d", in.seq,
          end, c.context_length));
    }
    total += static_cast<int64_t>(in.tokens.size());
  }
  return total;
}

absl::Status Engine::Step(std::span<const StepInput> inputs, std::vector<float>* logits) {
  const auto start = std::chrono::steady_clock::now();
  last_step_.comm_ns = 0;
  last_step_.moe_bytes_sent = 0;
  const ModelConfig& c = model_config_;
  // Validate everything before touching any sequence.
  QKV_ASSIGN_OR_RETURN(const int64_t total, CheckStep(inputs));
  // SnapKV: a one-token step after a prompt ends it (the first decode step).
  for (const StepInput& in : inputs) {
    Sequence& s = sequences_[in.seq];
    if (s.snap_pending && in.tokens.size() == 1 && s.kv.length > 0) {
      QKV_RETURN_IF_ERROR(SnapPromote(s));
    }
  }
  // Reserve cache blocks for all inputs (and their shadows); undo on failure so nothing
  // changes.
  struct Reserved {
    KvCache* cache;
    SequenceKv* kv;
    size_t had_blocks;
  };
  std::vector<Reserved> reserved;
  for (const StepInput& in : inputs) {
    Sequence& si = sequences_[in.seq];
    const int64_t end = si.kv.length + static_cast<int64_t>(in.tokens.size());
    std::pair<KvCache*, SequenceKv*> targets[2] = {{kv_[si.cache].get(), &si.kv},
                                                   {shadow_kv_.get(), &si.shadow}};
    for (auto [cache, kv] : targets) {
      if (cache == nullptr) continue;
      reserved.push_back({cache, kv, kv->blocks.size()});
      absl::Status s = cache->Reserve(*kv, end);
      if (!s.ok()) {
        for (Reserved& r : reserved) {
          for (size_t b = r.had_blocks; b < r.kv->blocks.size(); ++b) {
            (void)r.cache->allocator().Release(r.kv->blocks[b]);
          }
          r.kv->blocks.resize(r.had_blocks);
        }
        return s;
      }
    }
  }

  if (device_) {
    std::vector<DeviceStepInput> device_inputs;
    device_inputs.reserve(inputs.size());
    for (const StepInput& in : inputs) {
      device_inputs.push_back({in.seq, &sequences_[in.seq].kv, in.tokens, in.all_logits});
    }
    int64_t comm_ns = 0;
    QKV_RETURN_IF_ERROR(device_->Step(device_inputs, logits, &comm_ns));
    for (const StepInput& in : inputs) {
      sequences_[in.seq].kv.length += static_cast<int64_t>(in.tokens.size());
    }
    last_step_.comm_ns = comm_ns;
    comm_ns_total_ += comm_ns;
    last_step_.tokens = total;
    last_step_.forward_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                std::chrono::steady_clock::now() - start)
                                .count();
    return absl::OkStatus();
  }
  // This rank's dimensions: all of them without tensor parallelism.
  const int64_t H = c.hidden;
  const int64_t n_heads = shard_.heads.size;
  const int64_t n_kv_heads = shard_.kv_heads.size;
  const int64_t q_dim = n_heads * c.head_dim;
  const int64_t kv_dim = n_kv_heads * c.head_dim;
  const int64_t I = shard_.intermediate.size;
  std::vector<int32_t> tokens, positions;
  tokens.reserve(total);
  positions.reserve(total);
  for (const StepInput& in : inputs) {
    const int64_t base = sequences_[in.seq].kv.length;
    for (size_t i = 0; i < in.tokens.size(); ++i) {
      tokens.push_back(in.tokens[i]);
      positions.push_back(static_cast<int32_t>(base + i));
    }
  }
  // Activation buffers live across steps: a prefill step's are megabytes, and fresh ones
  // cost page faults and zeroing on every step. Every element is written before it is read.
  StepBuffers& buf = buffers_;
  buf.h.resize(total * H);
  buf.xn.resize(total * H);
  buf.q.resize(total * q_dim);
  buf.k.resize(total * kv_dim);
  buf.v.resize(total * kv_dim);
  buf.attn.resize(total * q_dim);
  buf.proj.resize(total * H);
  buf.gate.resize(total * I);
  buf.up.resize(total * I);
  std::vector<float>& h = buf.h;
  std::vector<float>& xn = buf.xn;
  std::vector<float>& q = buf.q;
  std::vector<float>& k = buf.k;
  std::vector<float>& v = buf.v;
  std::vector<float>& attn = buf.attn;
  std::vector<float>& proj = buf.proj;
  std::vector<float>& gate = buf.gate;
  std::vector<float>& up = buf.up;
  Embed(tokens, h.data());

  kernels::MatMulOptions mm;
  mm.activations = config_.decode_activations;
  mm.gemm_min_rows = config_.gemm_min_rows;
  kernels::ThreadPool* pool = pool_.get();
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  auto add_bias = [total](std::vector<float>& x, const std::vector<float>& b) {
    if (b.empty()) return;
    const int64_t n = static_cast<int64_t>(b.size());
    for (int64_t r = 0; r < total; ++r) {
      for (int64_t i = 0; i < n; ++i) x[r * n + i] += b[i];
    }
  };

  // Which inputs attend in parallel with each other (see the layer loop).
  constexpr int64_t kFewRows = 4;
  std::vector<int64_t> input_rows(inputs.size());
  std::vector<size_t> few_row_inputs, many_row_inputs;
  for (size_t i = 0; i < inputs.size(); ++i) {
    (static_cast<int64_t>(inputs[i].tokens.size()) <= kFewRows ? few_row_inputs : many_row_inputs)
        .push_back(i);
  }
  // kv_promote "attention": per input whose cache keeps rows, the attention mass this step's
  // queries give the tokens of its sequence not yet in a full block ([layer][span]), and
  // the rows' log-sum-exp the mass is normalised by.
  const bool attention_mass = promote_ == Promote::kAttention || promote_ == Promote::kSnapKv;
  if (attention_mass) {
    buf.mass.resize(inputs.size());
    buf.lse.resize(inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i) {
      const Sequence& s = sequences_.at(inputs[i].seq);
      const int64_t n = static_cast<int64_t>(inputs[i].tokens.size());
      const bool keeps = kv_[s.cache]->promotes();
      buf.mass[i].assign(keeps ? c.n_layers * (s.kv.length + n - s.promote_base) : 0, 0.0f);
      buf.lse[i].resize(keeps ? n * n_heads : 0);
    }
  }
  for (int64_t li = 0; li < c.n_layers; ++li) {
    const Layer& l = layers_[li];
    kernels::RmsNorm(h.data(), l.attn_norm.data(), xn.data(), total, H, c.rms_eps);
    QKV_RETURN_IF_ERROR(kernels::MatMul(l.q, xn.data(), total, q.data(), pool, mm));
    QKV_RETURN_IF_ERROR(kernels::MatMul(l.k, xn.data(), total, k.data(), pool, mm));
    QKV_RETURN_IF_ERROR(kernels::MatMul(l.v, xn.data(), total, v.data(), pool, mm));
    if (config_.lora) {
      const LoraAdapters::Layer& lora = config_.lora->layers[li];
      std::vector<float>& scratch = buf.adapter_scratch;
      QKV_RETURN_IF_ERROR(AddLowRank(lora.q, xn.data(), total, q.data(), pool, scratch, mm));
      QKV_RETURN_IF_ERROR(AddLowRank(lora.k, xn.data(), total, k.data(), pool, scratch, mm));
      QKV_RETURN_IF_ERROR(AddLowRank(lora.v, xn.data(), total, v.data(), pool, scratch, mm));
    }
    add_bias(q, l.q_bias);
    add_bias(k, l.k_bias);
    add_bias(v, l.v_bias);
    if (!l.q_norm.empty()) {  // Qwen3: per-head RMSNorm of q and k, before RoPE
      kernels::RmsNorm(q.data(), l.q_norm.data(), q.data(), total * n_heads, c.head_dim, c.rms_eps);
      kernels::RmsNorm(k.data(), l.k_norm.data(), k.data(), total * n_kv_heads, c.head_dim,
                       c.rms_eps);
    }
    rope_->Apply(q.data(), total, n_heads, positions.data());
    rope_->Apply(k.data(), total, n_kv_heads, positions.data());
    if (promote_ == Promote::kSnapKv) KeepSnapQueries(inputs, li, q, positions, q_dim);
    if (promote_ == Promote::kKeyNorm) {
      buf.promote.resize(static_cast<size_t>(c.n_layers * total));
      for (int64_t r = 0; r < total; ++r) {
        double s = 0;
        for (int64_t j = 0; j < kv_dim; ++j)
          s += static_cast<double>(k[r * kv_dim + j]) * k[r * kv_dim + j];
        buf.promote[li * total + r] = static_cast<float>(std::sqrt(s));
      }
    }
    if (config_.kv_observer && config_.kv_observer_all_heads && !shard_.whole()) {
      QKV_RETURN_IF_ERROR(GatherKvHeads(k.data(), total, &buf.all_k));
      QKV_RETURN_IF_ERROR(GatherKvHeads(v.data(), total, &buf.all_v));
      config_.kv_observer(li, total, positions.data(), buf.all_k.data(), buf.all_v.data());
    } else if (config_.kv_observer) {
      config_.kv_observer(li, total, positions.data(), k.data(), v.data());
    }
    // Write every input's K/V first, then attend: sequences are independent, so inputs of
    // few rows (decodes) attend in parallel with each other, one pool task per sequence,
    // instead of one fork/join per sequence. split_threads keeps their sequence splits
    // those of a call on the whole pool, so a row's result does not depend on the batch.
    int64_t row = 0;
    for (size_t i = 0; i < inputs.size(); ++i) {
      Sequence& seq = sequences_[inputs[i].seq];
      const int64_t n = static_cast<int64_t>(inputs[i].tokens.size());
      kv_[seq.cache]->Write(seq.kv, li, seq.kv.length, n, k.data() + row * kv_dim,
                            v.data() + row * kv_dim);
      if (shadow_kv_) {
        shadow_kv_->Write(seq.shadow, li, seq.kv.length, n, k.data() + row * kv_dim,
                          v.data() + row * kv_dim);
      }
      input_rows[i] = row;
      row += n;
    }
    auto attend = [&](size_t i, kernels::ThreadPool* attention_pool) {
      const Sequence& seq = sequences_.at(inputs[i].seq);
      const int64_t n = static_cast<int64_t>(inputs[i].tokens.size());
      kernels::AttentionQuery aq;
      aq.q = q.data() + input_rows[i] * q_dim;
      aq.n_q = n;
      aq.n_heads = n_heads;
      aq.positions = positions.data() + input_rows[i];
      aq.scale = scale * kv_[seq.cache]->policy().ScoreScale(li);  // temp= of the KV policy
      aq.fused_decode = config_.fused_decode_attention;
      aq.split_threads = pool->size();
      // A SnapKV prompt attends exactly, as SnapKV's prefill does; it is compressed at its end.
      kernels::KvLayerView view = seq.snap_pending
                                      ? kv_[seq.cache]->RetainedView(seq.kv, li, seq.kv.length + n)
                                      : kv_[seq.cache]->View(seq.kv, li, seq.kv.length + n);
      std::vector<uint8_t> skip;  // page selection for decode inputs
      if (config_.page_fraction < 1.0 && n <= kFewRows &&
          kv_[seq.cache]->SelectPages(seq.kv, li, seq.kv.length + n, aq.q, n, n_heads,
                                      config_.page_fraction, config_.page_min_blocks, &skip)) {
        view.skip_blocks = skip.data();
      }
      const bool mass = attention_mass && !buffers_.lse[i].empty();
      if (mass) aq.lse = buffers_.lse[i].data();
      kernels::Attention(aq, view, attn.data() + input_rows[i] * q_dim, attention_pool);
      if (mass) {
        const int64_t end = seq.kv.length + n;
        kernels::AddAttentionMass(aq, aq.lse, view, seq.promote_base, end,
                                  buffers_.mass[i].data() + li * (end - seq.promote_base));
      }
    };
    if (few_row_inputs.size() > 1) {
      pool->ParallelFor(static_cast<int64_t>(few_row_inputs.size()),
                        [&](int64_t a, int64_t b, int) {
                          for (int64_t j = a; j < b; ++j) attend(few_row_inputs[j], nullptr);
                        });
    } else if (few_row_inputs.size() == 1) {
      attend(few_row_inputs[0], pool);
    }
    for (size_t i : many_row_inputs) attend(i, pool);
    if (config_.attn_correction || shadow_kv_) {
      QKV_RETURN_IF_ERROR(CorrectAndObserve(inputs, li, positions, input_rows));
    }
    QKV_RETURN_IF_ERROR(kernels::MatMul(l.o, attn.data(), total, proj.data(), pool, mm));
    if (config_.lora) {
      QKV_RETURN_IF_ERROR(AddLowRank(config_.lora->layers[li].o, attn.data(), total, proj.data(),
                                     pool, buf.adapter_scratch, mm));
    }
    QKV_RETURN_IF_ERROR(ReduceSum(proj, total * H, li));
    add_bias(proj, l.o_bias);
    kernels::AddRmsNorm(h.data(), proj.data(), l.ffn_norm.data(), xn.data(), total, H, c.rms_eps);
    if (c.moe.enabled()) {
      const bool all_to_all = config_.moe_dispatch != MoeDispatch::kAllReduce && !shard_.whole();
      const int64_t sent_before = shard_.whole() ? 0 : config_.comm->bytes_sent();
      if (all_to_all) {
        int64_t ns = 0;
        // The experts elastic precision holds at its highest level are the sensitive ones.
        buf.moe_sensitive.clear();
        if (expert_store_ != nullptr && expert_store_->n_levels() > 1) {
          const int64_t E = c.moe.n_experts;
          for (int64_t e = 0; e < E; ++e) {
            buf.moe_sensitive.push_back(expert_levels_[li * E + e] ==
                                        expert_store_->n_levels() - 1);
          }
        }
        QKV_RETURN_IF_ERROR(MoeFfnAllToAll(config_.moe_dispatch, l.moe, router_, xn.data(), total,
                                           proj.data(), *config_.comm, pool, mm, buf.moe,
                                           buf.moe_a2a, buf.routing, &ns, config_.moe_payload,
                                           buf.moe_sensitive));
        last_step_.comm_ns += ns;
        comm_ns_total_ += ns;
      } else {
        QKV_RETURN_IF_ERROR(
            MoeFfn(l.moe, router_, xn.data(), total, proj.data(), pool, mm, buf.moe, buf.routing));
      }
      if (config_.routing_observer) config_.routing_observer(li, buf.routing);
      if (promote_ == Promote::kRouterEntropy) {
        buf.promote.resize(static_cast<size_t>(c.n_layers * total));
        std::copy(buf.routing.entropy.begin(), buf.routing.entropy.end(),
                  buf.promote.begin() + li * total);
      }
      if (expert_policy_)
        QKV_RETURN_IF_ERROR(expert_policy_->Observe(static_cast<int>(li), buf.routing));
      if (!all_to_all) QKV_RETURN_IF_ERROR(ReduceSum(proj, total * H, li));
      if (!shard_.whole()) {
        const int64_t sent = config_.comm->bytes_sent() - sent_before;
        last_step_.moe_bytes_sent += sent;
        moe_bytes_sent_total_ += sent;
      }
      for (int64_t i = 0; i < total * H; ++i) h[i] += proj[i];
      continue;
    }
    QKV_RETURN_IF_ERROR(kernels::MatMul(l.gate, xn.data(), total, gate.data(), pool, mm));
    QKV_RETURN_IF_ERROR(kernels::MatMul(l.up, xn.data(), total, up.data(), pool, mm));
    // Element-wise, so splitting it over the pool cannot change a value.
    pool->ParallelFor(
        total,
        [&](int64_t r0, int64_t r1, int) {
          kernels::SwiGlu(gate.data() + r0 * I, up.data() + r0 * I, gate.data() + r0 * I,
                          (r1 - r0) * I);
        },
        8);
    if (config_.mlp_observer) config_.mlp_observer(li, total, xn.data(), gate.data());
    QKV_RETURN_IF_ERROR(kernels::MatMul(l.down, gate.data(), total, proj.data(), pool, mm));
    QKV_RETURN_IF_ERROR(ReduceSum(proj, total * H, li));
    for (int64_t i = 0; i < total * H; ++i) h[i] += proj[i];
  }

  // Final norm and lm_head only for the rows whose logits were asked for.
  std::vector<int64_t> out_rows;
  int64_t row = 0;
  for (const StepInput& in : inputs) {
    const int64_t n = static_cast<int64_t>(in.tokens.size());
    if (in.all_logits) {
      for (int64_t i = 0; i < n; ++i) out_rows.push_back(row + i);
    } else {
      out_rows.push_back(row + n - 1);
    }
    row += n;
  }
  const int64_t n_out = static_cast<int64_t>(out_rows.size());
  std::vector<float> final_h(n_out * H);
  for (int64_t i = 0; i < n_out; ++i) {
    kernels::RmsNorm(h.data() + out_rows[i] * H, output_norm_.data(), final_h.data() + i * H, 1, H,
                     c.rms_eps);
  }
  const size_t offset = logits->size();
  logits->resize(offset + n_out * c.vocab_size);
  kernels::MatMulOptions mm_head = mm;
  mm_head.activations = config_.lm_head_activations;
  QKV_RETURN_IF_ERROR(
      kernels::MatMul(lm_head_, final_h.data(), n_out, logits->data() + offset, pool, mm_head));

  std::vector<int64_t> lengths_before;
  for (const StepInput& in : inputs) {
    lengths_before.push_back(sequences_[in.seq].kv.length);
    sequences_[in.seq].kv.length += static_cast<int64_t>(in.tokens.size());
  }
  if (promote_ != Promote::kNone) PromoteFilledBlocks(inputs, lengths_before);
  // Between steps, so a step runs on one set of expert weights throughout.
  if (expert_policy_) {
    for (const moe::ExpertLevelChange& ch : expert_policy_->MaybeDecide()) {
      QKV_RETURN_IF_ERROR(SetExpertLevel(ch.layer, ch.expert, ch.new_level));
    }
  }
  last_step_.tokens = total;
  last_step_.forward_ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
          .count();
  return absl::OkStatus();
}

void Engine::PromoteFilledBlocks(std::span<const StepInput> inputs,
                                 const std::vector<int64_t>& lengths_before) {
  const int64_t L = model_config_.n_layers;
  const int64_t total = static_cast<int64_t>(buffers_.promote.size()) / L;
  int64_t row = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    Sequence& seq = sequences_[inputs[i].seq];
    KvCache& cache = *kv_[seq.cache];
    const int64_t n = static_cast<int64_t>(inputs[i].tokens.size());
    if (!cache.promotes()) {
      row += n;
      continue;
    }
    seq.promote_pending.resize(L);
    for (int64_t l = 0; l < L; ++l) {
      std::vector<float>& pending = seq.promote_pending[l];
      if (promote_ == Promote::kAttention || promote_ == Promote::kSnapKv) {
        // H2O: mass accumulated over the steps
        const int64_t span = seq.kv.length - seq.promote_base;
        pending.resize(static_cast<size_t>(span), 0.0f);
        const float* mass = buffers_.mass[i].data() + l * span;
        for (int64_t k = 0; k < span; ++k) pending[k] += mass[k];
        continue;
      }
      for (int64_t j = 0; j < n; ++j) {
        float p = buffers_.promote[l * total + row + j];
        if (promote_ == Promote::kRouterEntropy) {  // uncertain across layers: their mean
          p = 0;
          for (int64_t m = 0; m < L; ++m) p += buffers_.promote[m * total + row + j] / L;
        }
        pending.push_back(p);
      }
    }
    row += n;
    const int64_t bt = cache.block_tokens();
    const int64_t full = seq.kv.length / bt;
    // SnapKV decides a prompt's blocks at its end (SnapPromote), not as they fill.
    for (int64_t b = lengths_before[i] / bt; b < full && !seq.snap_pending; ++b) {
      for (int64_t pos = b * bt; pos < (b + 1) * bt; ++pos) {
        for (int64_t l = 0; l < L; ++l) {
          (void)cache.PromoteRow(seq.kv, l, pos, seq.promote_pending[l][pos - seq.promote_base]);
        }
      }
    }
    // Keep the priorities of the block not yet full.
    const int64_t drop = full * bt - seq.promote_base;
    if (drop > 0) {
      for (std::vector<float>& pending : seq.promote_pending) {
        pending.erase(pending.begin(), pending.begin() + drop);
      }
      seq.promote_base = full * bt;
    }
  }
}

absl::Status Engine::CorrectAndObserve(std::span<const StepInput> inputs, int64_t layer,
                                       const std::vector<int32_t>& positions,
                                       const std::vector<int64_t>& input_rows) {
  const ModelConfig& c = model_config_;
  const int64_t q_dim = shard_.heads.size * c.head_dim;
  const int64_t total = static_cast<int64_t>(positions.size());
  StepBuffers& buf = buffers_;
  kernels::MatMulOptions mm;
  mm.gemm_min_rows = config_.gemm_min_rows;
  const LowRankAdapter* corr =
      config_.attn_correction ? &config_.attn_correction->layers[layer] : nullptr;
  if (corr != nullptr && corr->empty()) corr = nullptr;
  buf.reads_encoded.assign(static_cast<size_t>(total), 0);
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Sequence& seq = sequences_.at(inputs[i].seq);
    const int64_t n = static_cast<int64_t>(inputs[i].tokens.size());
    const int64_t row = input_rows[i];
    // A query reads encoded blocks once they begin before its ring (RingStart), past the
    // sinks; that never stops as the sequence grows, so the rows that do are a suffix.
    const kernels::KvLayerView view = kv_[seq.cache]->View(seq.kv, layer, seq.kv.length + n);
    int64_t first = n;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t p = positions[row + j];
      if (kernels::RingStart(view, p) > std::min<int64_t>(view.sink_tokens, p + 1)) {
        first = j;
        break;
      }
    }
    std::fill(buf.reads_encoded.begin() + row + first, buf.reads_encoded.begin() + row + n, 1);
    // Rows that read only exact tokens have no quantization error to correct.
    if (corr != nullptr && seq.cache == 0 && first < n) {
      float* a = buf.attn.data() + (row + first) * q_dim;
      QKV_RETURN_IF_ERROR(AddLowRank(*corr, a, n - first, a, pool_.get(), buf.adapter_scratch, mm));
    }
  }
  if (!shadow_kv_) return absl::OkStatus();
  buf.attn_exact.resize(static_cast<size_t>(total * q_dim));
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Sequence& seq = sequences_.at(inputs[i].seq);
    const int64_t n = static_cast<int64_t>(inputs[i].tokens.size());
    kernels::AttentionQuery aq;
    aq.q = buf.q.data() + input_rows[i] * q_dim;
    aq.n_q = n;
    aq.n_heads = shard_.heads.size;
    aq.positions = positions.data() + input_rows[i];
    aq.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    aq.fused_decode = config_.fused_decode_attention;
    kernels::Attention(aq, shadow_kv_->View(seq.shadow, layer, seq.kv.length + n),
                       buf.attn_exact.data() + input_rows[i] * q_dim, pool_.get());
  }
  AttnObservation obs;
  obs.layer = layer;
  obs.n = total;
  obs.positions = positions.data();
  obs.attn = buf.attn.data();
  obs.attn_exact = buf.attn_exact.data();
  obs.reads_encoded = buf.reads_encoded.data();
  config_.attn_observer(obs);
  return absl::OkStatus();
}

absl::Status Engine::Forward(SequenceId seq, std::span<const int32_t> tokens, bool all_logits,
                             std::vector<float>* logits) {
  if (tokens.empty()) return absl::InvalidArgumentError("engine: Forward with no tokens");
  std::vector<float> last;
  for (size_t pos = 0; pos < tokens.size(); pos += config_.max_chunk_tokens) {
    const size_t n = std::min<size_t>(config_.max_chunk_tokens, tokens.size() - pos);
    const bool final_chunk = pos + n == tokens.size();
    StepInput in{seq, tokens.subspan(pos, n), all_logits};
    if (all_logits) {
      QKV_RETURN_IF_ERROR(Step({&in, 1}, logits));
    } else {
      last.clear();
      QKV_RETURN_IF_ERROR(Step({&in, 1}, &last));
      if (final_chunk) logits->insert(logits->end(), last.begin(), last.end());
    }
  }
  return absl::OkStatus();
}

}  // namespace quantkv
