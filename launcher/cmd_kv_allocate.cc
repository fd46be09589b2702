// `quantkv kv-allocate`: chooses per-layer (and per-KV-head) K and V codecs from a
// sensitivity file (`quantkv sensitivity`) under a bits-per-element or bytes-per-token budget
// (runtime/kv/kv_bit_allocation.h) and writes a KV policy file for --kv @FILE.
#include <fstream>
#include <map>

#include "absl/strings/str_format.h"
#include "launcher/commands.h"
#include "nlohmann/json.hpp"
#include "runtime/kv/kv_bit_allocation.h"
#include "runtime/kv/kv_policy.h"

namespace quantkv::launcher {
namespace {

struct AllocateFlags {
  std::string sensitivity;
  std::string out;
  double kv_budget = 0;
  double bytes_budget = 0;
  std::string metric;
  std::string granularity;
};

void Define(FlagSet& f, AllocateFlags& o) {
  f.Path("sensitivity", &o.sensitivity, "", "sensitivity file from `quantkv sensitivity`",
         PathKind::kFile)
      .Required();
  f.String("out", &o.out, "", "KV policy file to write (use as --kv @FILE)")
      .Placeholder("FILE")
      .Required();
  f.Float("kv-budget", &o.kv_budget, 0.0,
          "average bits per cached element, codes and scales included (e.g. 3.0)",
          {.min = 0.0, .max = 64.0});
  f.Float("bytes-budget", &o.bytes_budget, 0.0,
          "instead: KV bytes per token, all layers' K and V (codes and scales)", {.min = 0.0});
  f.Choice("metric", &o.metric, "kl", {"kl", "dppl"},
           "what is minimised: the summed KL against the base (stable on short texts) or "
           "the summed PPL increase");
  f.Choice("granularity", &o.granularity, "auto", {"auto", "layer", "head"},
           "one format per layer's K|V, or per KV head (auto: per head when the file has "
           "per-head data)");
}

int Run(const AllocateFlags& o, CommandContext& ctx) {
  if ((o.kv_budget > 0) == (o.bytes_budget > 0)) {
    ctx.err << ctx.command
            << ": give exactly one of --kv-budget BITS and --bytes-budget BYTES (> 0)\n";
    return kExitUsage;
  }
  absl::StatusOr<KvSensitivity> s = ReadKvSensitivity(o.sensitivity);
  if (!s.ok()) return ReportFailure(ctx, s.status());
  const bool has_heads =
      !s->head_proxy.empty() && !s->layers.empty() && !s->layers.front().heads.empty();
  if (o.granularity == "head" && !has_heads) {
    ctx.err << absl::StrFormat(
        "%s: --granularity head: %s has no per-head data (measure with --head-proxy mse or kl)\n",
        ctx.command, o.sensitivity);
    return kExitUsage;
  }
  KvAllocationOptions opt;
  opt.budget_bits = o.kv_budget;
  opt.budget_bytes_per_token = o.bytes_budget;
  opt.metric = *ParseKvAllocationMetric(o.metric);
  opt.per_head = o.granularity != "layer";
  absl::StatusOr<KvAllocation> a = AllocateKvBits(*s, opt);
  if (!a.ok()) {
    // INVALID_ARGUMENT is the budget (the only flag it checks); the rest is the file.
    if (absl::IsInvalidArgument(a.status())) {
      ctx.err << absl::StrFormat(
          "%s: %s %g: %s\n", ctx.command, o.kv_budget > 0 ? "--kv-budget" : "--bytes-budget",
          o.kv_budget > 0 ? o.kv_budget : o.bytes_budget, a.status().message());
      return kExitUsage;
    }
    return ReportFailure(ctx, a.status());
  }
  nlohmann::json prov = {{"sensitivity", o.sensitivity},
                         {"metric", o.metric},
                         {"model", s->model},
                         {"text", s->text},
                         {"head_proxy", s->head_proxy}};
  if (o.kv_budget > 0) prov["kv_budget"] = o.kv_budget;
  if (o.bytes_budget > 0) prov["bytes_budget"] = o.bytes_budget;
  {
    std::ofstream out(o.out, std::ios::binary | std::ios::trunc);
    if (!out || !(out << KvAllocationPolicyJson(*a, prov.dump())) || !out.flush()) {
      return ReportFailure(ctx, absl::PermissionDeniedError(o.out + ": cannot write"));
    }
  }
  // Read back as --kv will.
  if (absl::Status c = ParseKvPolicy("@" + o.out, s->n_layers, s->n_kv_heads).status(); !c.ok()) {
    return ReportFailure(ctx, c);
  }
  std::map<std::string, int> count[2];
  for (const KvAllocationChoice& c : a->choices) ++count[c.key ? 0 : 1][c.codec];
  ctx.out << absl::StrFormat(
      "budget %.4f bits/element: allocated %.4f bits/element (%.1f bytes/token; possible "
      "%.4f-%.4f) per %s, predicted %s sum %.6g\n",
      a->budget_bits, a->bits_per_element, a->bytes_per_token, a->min_bits, a->max_bits,
      a->per_head ? "KV head" : "layer", o.metric, a->cost);
  for (int kv = 0; kv < 2; ++kv) {
    ctx.out << (kv == 0 ? "K:" : "V:");
    for (const auto& [codec, n] : count[kv]) ctx.out << absl::StrFormat(" %s x%d", codec, n);
    ctx.out << "\n";
  }
  ctx.out << absl::StrFormat("wrote %s; use it as --kv @%s\n", o.out, o.out);
  return kExitOk;
}

}  // namespace

Subcommand KvAllocateSubcommand() {
  return MakeSubcommand<AllocateFlags>(
      "kv-allocate",
      "choose per-layer/per-head KV codecs under a bit budget from a sensitivity file", Define,
      Run);
}

}  // namespace quantkv::launcher
