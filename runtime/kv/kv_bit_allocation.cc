#include "runtime/kv/kv_bit_allocation.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_format.h"
#include "kernels/kv_codec.h"
#include "nlohmann/json.hpp"
#include "runtime/kv/kv_policy.h"
#include "runtime/util/status_macros.h"

namespace quantkv {
namespace {

// One decision of the knapsack: a layer's (or head's) K or V, with its candidate codecs.
struct Option {
  std::string codec;
  int64_t bytes = 0;  // per cache block: slab bytes x heads covered
  double bits = 0;    // the codec's bits per element
  double cost = 0;
};
struct Item {
  int64_t layer = 0, head = -1;
  bool key = true;
  std::vector<Option> options;
};

double MeasureCost(const KvSensitivityMeasure& m, KvAllocationMetric metric) {
  return metric == KvAllocationMetric::kKl ? std::max(0.0, m.kl) : std::max(0.0, m.dppl);
}

// Slab bytes of every codec named in the file, through the real codecs.
class SlabSizes {
 public:
  SlabSizes(int64_t head_dim, int64_t block) : head_dim_(head_dim), block_(block) {}
  absl::StatusOr<int64_t> Get(const std::string& codec, const std::string& field) {
    if (auto it = bytes_.find(codec); it != bytes_.end()) return it->second;
    absl::StatusOr<kernels::KvCodecSpec> spec = kernels::ParseKvCodecSpec(codec);
    if (!spec.ok()) return spec.status();
    absl::StatusOr<std::unique_ptr<kernels::KvCodec>> c =
        kernels::KvCodec::Create(*spec, head_dim_, block_);
    if (!c.ok()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: codec %s cannot be sized (head_dim %d, block %d): %s", field, codec,
                          head_dim_, block_, c.status().message()));
    }
    return bytes_[codec] = (*c)->slab_bytes();
  }

 private:
  int64_t head_dim_, block_;
  absl::flat_hash_map<std::string, int64_t> bytes_;
};

absl::StatusOr<std::vector<Item>> BuildItems(const KvSensitivity& s, const KvAllocationOptions& o,
                                             bool per_head) {
  SlabSizes sizes(s.head_dim, s.block);
  const double slab_elements = static_cast<double>(s.head_dim * s.block);
  std::vector<const KvLayerSensitivity*> by_layer(s.n_layers, nullptr);
  for (const KvLayerSensitivity& l : s.layers) by_layer[l.layer] = &l;
  std::vector<Item> items;
  for (int64_t layer = 0; layer < s.n_layers; ++layer) {
    const KvLayerSensitivity& l = *by_layer[layer];
    for (const bool key : {true, false}) {
      const std::vector<KvSensitivityMeasure>& ms = key ? l.k : l.v;
      const char* kind = key ? "k" : "v";
      if (ms.size() > 255) {
        return absl::FailedPreconditionError(
            absl::StrFormat("layers[%d].%s has %d codecs; at most 255", layer, kind, ms.size()));
      }
      std::vector<Option> layer_options;
      for (size_t i = 0; i < ms.size(); ++i) {
        QKV_ASSIGN_OR_RETURN(
            int64_t slab,
            sizes.Get(ms[i].codec, absl::StrFormat("layers[%d].%s[%d]", layer, kind, i)));
        layer_options.push_back({.codec = ms[i].codec,
                                 .bytes = slab,
                                 .bits = 8.0 * slab / slab_elements,
                                 .cost = MeasureCost(ms[i], o.metric)});
      }
      if (!per_head) {
        Item item{.layer = layer, .key = key, .options = layer_options};
        for (Option& op : item.options) op.bytes *= s.n_kv_heads;
        items.push_back(std::move(item));
        continue;
      }
      // Split the layer's cost between its heads by the proxy, codec by codec.
      for (int64_t h = 0; h < s.n_kv_heads; ++h) {
        Item item{.layer = layer, .head = h, .key = key, .options = layer_options};
        for (size_t i = 0; i < ms.size(); ++i) {
          double total = 0, mine = 0;
          for (const KvHeadSensitivity& hs : l.heads) {
            const KvHeadMeasure& hm = key ? hs.k[i] : hs.v[i];
            const double p = s.head_proxy == "kl" ? hm.kl : hm.mse;
            total += p;
            if (hs.head == h) mine = p;
          }
          const double share = total > 0 ? mine / total : 1.0 / s.n_kv_heads;
          item.options[i].cost *= share;
        }
        items.push_back(std::move(item));
      }
    }
  }
  return items;
}

