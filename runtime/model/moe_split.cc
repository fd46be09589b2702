#include "runtime/model/moe_split.h"

#include <cmath>
#include <cstring>

#include <tuple>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/dequantize.h"
#include "runtime/model/safetensors.h"
#include "runtime/model/safetensors_writer.h"
#include "runtime/util/status_macros.h"

namespace quantkv {

absl::Status CheckMoeSplit(const MoeSplit& s) {
  if (s.n_layers < 1 || s.hidden < 1 || s.intermediate < 1 || s.n_experts < 1 || s.top_k < 1 ||
      s.top_k > s.n_experts || s.shared < 0 || s.shared >= s.intermediate ||
      (s.intermediate - s.shared) % s.n_experts != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "MoE split: n_layers %d, hidden %d, intermediate %d, shared %d, n_experts %d, top_k %d "
        "are not consistent (intermediate - shared must be a multiple of n_experts, 1 <= top_k "
        "<= n_experts)",
        s.n_layers, s.hidden, s.intermediate, s.shared, s.n_experts, s.top_k));
  }
  if (static_cast<int64_t>(s.neurons.size()) != s.n_layers ||
      static_cast<int64_t>(s.router.size()) != s.n_layers ||
      static_cast<int64_t>(s.router_bias.size()) != s.n_layers) {
    return absl::InvalidArgumentError(
        absl::StrFormat("MoE split: expected %d layers of neurons, router and bias", s.n_layers));
  }
  for (int64_t l = 0; l < s.n_layers; ++l) {
    const std::vector<int32_t>& n = s.neurons[l];
    if (static_cast<int64_t>(n.size()) != s.intermediate) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "MoE split: layer %d lists %d neurons, not %d", l, n.size(), s.intermediate));
    }
    std::vector<uint8_t> seen(static_cast<size_t>(s.intermediate), 0);
    for (int32_t j : n) {
      if (j < 0 || j >= s.intermediate || seen[j]++) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "MoE split: layer %d's neurons are not a permutation of [0, %d) (neuron %d)", l,
            s.intermediate, j));
      }
    }
    if (static_cast<int64_t>(s.router[l].size()) != s.n_experts * s.hidden ||
        static_cast<int64_t>(s.router_bias[l].size()) != s.n_experts) {
      return absl::InvalidArgumentError(
          absl::StrFormat("MoE split: layer %d's router is not [%d x %d] with %d biases", l,
                          s.n_experts, s.hidden, s.n_experts));
    }
    for (const std::vector<float>* v : {&s.router[l], &s.router_bias[l]}) {
      for (float x : *v) {
        if (!std::isfinite(x)) {
          return absl::InvalidArgumentError(
              absl::StrFormat("MoE split: layer %d's router has a non-finite value", l));
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::Status WriteMoeSplit(const std::string& path, const MoeSplit& s) {
  QKV_RETURN_IF_ERROR(CheckMoeSplit(s));
  std::vector<std::vector<float>> neurons(s.n_layers);
  std::vector<SafetensorsOutTensor> tensors;
  for (int64_t l = 0; l < s.n_layers; ++l) {
    neurons[l].assign(s.neurons[l].begin(), s.neurons[l].end());
    const std::string p = absl::StrFormat("blk.%d.", l);
    tensors.push_back({p + "moe_neurons", {s.intermediate}, neurons[l]});
    tensors.push_back({p + "ffn_gate_inp.weight", {s.n_experts, s.hidden}, s.router[l]});
    tensors.push_back({p + "ffn_gate_inp.bias", {s.n_experts}, s.router_bias[l]});
  }
  std::map<std::string, std::string> meta = s.notes;
  meta["format"] = "quantkv.moe_split.v1";
  meta["n_layers"] = absl::StrCat(s.n_layers);
  meta["hidden"] = absl::StrCat(s.hidden);
  meta["intermediate"] = absl::StrCat(s.intermediate);
  meta["n_experts"] = absl::StrCat(s.n_experts);
  meta["top_k"] = absl::StrCat(s.top_k);
  meta["shared"] = absl::StrCat(s.shared);
  return WriteSafetensors(path, tensors, meta);
}

absl::StatusOr<MoeSplit> ReadMoeSplit(const std::string& path) {
  QKV_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f, SafetensorsFile::Open(path));
  const auto& meta = f->metadata();
  auto it = meta.find("format");
  if (it == meta.end() || it->second != "quantkv.moe_split.v1") {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: not a MoE split file (metadata 'format' is not quantkv.moe_split.v1; make one "
        "with `quantkv moefy`)",
        path));
  }
  MoeSplit s;
  for (auto [key, field] : {std::pair<const char*, int64_t*>{"n_layers", &s.n_layers},
                            {"hidden", &s.hidden},
                            {"intermediate", &s.intermediate},
                            {"n_experts", &s.n_experts},
                            {"top_k", &s.top_k}}) {
    auto m = meta.find(key);
    if (m == meta.end() || !absl::SimpleAtoi(m->second, field) || *field < 1 ||
        *field > (1 << 24)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: metadata '%s' is missing or not a positive integer", path, key));
    }
  }
  if (auto m = meta.find("shared"); m != meta.end()) {
    if (!absl::SimpleAtoi(m->second, &s.shared) || s.shared < 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: metadata 'shared' is not a non-negative integer", path));
    }
  }
  for (const auto& [k, v] : meta) {
    if (k.starts_with("note.")) s.notes[k] = v;
  }
  auto tensor = [&](const std::string& name, int64_t n) -> absl::StatusOr<std::vector<float>> {
    const SafetensorsTensor* t = f->Find(name);
    if (t == nullptr)
      return absl::NotFoundError(absl::StrFormat("%s: missing tensor '%s'", path, name));
    if (t->n_elements != n) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: tensor '%s' has %d values, expected %d", path, name, t->n_elements, n));
    }
    std::vector<float> v(static_cast<size_t>(n));
    QKV_RETURN_IF_ERROR(kernels::DequantizeRow(t->type, t->data, v.data(), n));
    return v;
  };
  for (int64_t l = 0; l < s.n_layers; ++l) {
    const std::string p = absl::StrFormat("blk.%d.", l);
    QKV_ASSIGN_OR_RETURN(std::vector<float> n, tensor(p + "moe_neurons", s.intermediate));
    std::vector<int32_t> ids(n.size());
    for (size_t i = 0; i < n.size(); ++i) {
      if (n[i] != std::floor(n[i]) || n[i] < 0 || n[i] >= static_cast<float>(s.intermediate)) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s: tensor '%smoe_neurons' holds %g, not a neuron index", path, p, n[i]));
      }
      ids[i] = static_cast<int32_t>(n[i]);
    }
    s.neurons.push_back(std::move(ids));
    QKV_ASSIGN_OR_RETURN(std::vector<float> r,
                         tensor(p + "ffn_gate_inp.weight", s.n_experts * s.hidden));
    QKV_ASSIGN_OR_RETURN(std::vector<float> b, tensor(p + "ffn_gate_inp.bias", s.n_experts));
    s.router.push_back(std::move(r));
    s.router_bias.push_back(std::move(b));
  }
  absl::Status ok = CheckMoeSplit(s);
  if (!ok.ok()) return absl::Status(ok.code(), absl::StrFormat("%s: %s", path, ok.message()));
  return s;
}

