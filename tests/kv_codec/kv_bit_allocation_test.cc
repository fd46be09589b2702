// The KV bit allocator and the sensitivity file, on synthetic sensitivities (no model):
// budgets hold, more budget is never worse, the DP is exact (brute force on a small case),
// heads split by their proxy, and bad budgets or files give errors that name what is wrong.
#include <cmath>
#include <functional>

#include "absl/strings/str_replace.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/kv/kv_bit_allocation.h"
#include "runtime/kv/kv_policy.h"
#include "runtime/kv/kv_sensitivity_file.h"

namespace quantkv {
namespace {

const std::vector<std::string> kCodecs = {"int8:g64:asym", "int4:g64:asym", "int2:g64:asym"};

// n_layers layers, 2 heads, head_dim 64, block 32. Layer l's K costs grow with l (and V costs
// the other way) so the allocation has something to trade; costs fall with more bits.
KvSensitivity Synthetic(int64_t n_layers, bool heads) {
  KvSensitivity s;
  s.base = "fp16";
  s.n_layers = n_layers;
  s.n_kv_heads = 2;
  s.head_dim = 64;
  s.block = 32;
  s.head_proxy = heads ? "mse" : "";
  for (int64_t l = 0; l < n_layers; ++l) {
    KvLayerSensitivity ls;
    ls.layer = l;
    for (size_t c = 0; c < kCodecs.size(); ++c) {
      const double scale = std::pow(10.0, static_cast<double>(c));  // int2 100x int8
      ls.k.push_back(
          {.codec = kCodecs[c], .dppl = 0.01 * scale * (l + 1), .kl = 1e-4 * scale * (l + 1)});
      ls.v.push_back({.codec = kCodecs[c],
                      .dppl = 0.02 * scale * (n_layers - l),
                      .kl = 2e-4 * scale * (n_layers - l)});
    }
    if (heads) {
      for (int64_t h = 0; h < 2; ++h) {
        KvHeadSensitivity hs;
        hs.head = h;
        for (size_t c = 0; c < kCodecs.size(); ++c) {
          // Head 1 is 9x as sensitive as head 0 in every layer.
          hs.k.push_back({.codec = kCodecs[c], .mse = (h == 0 ? 0.1 : 0.9)});
          hs.v.push_back({.codec = kCodecs[c], .mse = (h == 0 ? 0.1 : 0.9)});
        }
        ls.heads.push_back(std::move(hs));
      }
    }
    s.layers.push_back(std::move(ls));
  }
  return s;
}

KvAllocationOptions Bits(double b, bool per_head = true) {
  KvAllocationOptions o;
  o.budget_bits = b;
  o.per_head = per_head;
  return o;
}

TEST(KvBitAllocationTest, RespectsTheBudgetAndWritesAMatchingSpec) {
  for (const bool heads : {false, true}) {
    const KvSensitivity s = Synthetic(4, heads);
    for (double budget = 2.5; budget <= 8.5; budget += 0.25) {
      absl::StatusOr<KvAllocation> a = AllocateKvBits(s, Bits(budget));
      ASSERT_TRUE(a.ok()) << budget << ": " << a.status();
      EXPECT_EQ(a->per_head, heads);
      EXPECT_LE(a->bits_per_element, budget + 1e-9) << budget;
      EXPECT_NEAR(a->min_bits, 2.5, 1e-12);  // int2:g64:asym: 2 bits + fp16 scale and zero / 64
      EXPECT_NEAR(a->max_bits, 8.5, 1e-12);
      // The average of the choices is what the allocation reports.
      double sum = 0;
      for (const KvAllocationChoice& c : a->choices) sum += c.bits_per_element;
      EXPECT_NEAR(sum / a->choices.size(), a->bits_per_element, 1e-9);
      // The spec stores every choice as chosen.
      absl::StatusOr<KvPolicy> p = ParseKvPolicy(a->spec, s.n_layers, s.n_kv_heads);
      ASSERT_TRUE(p.ok()) << a->spec << ": " << p.status();
      for (const KvAllocationChoice& c : a->choices) {
        for (int64_t h = 0; h < s.n_kv_heads; ++h) {
          if (c.head >= 0 && c.head != h) continue;
          const LayerKvPolicy& lp = p->ForHead(c.layer, h);
          EXPECT_EQ((c.key ? lp.k : lp.v).ToString(), c.codec)
              << a->spec << " layer " << c.layer << " head " << h;
        }
      }
    }
  }
}

TEST(KvBitAllocationTest, MoreBudgetIsNeverWorse) {
  for (const auto metric : {KvAllocationMetric::kKl, KvAllocationMetric::kDeltaPpl}) {
    const KvSensitivity s = Synthetic(6, true);
    double last = std::numeric_limits<double>::infinity();
    for (double budget = 2.5; budget <= 9.0; budget += 0.05) {
      KvAllocationOptions o = Bits(budget);
      o.metric = metric;
      absl::StatusOr<KvAllocation> a = AllocateKvBits(s, o);
      ASSERT_TRUE(a.ok()) << a.status();
      EXPECT_LE(a->cost, last + 1e-12) << budget;
      last = a->cost;
    }
    // Enough for everything: every choice is the richest codec.
    absl::StatusOr<KvAllocation> all = AllocateKvBits(s, Bits(16));
    ASSERT_TRUE(all.ok());
    for (const KvAllocationChoice& c : all->choices) EXPECT_EQ(c.codec, kCodecs[0]);
  }
}

TEST(KvBitAllocationTest, MatchesBruteForce) {
  const KvSensitivity s = Synthetic(3, false);  // 6 items x 3 codecs: 729 allocations
  const double bits[] = {8.5, 4.5, 2.5};
  for (double budget : {2.5, 3.0, 3.2, 4.0, 4.6, 5.5, 7.0}) {
    absl::StatusOr<KvAllocation> a = AllocateKvBits(s, Bits(budget));
    ASSERT_TRUE(a.ok());
    double best = std::numeric_limits<double>::infinity();
    for (int code = 0; code < 729; ++code) {
      double b = 0, cost = 0;
      for (int i = 0, c = code; i < 6; ++i, c /= 3) {
        const KvLayerSensitivity& l = s.layers[i / 2];
        b += bits[c % 3] / 6;
        cost += (i % 2 == 0 ? l.k : l.v)[c % 3].kl;
      }
      if (b <= budget + 1e-9) best = std::min(best, cost);
    }
    EXPECT_NEAR(a->cost, best, 1e-12) << budget;
  }
}

TEST(KvBitAllocationTest, SensitiveHeadsGetMoreBits) {
  const KvSensitivity s = Synthetic(4, true);
  absl::StatusOr<KvAllocation> a = AllocateKvBits(s, Bits(3.5));
  ASSERT_TRUE(a.ok());
  // Per layer and K|V, head 1 (9x the proxy) never has fewer bits than head 0.
  for (size_t i = 0; i + 1 < a->choices.size(); i += 2) {
    ASSERT_EQ(a->choices[i].head, 0);
    ASSERT_EQ(a->choices[i + 1].head, 1);
    EXPECT_GE(a->choices[i + 1].bits_per_element, a->choices[i].bits_per_element);
  }
  // The heads' costs add up to the layer's.
  absl::StatusOr<KvAllocation> all2 = AllocateKvBits(s, Bits(2.5));
  ASSERT_TRUE(all2.ok());
  double layer_sum = 0;
  for (const KvLayerSensitivity& l : s.layers) layer_sum += l.k[2].kl + l.v[2].kl;
  EXPECT_NEAR(all2->cost, layer_sum, 1e-12);
  // Per layer on request, though the file has heads.
  absl::StatusOr<KvAllocation> by_layer = AllocateKvBits(s, Bits(3.5, /*per_head=*/false));
  ASSERT_TRUE(by_layer.ok());
  EXPECT_FALSE(by_layer->per_head);
  EXPECT_EQ(by_layer->choices.size(), 8u);
}

TEST(KvBitAllocationTest, BytesBudgetIsTheSameBudget) {
  const KvSensitivity s = Synthetic(4, false);
  // 3 bits/element = 3/8 bytes x (4 layers x K,V x 2 heads x 64) elements per token.
  KvAllocationOptions o;
  o.budget_bytes_per_token = 3.0 / 8 * 4 * 2 * 2 * 64;
  absl::StatusOr<KvAllocation> by_bytes = AllocateKvBits(s, o);
  absl::StatusOr<KvAllocation> by_bits = AllocateKvBits(s, Bits(3.0));
  ASSERT_TRUE(by_bytes.ok() && by_bits.ok());
  EXPECT_NEAR(by_bytes->budget_bits, 3.0, 1e-12);
  EXPECT_EQ(by_bytes->spec, by_bits->spec);
  EXPECT_LE(by_bytes->bytes_per_token, o.budget_bytes_per_token);
}

TEST(KvBitAllocationTest, InfeasibleBudgetNamesTheBudgetAndTheMinimum) {
  absl::StatusOr<KvAllocation> a = AllocateKvBits(Synthetic(2, false), Bits(2.0));
  ASSERT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(a.status().message().find("budget 2.0000 bits/element"), std::string::npos)
      << a.status();
  EXPECT_NE(a.status().message().find("minimum achievable 2.5000"), std::string::npos)
      << a.status();
  // Exactly the minimum is feasible.
  EXPECT_TRUE(AllocateKvBits(Synthetic(2, false), Bits(2.5)).ok());
  EXPECT_EQ(AllocateKvBits(Synthetic(2, false), KvAllocationOptions{}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(KvBitAllocationTest, MissingLayerIsRefused) {
  KvSensitivity s = Synthetic(3, false);
  s.layers.erase(s.layers.begin() + 1);
  absl::StatusOr<KvAllocation> a = AllocateKvBits(s, Bits(4));
  ASSERT_EQ(a.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(a.status().message().find("layer 1 is missing"), std::string::npos) << a.status();
}

TEST(KvBitAllocationTest, PolicyFileLoadsAsKv) {
  absl::StatusOr<KvAllocation> a = AllocateKvBits(Synthetic(3, true), Bits(3.0));
  ASSERT_TRUE(a.ok());
  const nlohmann::json j = nlohmann::json::parse(KvAllocationPolicyJson(*a, R"({"x":1})"));
  EXPECT_EQ(j["spec"], a->spec);
  EXPECT_EQ(j["allocation"]["made_by"]["x"], 1);
  EXPECT_EQ(j["allocation"]["choices"].size(), a->choices.size());
}

TEST(KvSensitivityFileTest, RoundTrips) {
  KvSensitivity s = Synthetic(3, true);
  s.model = "m.gguf";
  s.ctx = 512;
  s.tokens_scored = 255;
  s.baseline_ppl = 14.5;
  s.report_json = R"({"spearman":{"mse":{"mean_vs_dppl":0.5}}})";
  absl::StatusOr<KvSensitivity> back = KvSensitivityFromJson(KvSensitivityToJson(s), "x.json");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->model, "m.gguf");
  EXPECT_EQ(back->n_layers, 3);
  EXPECT_EQ(back->tokens_scored, 255);
  EXPECT_DOUBLE_EQ(back->baseline_ppl, 14.5);
  EXPECT_EQ(back->head_proxy, "mse");
  ASSERT_EQ(back->layers.size(), 3u);
  EXPECT_DOUBLE_EQ(back->layers[2].v[1].kl, s.layers[2].v[1].kl);
  ASSERT_EQ(back->layers[1].heads.size(), 2u);
  EXPECT_DOUBLE_EQ(back->layers[1].heads[1].k[0].mse, 0.9);
  EXPECT_LT(back->layers[1].heads[1].k[0].kl, 0);  // not measured stays unmeasured
  EXPECT_EQ(nlohmann::json::parse(back->report_json)["spearman"]["mse"]["mean_vs_dppl"], 0.5);
}

// Each malformed file: what to change in the valid JSON, and the field the error must name.
TEST(KvSensitivityFileTest, MalformedFilesNameTheField) {
  const std::string good = KvSensitivityToJson(Synthetic(2, true));
  struct Case {
    std::function<void(nlohmann::json&)> edit;
    std::string field;
  };
  const std::vector<Case> cases = {
      {[](nlohmann::json& j) { j.erase("format"); }, "format is missing"},
      {[](nlohmann::json& j) { j["version"] = 7; }, "version 7 is not supported"},
      {[](nlohmann::json& j) { j["n_layers"] = "two"; }, "n_layers must be an integer"},
      {[](nlohmann::json& j) { j["base"] = "int9"; }, "base 'int9'"},
      {[](nlohmann::json& j) { j["layers"] = nlohmann::json::array(); },
       "layers must be a non-empty array"},
      {[](nlohmann::json& j) { j["layers"][1]["layer"] = 0; }, "layers[1].layer 0 appears twice"},
      {[](nlohmann::json& j) { j["layers"][1]["layer"] = 5; },
       "layers[1].layer must be an integer in [0, 1]"},
      {[](nlohmann::json& j) { j["layers"][0]["k"][1].erase("kl"); },
       "layers[0].k[1].kl is missing"},
      {[](nlohmann::json& j) { j["layers"][0]["v"][2]["kl"] = -1; },
       "layers[0].v[2].kl must be >= 0"},
      {[](nlohmann::json& j) { j["layers"][0]["v"][0]["dppl"] = "x"; },
       "layers[0].v[0].dppl must be a finite number"},
      {[](nlohmann::json& j) { j["layers"][1]["k"][0]["codec"] = "int5"; },
       "layers[1].k[0].codec 'int5'"},
      {[](nlohmann::json& j) { j["layers"][0].erase("v"); }, "layers[0].v is missing"},
      {[](nlohmann::json& j) { j["layers"][0]["heads"].erase(1); },
       "layers[0].heads has 1 entries"},
      {[](nlohmann::json& j) { j["layers"][1]["heads"][0]["k"][0].erase("mse"); },
       "layers[1].heads[0].k[0].mse is missing"},
      {[](nlohmann::json& j) { j["layers"][1]["heads"][1]["v"][2]["codec"] = "int4"; },
       "layers[1].heads[1].v[2].codec is int4 but"},
      {[](nlohmann::json& j) { j["head_proxy"] = ""; }, "layers[0].heads is given but head_proxy"},
  };
  for (const Case& c : cases) {
    nlohmann::json j = nlohmann::json::parse(good);
    c.edit(j);
    absl::StatusOr<KvSensitivity> s = KvSensitivityFromJson(j.dump(), "bad.json");
    ASSERT_FALSE(s.ok()) << c.field;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.status().message().find("sensitivity file bad.json: " + c.field), std::string::npos)
        << s.status();
  }
  EXPECT_FALSE(KvSensitivityFromJson("{not json", "bad.json").ok());
  EXPECT_EQ(ReadKvSensitivity("/nonexistent/s.json").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace quantkv