// The most frequent codec among `codecs` (ties: the first in sorted order), for compact specs.
std::string MostCommon(const std::vector<std::string>& codecs) {
  std::map<std::string, int> count;
  for (const std::string& c : codecs) ++count[c];
  std::string best;
  int n = -1;
  for (const auto& [c, k] : count) {
    if (k > n) best = c, n = k;
  }
  return best;
}

// Base, then global k/v, then layers that differ, then heads that differ from their layer.
// Later items override earlier ones (kv_policy.h), so every choice is what it says.
std::string BuildSpec(const std::string& base, const std::vector<KvAllocationChoice>& choices,
                      int64_t n_layers) {
  std::string spec = base;
  for (const bool key : {true, false}) {
    const char* kind = key ? "k" : "v";
    std::vector<std::string> all;
    std::vector<std::vector<std::string>> per_layer(n_layers);
    for (const KvAllocationChoice& c : choices) {
      if (c.key != key) continue;
      all.push_back(c.codec);
      per_layer[c.layer].push_back(c.codec);
    }
    const std::string global = MostCommon(all);
    spec += absl::StrFormat(",%s=%s", kind, global);
    std::vector<std::string> layer_codec(n_layers);
    for (int64_t l = 0; l < n_layers; ++l) {
      layer_codec[l] = MostCommon(per_layer[l]);
      if (layer_codec[l] != global) spec += absl::StrFormat(",%d.%s=%s", l, kind, layer_codec[l]);
    }
    for (const KvAllocationChoice& c : choices) {
      if (c.key == key && c.head >= 0 && c.codec != layer_codec[c.layer]) {
        spec += absl::StrFormat(",%d.h%d.%s=%s", c.layer, c.head, kind, c.codec);
      }
    }
  }
  return spec;
}

}  // namespace

absl::StatusOr<KvAllocationMetric> ParseKvAllocationMetric(const std::string& name) {
  if (name == "kl") return KvAllocationMetric::kKl;
  if (name == "dppl") return KvAllocationMetric::kDeltaPpl;
  return absl::InvalidArgumentError(
      absl::StrFormat("unknown allocation metric '%s' (want kl or dppl)", name));
}

