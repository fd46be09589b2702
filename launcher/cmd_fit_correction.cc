// `quantkv fit-correction`: fits, per layer, a low-rank affine correction of the attention
// output that maps what attention over a --kv (quantized) cache produces towards what the
// same queries get from an exact cache (runtime/engine/attn_correction_fit.h), on
// calibration text, and writes it as safetensors for --kv-correction.
#include <algorithm>
#include <cmath>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "launcher/commands.h"
#include "launcher/model_session.h"
#include "launcher/progress.h"
#include "launcher/read_file.h"
#include "nlohmann/json.hpp"
#include "runtime/engine/attn_correction.h"
#include "runtime/engine/attn_correction_fit.h"

namespace quantkv::launcher {
namespace {

struct FitCorrectionFlags {
  ModelFlags model;
  std::string text;
  std::string out;
  std::string ref_kv;
  std::string layers;
  std::string rank;
  int64_t ctx = 512;
  int64_t tokens = 4096;
  int64_t holdout_tokens = 0;
  std::string holdout_text;
  std::string ridge;
};

// "1e-3" or a list "1e-3,0.01,0.1" to choose from on the held-out tokens.
absl::StatusOr<std::vector<double>> ParseRidges(std::string_view text) {
  std::vector<double> out;
  for (absl::string_view part : absl::StrSplit(absl::string_view(text.data(), text.size()), ',')) {
    double r = 0;
    if (!absl::SimpleAtod(part, &r) || !(r >= 0) || !std::isfinite(r)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("'%s' is not a ridge >= 0 (want e.g. 1e-3 or 1e-3,0.01,0.1)", part));
    }
    out.push_back(r);
  }
  return out;
}

absl::StatusOr<std::vector<int64_t>> ParseLayers(std::string_view text) {
  std::vector<int64_t> layers;
  if (text.empty()) return layers;
  for (absl::string_view part : absl::StrSplit(absl::string_view(text.data(), text.size()), ',')) {
    int64_t l = 0;
    if (!absl::SimpleAtoi(part, &l) || l < 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("'%s' is not a layer index (want e.g. 0,5,29)", part));
    }
    layers.push_back(l);
  }
  return layers;
}

absl::StatusOr<std::vector<int64_t>> ParseRanks(std::string_view text) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(absl::string_view(text.data(), text.size()), ',')) {
    int64_t r = 0;
    if (!absl::SimpleAtoi(part, &r) || r < 1 || r > 4096) {
      return absl::InvalidArgumentError(
          absl::StrFormat("'%s' is not a rank in [1, 4096] (want e.g. 32 or 8,32,64)", part));
    }
    out.push_back(r);
  }
  return out;
}

void Define(FlagSet& f, FitCorrectionFlags& o) {
  DefineModelFlags(f, o.model);
  f.Path("text", &o.text, "", "UTF-8 calibration text (not the evaluation text)", PathKind::kFile)
      .Required();
  f.String("out", &o.out, "", "correction file to write (safetensors; use as --kv-correction)")
      .Placeholder("FILE")
      .Required();
  f.String("rank", &o.rank, "32",
           "rank of each layer's correction; a list (8,32,64) writes one file per rank from one "
           "pass, --out naming them with %r (corr_r%r.safetensors)",
           [](std::string_view v) { return ParseRanks(v).status(); })
      .Placeholder("INT[,INT...]");
  f.String("ridge", &o.ridge, "1e-3",
           "ridge penalty, relative to the mean variance of the attention output; a list "
           "(1e-3,0.01,0.1) picks per layer the one with the least held-out error "
           "(needs --holdout-tokens)",
           [](std::string_view v) { return ParseRidges(v).status(); })
      .Placeholder("FLOAT[,FLOAT...]");
  f.Int<int64_t>("ctx", &o.ctx, 512, "tokens per forward window (use the evaluation's --ctx)",
                 {.min = 8, .max = 1 << 20});
  f.Int<int64_t>("tokens", &o.tokens, 4096, "calibration tokens", {.min = 1, .max = 1 << 22});
  f.Int<int64_t>("holdout-tokens", &o.holdout_tokens, 0,
                 "further tokens of the text, after the calibration ones, on which the fitted "
                 "correction's error is reported (not fitted on)",
                 {.min = 0, .max = 1 << 22});
  f.Path("holdout-text", &o.holdout_text, "",
         "take the --holdout-tokens from the start of this text instead (how well the "
         "correction transfers to other text)",
         PathKind::kFile);
  f.String("ref-kv", &o.ref_kv, "fp16",
           "the exact cache the correction aims at (the baseline you compare against)",
           [](std::string_view v) { return ParseKvPolicy(v).status(); })
      .Placeholder("SPEC");
  f.String("layers", &o.layers, "", "layers to correct, e.g. 0,1,29 (default: all)",
           [](std::string_view v) { return ParseLayers(v).status(); })
      .Placeholder("LIST");
}

