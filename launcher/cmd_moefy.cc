// `quantkv moefy`: splits a dense model's MLPs into experts on calibration text and fits a
// router (runtime/eval/moefy.h), writing a split file for `--moe-split FILE`: the MoE test
// bed whose dense original is known (top-k = all experts reproduces it).
#include <cmath>

#include "absl/strings/str_format.h"
#include "launcher/commands.h"
#include "launcher/model_session.h"
#include "launcher/read_file.h"
#include "runtime/eval/moefy.h"

namespace quantkv::launcher {
namespace {

struct MoefyFlags {
  ModelFlags model;
  std::string text;
  std::string out;
  int64_t experts = 8;
  int64_t top_k = 2;
  int64_t tokens = 4096;
  int64_t ctx = 512;
  int64_t iterations = 15;
  int64_t seed = 1;
  int64_t shared = 0;
};

void Define(FlagSet& f, MoefyFlags& o) {
  DefineModelFlags(f, o.model);
  f.Path("text", &o.text, "", "UTF-8 calibration text (not the evaluation text)", PathKind::kFile)
      .Required();
  f.String("out", &o.out, "", "split file to write (safetensors; use as --moe-split FILE)")
      .Placeholder("FILE")
      .Required();
  f.Int<int64_t>("experts", &o.experts, 8, "experts per layer (must divide the MLP width)",
                 {.min = 2, .max = 4096});
  f.Int<int64_t>("top-k", &o.top_k, 2, "the split's default experts per token",
                 {.min = 1, .max = 4096});
  f.Int<int64_t>("tokens", &o.tokens, 4096,
                 "tokens of the text used (the first 3/4 fit, the last 1/4 is held out for the "
                 "report)",
                 {.min = 64, .max = 1 << 20});
  f.Int<int64_t>("ctx", &o.ctx, 512, "window length the text is run in",
                 {.min = 8, .max = 1 << 20});
  f.Int<int64_t>("kmeans-iterations", &o.iterations, 15, "balanced k-means rounds",
                 {.min = 1, .max = 1000});
  f.Int<int64_t>("seed", &o.seed, 1, "k-means seeding", {.min = 0});
  f.Int<int64_t>("shared-neurons", &o.shared, 0,
                 "neurons always computed, as a shared expert (those contributing most on "
                 "average); the experts split the rest",
                 {.min = 0, .max = 1 << 20});
}

int Run(const MoefyFlags& o, CommandContext& ctx) {
  if (!o.model.moe_split.empty()) {
    ctx.err << ctx.command << ": --moe-split: moefy splits a dense model; drop the flag\n";
    return kExitUsage;
  }
  if (o.top_k > o.experts) {
    ctx.err << absl::StrFormat("%s: --top-k %d exceeds --experts %d\n", ctx.command, o.top_k,
                               o.experts);
    return kExitUsage;
  }
  absl::StatusOr<std::string> read = ReadWholeFile(o.text);
  if (!read.ok()) return ReportFailure(ctx, read.status());
  std::unique_ptr<Tokenizer> tokenizer;
  auto make_engine = [&](const EngineConfig& c) -> absl::StatusOr<std::unique_ptr<Engine>> {
    EngineConfig base = c;
    base.pack_weights = false;  // one pass over the text: packing would not pay
    ModelFlags f = o.model;
    f.kv_budget_mb = std::max<int64_t>(f.kv_budget_mb, 64);
    absl::StatusOr<ModelSession> s = OpenModelSession(f, base);
    if (!s.ok()) return s.status();
    tokenizer = std::move(s->tokenizer);
    return std::move(s->engine);
  };
  // The tokenizer comes with the model: open once to encode, FitMoeSplit opens its own.
  {
    absl::StatusOr<std::unique_ptr<Engine>> probe = make_engine(EngineConfig{});
    if (!probe.ok()) return ReportFailure(ctx, probe.status());
    if (o.ctx > (*probe)->model_config().context_length) {
      ctx.err << absl::StrFormat("%s: --ctx %d exceeds the model's context length %d\n",
                                 ctx.command, o.ctx, (*probe)->model_config().context_length);
      return kExitUsage;
    }
  }
  absl::StatusOr<std::vector<int32_t>> ids = tokenizer->Encode(*read);
  if (!ids.ok()) return ReportFailure(ctx, ids.status());
  MoefyOptions opt;
  opt.n_experts = o.experts;
  opt.top_k = o.top_k;
  opt.ctx = o.ctx;
  opt.max_tokens = o.tokens;
  opt.kmeans_iterations = static_cast<int>(o.iterations);
  opt.seed = static_cast<uint64_t>(o.seed);
  opt.shared_neurons = o.shared;
  opt.progress = [&](int64_t layer) { ctx.err << "moefy: layer " << layer << " fitted\n"; };
  MoefyReport report;
  absl::StatusOr<MoeSplit> split = FitMoeSplit(make_engine, *ids, opt, &report);
  if (!split.ok()) {
    if (absl::IsInvalidArgument(split.status())) {
      ctx.err << ctx.command << ": " << split.status().message() << "\n";
      return kExitUsage;
    }
    return ReportFailure(ctx, split.status());
  }
  split->notes["note.text"] = o.text;
  if (absl::Status w = WriteMoeSplit(o.out, *split); !w.ok()) return ReportFailure(ctx, w);
  ctx.out << absl::StrFormat(
      "%d shared neurons and %d experts of %d neurons per layer, top-%d; fitted on %d tokens, "
      "report on %d held-out tokens\n",
      split->shared, split->n_experts, (split->intermediate - split->shared) / split->n_experts,
      split->top_k, report.fit_tokens, report.heldout_tokens);
  ctx.out << "layer  router_R2  oracle_recall  routed_rel_err  oracle_rel_err\n";
  double r2 = 0, recall = 0, err = 0, oerr = 0;
  for (size_t l = 0; l < report.layers.size(); ++l) {
    const MoefyLayerReport& r = report.layers[l];
    ctx.out << absl::StrFormat("%5d  %9.3f  %13.3f  %14.3f  %14.3f\n", l, r.router_r2,
                               r.oracle_recall, r.routed_rel_err, r.oracle_rel_err);
    r2 += r.router_r2;
    recall += r.oracle_recall;
    err += r.routed_rel_err;
    oerr += r.oracle_rel_err;
  }
  const double n = static_cast<double>(std::max<size_t>(report.layers.size(), 1));
  ctx.out << absl::StrFormat("mean   %9.3f  %13.3f  %14.3f  %14.3f\n", r2 / n, recall / n, err / n,
                             oerr / n);
  ctx.out << absl::StrFormat("wrote %s; use it as --moe-split %s [--moe-top-k K]\n", o.out, o.out);
  return kExitOk;
}

}  // namespace

Subcommand MoefySubcommand() {
  return MakeSubcommand<MoefyFlags>(
      "moefy", "split a dense model's MLPs into experts with a fitted router (an MoE test bed)",
      Define, Run);
}

}  // namespace quantkv::launcher