absl::StatusOr<KvAllocation> AllocateKvBits(const KvSensitivity& s, const KvAllocationOptions& o) {
  if ((o.budget_bits > 0) == (o.budget_bytes_per_token > 0)) {
    return absl::InvalidArgumentError(
        "give exactly one budget: bits per element or bytes per token (> 0)");
  }
  std::vector<bool> covered(s.n_layers, false);
  for (const KvLayerSensitivity& l : s.layers) covered[l.layer] = true;
  for (int64_t l = 0; l < s.n_layers; ++l) {
    if (!covered[l]) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "the sensitivity file measured %d of the model's %d layers (layer %d is missing); "
          "allocation needs every layer (run `quantkv sensitivity` without --layers)",
          s.layers.size(), s.n_layers, l));
    }
  }
  bool per_head = o.per_head && !s.head_proxy.empty();
  for (const KvLayerSensitivity& l : s.layers) per_head = per_head && !l.heads.empty();
  QKV_ASSIGN_OR_RETURN(std::vector<Item> items, BuildItems(s, o, per_head));

  // Bytes of one cache block (all layers, K and V, all heads) and its element count.
  const double block_elements = static_cast<double>(s.block * s.head_dim * s.n_kv_heads) * 2.0 *
                                static_cast<double>(s.n_layers);
  const double budget_bits =
      o.budget_bits > 0 ? o.budget_bits : o.budget_bytes_per_token * 8.0 * s.block / block_elements;
  auto bits_of = [&](int64_t bytes) { return 8.0 * static_cast<double>(bytes) / block_elements; };
  int64_t min_bytes = 0, max_bytes = 0, g = 0;
  for (const Item& it : items) {
    int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
    for (const Option& op : it.options) {
      lo = std::min(lo, op.bytes);
      hi = std::max(hi, op.bytes);
      g = std::gcd(g, op.bytes);
    }
    min_bytes += lo;
    max_bytes += hi;
  }
  // A tolerance of a billionth keeps "--kv-budget 2.5" feasible for codecs of exactly 2.5.
  const double budget_exact = budget_bits * block_elements / 8.0 * (1 + 1e-9);
  const int64_t budget_bytes = budget_exact >= static_cast<double>(max_bytes)
                                   ? max_bytes
                                   : static_cast<int64_t>(std::floor(budget_exact));
  if (budget_bytes < min_bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "budget %.4f bits/element (%.1f bytes/token) is below the minimum achievable %.4f "
        "bits/element (%.1f bytes/token, every K and V at its cheapest candidate codec)",
        budget_bits, budget_bits * block_elements / 8.0 / s.block, bits_of(min_bytes),
        static_cast<double>(min_bytes) / s.block));
  }

  // Knapsack in units of `unit` bytes; coarsened (weights rounded up) past max_dp_cells.
  const int64_t cap_bytes = std::min(budget_bytes, max_bytes);
  int64_t unit = std::max<int64_t>(g, 1);
  const int64_t n = static_cast<int64_t>(items.size());
  if (n * (cap_bytes / unit + 1) > o.max_dp_cells) {
    unit = (n * cap_bytes) / std::max<int64_t>(1, o.max_dp_cells - n) + 1;
  }
  const int64_t cap = cap_bytes / unit;
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> dp(cap + 1, inf), next(cap + 1);
  std::vector<uint8_t> pick(static_cast<size_t>(n) * (cap + 1), 0);
  dp[0] = 0;
  for (int64_t i = 0; i < n; ++i) {
    std::fill(next.begin(), next.end(), inf);
    const std::vector<Option>& ops = items[i].options;
    for (size_t j = 0; j < ops.size(); ++j) {
      const int64_t w = (ops[j].bytes + unit - 1) / unit;
      for (int64_t b = w; b <= cap; ++b) {
        const double c = dp[b - w] + ops[j].cost;
        if (c < next[b]) {
          next[b] = c;
          pick[i * (cap + 1) + b] = static_cast<uint8_t>(j);
        }
      }
    }
    dp.swap(next);
  }
  // Least cost; among equal costs the fewest bytes.
  int64_t best = -1;
  for (int64_t b = 0; b <= cap; ++b) {
    if (dp[b] < inf && (best < 0 || dp[b] < dp[best])) best = b;
  }
  std::vector<size_t> chosen(n, 0);
  if (best < 0) {
    // Only reachable when coarsening rounded the cheapest allocation past the budget.
    for (int64_t i = 0; i < n; ++i) {
      const auto& ops = items[i].options;
      chosen[i] =
          std::min_element(ops.begin(), ops.end(),
                           [](const Option& a, const Option& b) { return a.bytes < b.bytes; }) -
          ops.begin();
    }
  } else {
    for (int64_t i = n - 1, b = best; i >= 0; --i) {
      chosen[i] = pick[i * (cap + 1) + b];
      b -= (items[i].options[chosen[i]].bytes + unit - 1) / unit;
    }
  }

  KvAllocation a;
  a.per_head = per_head;
  a.budget_bits = budget_bits;
  a.min_bits = bits_of(min_bytes);
  a.max_bits = bits_of(max_bytes);
  int64_t bytes = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Option& op = items[i].options[chosen[i]];
    bytes += op.bytes;
    a.cost += op.cost;
    a.choices.push_back({.layer = items[i].layer,
                         .head = items[i].head,
                         .key = items[i].key,
                         .codec = op.codec,
                         .bits_per_element = op.bits,
                         .cost = op.cost});
  }
  a.bits_per_element = bits_of(bytes);
  a.bytes_per_token = static_cast<double>(bytes) / s.block;
  a.spec = BuildSpec(s.base, a.choices, s.n_layers);
  absl::StatusOr<KvPolicy> check = ParseKvPolicy(a.spec, s.n_layers, s.n_kv_heads);
  if (!check.ok()) {
    return absl::InternalError(absl::StrFormat("the allocated spec '%s' does not parse: %s", a.spec,
                                               check.status().message()));
  }
  return a;
}

std::string KvAllocationPolicyJson(const KvAllocation& a, const std::string& provenance_json) {
  nlohmann::json choices = nlohmann::json::array();
  for (const KvAllocationChoice& c : a.choices) {
    nlohmann::json j = {{"layer", c.layer},
                        {"kind", c.key ? "k" : "v"},
                        {"codec", c.codec},
                        {"bits_per_element", c.bits_per_element},
                        {"cost", c.cost}};
    if (c.head >= 0) j["head"] = c.head;
    choices.push_back(std::move(j));
  }
  nlohmann::json prov = nlohmann::json::parse(provenance_json, nullptr, false);
  if (prov.is_discarded()) prov = nlohmann::json::object();
  nlohmann::json j = {{"spec", a.spec},
                      {"allocation",
                       {{"budget_bits_per_element", a.budget_bits},
                        {"bits_per_element", a.bits_per_element},
                        {"bytes_per_token", a.bytes_per_token},
                        {"predicted_cost", a.cost},
                        {"per_head", a.per_head},
                        {"min_bits_per_element", a.min_bits},
                        {"max_bits_per_element", a.max_bits},
                        {"made_by", prov},
                        {"choices", choices}}}};
  return j.dump(1) + "\n";
}

}  // namespace quantkv