namespace {

class MoefiedModel final : public WeightSource {
 public:
  const ModelConfig& config() const override { return config_; }
  const WeightTensor* Find(std::string_view name) const override {
    auto it = added_.find(std::string(name));
    if (it != added_.end()) return &it->second;
    if (hidden_.contains(std::string(name))) return nullptr;
    return dense_->Find(name);
  }
  const std::string& origin() const override { return origin_; }

  absl::Status Build(std::unique_ptr<WeightSource> dense, const MoeSplit& split);

 private:
  void Add(std::string name, std::vector<int64_t> dims, kernels::GgmlType type,
           std::vector<uint8_t> bytes) {
    owned_.push_back(std::move(bytes));
    WeightTensor t;
    t.name = name;
    t.dims = std::move(dims);
    t.type = type;
    t.data = owned_.back().data();
    t.n_bytes = static_cast<int64_t>(owned_.back().size());
    added_.emplace(std::move(name), std::move(t));
  }

  std::unique_ptr<WeightSource> dense_;
  ModelConfig config_;
  std::string origin_;
  std::vector<std::vector<uint8_t>> owned_;  // inner buffers never move
  absl::flat_hash_map<std::string, WeightTensor> added_;
  absl::flat_hash_set<std::string> hidden_;
};

std::vector<uint8_t> FloatBytes(const float* v, size_t n) {
  std::vector<uint8_t> b(n * sizeof(float));
  std::memcpy(b.data(), v, b.size());
  return b;
}

absl::Status MoefiedModel::Build(std::unique_ptr<WeightSource> dense, const MoeSplit& split) {
  dense_ = std::move(dense);
  const ModelConfig& c = dense_->config();
  origin_ = dense_->origin();
  QKV_RETURN_IF_ERROR(CheckMoeSplit(split));
  if (c.moe.enabled()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("--moe-split: %s is already a mixture-of-experts model", origin_));
  }
  if (split.n_layers != c.n_layers || split.hidden != c.hidden ||
      split.intermediate != c.intermediate) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--moe-split: the split is for a model of %d layers, hidden %d, intermediate %d; %s "
        "has %d, %d, %d",
        split.n_layers, split.hidden, split.intermediate, origin_, c.n_layers, c.hidden,
        c.intermediate));
  }
  config_ = c;
  const int64_t E = split.n_experts, S = split.shared, Ie = (c.intermediate - S) / E;
  const int64_t H = c.hidden, I = c.intermediate;
  config_.moe.n_experts = E;
  config_.moe.top_k = split.top_k;
  config_.moe.expert_intermediate = Ie;
  config_.moe.shared_intermediate = S;  // ungated: always added with weight 1
  config_.moe.weighting = moe::RouterWeighting::kOnes;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const std::string p = absl::StrFormat("blk.%d.", l);
    const WeightTensor* gate = dense_->Find(p + "ffn_gate.weight");
    const WeightTensor* up = dense_->Find(p + "ffn_up.weight");
    const WeightTensor* down = dense_->Find(p + "ffn_down.weight");
    for (auto [t, name, rows, cols] :
         {std::tuple{gate, "ffn_gate", I, H}, {up, "ffn_up", I, H}, {down, "ffn_down", H, I}}) {
      if (t == nullptr || t->dims.size() != 2 || t->dims[0] != cols || t->dims[1] != rows ||
          !kernels::GgmlTypeInfoOf(t->type).dequantizable) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "--moe-split: %s: tensor '%s%s.weight' is missing or not a [%d x %d] matrix", origin_,
            p, name, rows, cols));
      }
      hidden_.insert(absl::StrFormat("%s%s.weight", p, name));
    }
    const std::vector<int32_t>& neurons = split.neurons[l];
    std::vector<float> d(static_cast<size_t>(H * I));
    QKV_RETURN_IF_ERROR(kernels::DequantizeRows(down->type, down->data, d.data(), H, I));
    // One MLP of `count` neurons from neurons[first...]: gate/up rows copied whole, down
    // columns gathered in fp32. suffix: ".E" for expert E, "_shexp" for the shared one.
    auto emit = [&](const std::string& suffix, int64_t first, int64_t count) {
      for (const WeightTensor* t : {gate, up}) {
        const int64_t rb = *kernels::GgmlRowBytes(t->type, H);
        std::vector<uint8_t> rows(static_cast<size_t>(count * rb));
        for (int64_t i = 0; i < count; ++i) {
          std::memcpy(rows.data() + i * rb, t->data + neurons[first + i] * rb,
                      static_cast<size_t>(rb));
        }
        Add(absl::StrFormat("%s%s%s.weight", p, t == gate ? "ffn_gate" : "ffn_up", suffix),
            {H, count}, t->type, std::move(rows));
      }
      std::vector<float> de(static_cast<size_t>(H * count));
      for (int64_t r = 0; r < H; ++r) {
        for (int64_t i = 0; i < count; ++i) de[r * count + i] = d[r * I + neurons[first + i]];
      }
      Add(absl::StrFormat("%sffn_down%s.weight", p, suffix), {count, H}, kernels::GgmlType::kF32,
          FloatBytes(de.data(), de.size()));
    };
    if (S > 0) emit("_shexp", 0, S);
    for (int64_t e = 0; e < E; ++e) emit(absl::StrFormat(".%d", e), S + e * Ie, Ie);
    Add(p + "ffn_gate_inp.weight", {H, E}, kernels::GgmlType::kF32,
        FloatBytes(split.router[l].data(), split.router[l].size()));
    Add(p + "ffn_gate_inp.bias", {E}, kernels::GgmlType::kF32,
        FloatBytes(split.router_bias[l].data(), split.router_bias[l].size()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<WeightSource>> MoefiedSource(std::unique_ptr<WeightSource> dense,
                                                            const MoeSplit& split) {
  auto m = std::make_unique<MoefiedModel>();
  QKV_RETURN_IF_ERROR(m->Build(std::move(dense), split));
  return std::unique_ptr<WeightSource>(std::move(m));
}

}  // namespace quantkv