std::string Relative(double err, double ref) {
  return ref > 0 ? absl::StrFormat("%.5f", err / ref) : "-";
}

int Run(const FitCorrectionFlags& o, CommandContext& ctx) {
  if (!o.model.kv_correction.empty()) {
    ctx.err << ctx.command << ": --kv-correction cannot be given here (the fit sees the raw "
            << "quantized-cache output)\n";
    return kExitUsage;
  }
  absl::StatusOr<std::string> read = ReadWholeFile(o.text);
  if (!read.ok()) return ReportFailure(ctx, read.status());
  if (read->empty()) return ReportFailure(ctx, absl::InvalidArgumentError(o.text + ": empty"));
  const std::vector<int64_t> layer_list = *ParseLayers(o.layers);
  const std::vector<double> ridges = *ParseRidges(o.ridge);
  const std::vector<int64_t> ranks = *ParseRanks(o.rank);
  if (ranks.size() > 1 && o.out.find("%r") == std::string::npos) {
    ctx.err << ctx.command << ": with several --rank values, --out must contain %r (the rank)\n";
    return kExitUsage;
  }
  if (ridges.size() > 1 && o.holdout_tokens == 0) {
    ctx.err << ctx.command << ": several --ridge values are chosen between on held-out tokens: "
            << "give --holdout-tokens\n";
    return kExitUsage;
  }

  // Rows go to the training statistics or, past --tokens, to the held-out ones.
  std::unique_ptr<AttnCorrectionStats> train, holdout;
  AttnCorrectionStats* sink = nullptr;
  std::vector<float> xs, ys;
  int64_t dim = 0;
  EngineConfig ecfg;
  ecfg.max_chunk_tokens = o.ctx;
  ecfg.attn_observer_exact_kv = o.ref_kv;
  ecfg.attn_observer = [&](const AttnObservation& obs) {
    if (sink == nullptr || !sink->collects(obs.layer)) return;
    // Only rows that read encoded blocks: the others have no error, and the engine leaves
    // them uncorrected.
    xs.clear();
    ys.clear();
    for (int64_t i = 0; i < obs.n; ++i) {
      if (!obs.reads_encoded[i]) continue;
      xs.insert(xs.end(), obs.attn + i * dim, obs.attn + (i + 1) * dim);
      ys.insert(ys.end(), obs.attn_exact + i * dim, obs.attn_exact + (i + 1) * dim);
    }
    sink->Add(obs.layer, static_cast<int64_t>(xs.size()) / dim, xs.data(), ys.data());
  };
  auto session = OpenModelSession(o.model, ecfg);
  if (!session.ok()) return ReportFailure(ctx, session.status());
  Engine& engine = *session->engine;
  const ModelConfig& mc = engine.model_config();
  dim = mc.n_heads * mc.head_dim;
  for (int64_t l : layer_list) {
    if (l >= mc.n_layers) {
      ctx.err << absl::StrFormat("%s: --layers names layer %d; the model has %d\n", ctx.command, l,
                                 mc.n_layers);
      return kExitUsage;
    }
  }
  if (o.ctx > mc.context_length) {
    ctx.err << absl::StrFormat("%s: --ctx %d exceeds the model's context length %d\n", ctx.command,
                               o.ctx, mc.context_length);
    return kExitUsage;
  }
  train = std::make_unique<AttnCorrectionStats>(mc.n_layers, dim, layer_list);
  if (o.holdout_tokens > 0) {
    holdout = std::make_unique<AttnCorrectionStats>(mc.n_layers, dim, layer_list);
  }

  auto ids = session->tokenizer->Encode(*read);
  if (!ids.ok()) return ReportFailure(ctx, ids.status());
  const int64_t n_train = std::min(o.tokens, static_cast<int64_t>(ids->size()));
  std::vector<int32_t> hold_ids(ids->begin() + n_train, ids->end());
  std::string hold_source = o.text;
  if (!o.holdout_text.empty()) {
    absl::StatusOr<std::string> hold_text = ReadWholeFile(o.holdout_text);
    if (!hold_text.ok()) return ReportFailure(ctx, hold_text.status());
    auto encoded = session->tokenizer->Encode(*hold_text);
    if (!encoded.ok()) return ReportFailure(ctx, encoded.status());
    hold_ids = std::move(*encoded);
    hold_source = o.holdout_text;
  }
  const int64_t n_hold = std::min(o.holdout_tokens, static_cast<int64_t>(hold_ids.size()));
  if (o.holdout_tokens > 0 && n_hold < o.ctx) {
    ctx.err << absl::StrFormat(
        "%s: %s has %d tokens left for held-out windows of %d (after %d calibration tokens)\n",
        ctx.command, hold_source, hold_ids.size(), o.ctx, o.holdout_text.empty() ? n_train : 0);
    return kExitUsage;
  }
  const int64_t windows = (n_train + o.ctx - 1) / o.ctx + (n_hold + o.ctx - 1) / o.ctx;
  ProgressReporter::Options po;
  po.label = "fit-correction";
  po.total = windows;
  po.unit = "window";
  ProgressReporter progress(po);
  std::vector<float> logits;
  int64_t done = 0;
  for (auto [source, count, stats] : {std::tuple{ids->data(), n_train, train.get()},
                                      std::tuple{hold_ids.data(), n_hold, holdout.get()}}) {
    sink = stats;
    for (int64_t start = 0; start < count; start += o.ctx) {
      const int64_t n = std::min(o.ctx, count - start);
      const SequenceId seq = engine.NewSequence();
      absl::Status s = engine.Forward(
          seq, std::span<const int32_t>(source + start, static_cast<size_t>(n)), false, &logits);
      (void)engine.Release(seq);
      if (!s.ok()) return ReportFailure(ctx, s);
      progress.Update(++done);
    }
  }
  sink = nullptr;
  progress.Finish();

  // The statistics serve every rank: one pass over the text, one file per rank.
  auto fit_rank = [&](int64_t rank, const std::string& out) -> int {
    AttnCorrection corr;
    corr.kv_spec = o.model.kv;
    corr.n_layers = mc.n_layers;
    corr.dim = dim;
    corr.rank = std::min(rank, dim);
    corr.layers.resize(mc.n_layers);
    AttnCorrectionFitOptions fo;
    fo.rank = rank;
    nlohmann::json report = nlohmann::json::array();
    double sums[5] = {};  // train ref, uncorrected, corrected; holdout uncorrected, corrected
    double hold_ref = 0;
    ctx.out << absl::StrFormat("%-5s %8s %8s %12s %12s %12s %12s\n", "layer", "rows", "ridge",
                               "train_before", "train_after", "hold_before", "hold_after");
    for (int64_t l = 0; l < mc.n_layers; ++l) {
      if (!train->collects(l)) continue;
      if (train->rows(l) < 2) {
        ctx.err << absl::StrFormat(
            "%s: layer %d saw %d rows that read quantized blocks; give more --tokens or a --ctx "
            "longer than the KV block\n",
            ctx.command, l, train->rows(l));
        return kExitUsage;
      }
      double best_error = 0, ridge = ridges[0];
      for (double r : ridges) {
        fo.ridge = r;
        auto fit = train->Fit(l, fo);
        if (!fit.ok()) return ReportFailure(ctx, fit.status());
        const double err = holdout ? holdout->Evaluate(l, *fit).corrected : 0.0;
        if (r == ridges[0] || err < best_error) {
          best_error = err;
          ridge = r;
          corr.layers[l] = std::move(*fit);
        }
      }
      // A layer whose held-out error the correction does not lower is left alone.
      const bool off = holdout && !(best_error < holdout->Evaluate(l, {}).uncorrected);
      if (off) corr.layers[l] = {};
      const AttnCorrectionError te = train->Evaluate(l, corr.layers[l]);
      nlohmann::json row = {{"layer", l}, {"rows", te.rows}, {"corrected", !off}};
      if (!off) row["ridge"] = ridge;
      row.update({{"train_before", te.uncorrected / te.reference},
                  {"train_after", te.corrected / te.reference}});
      sums[0] += te.reference;
      sums[1] += te.uncorrected;
      sums[2] += te.corrected;
      std::string hb = "-", ha = "-";
      if (holdout) {
        const AttnCorrectionError he = holdout->Evaluate(l, corr.layers[l]);
        hb = Relative(he.uncorrected, he.reference);
        ha = Relative(he.corrected, he.reference);
        hold_ref += he.reference;
        sums[3] += he.uncorrected;
        sums[4] += he.corrected;
        if (he.reference > 0) {
          row["holdout_before"] = he.uncorrected / he.reference;
          row["holdout_after"] = he.corrected / he.reference;
        }
      }
      report.push_back(row);
      ctx.out << absl::StrFormat("%-5d %8d %8s %12s %12s %12s %12s\n", l, te.rows,
                                 off ? "off" : absl::StrFormat("%g", ridge),
                                 Relative(te.uncorrected, te.reference),
                                 Relative(te.corrected, te.reference), hb, ha);
    }
    const int64_t corrected_layers = std::count_if(
        corr.layers.begin(), corr.layers.end(), [](const LowRankAdapter& a) { return !a.empty(); });
    if (corrected_layers == 0) {
      return ReportFailure(ctx, absl::FailedPreconditionError(
                                    "the correction lowers the held-out error of no layer; "
                                    "nothing written (try more --tokens or a larger --ridge)"));
    }
    corr.metadata = {
        {"model", session->path},
        {"text", o.text},
        {"tokens", std::to_string(n_train)},
        {"ctx", std::to_string(o.ctx)},
        {"ridge", o.ridge},
        {"ref_kv", o.ref_kv},
        {"fit", "ridge regression of the residual, reduced to rank by its predictions"},
        {"error", report.dump()}};
    if (absl::Status s = WriteAttnCorrection(out, corr); !s.ok()) return ReportFailure(ctx, s);
    // Read it back the way --kv-correction will, so a file that does not load is never left.
    auto check = ReadAttnCorrection(out);
    if (!check.ok()) return ReportFailure(ctx, check.status());
    ctx.out << absl::StrFormat(
        "fitted rank-%d corrections for %d layers on %d tokens of %s (--kv %s towards %s); "
        "relative attention-output error %s -> %s on them",
        corr.rank, corrected_layers, n_train, o.text, o.model.kv, o.ref_kv,
        Relative(sums[1], sums[0]), Relative(sums[2], sums[0]));
    if (holdout) {
      ctx.out << absl::StrFormat(", %s -> %s on %d held-out tokens of %s",
                                 Relative(sums[3], hold_ref), Relative(sums[4], hold_ref), n_hold,
                                 hold_source);
    }
    ctx.out << absl::StrFormat("\nwrote %s; use it as --kv %s --kv-correction %s\n", out,
                               o.model.kv, out);
    return kExitOk;
  };
  for (int64_t rank : ranks) {
    std::string out = o.out;
    if (ranks.size() > 1) out.replace(out.find("%r"), 2, std::to_string(rank));
    if (const int rc = fit_rank(rank, out); rc != kExitOk) return rc;
  }
  return kExitOk;
}

}  // namespace

Subcommand FitCorrectionSubcommand() {
  return MakeSubcommand<FitCorrectionFlags>(
      "fit-correction",
      "fit low-rank attention-output corrections for a quantized KV cache (--kv-correction)",
      Define, Run);
}

}  // namespace quantkv::launcher
