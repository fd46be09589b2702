// `quantkv calibrate`: runs the model over calibration text with an exact (fp16) cache,
// records each layer's K and V rows, and writes a KV policy file with calibrated scales:
// static per-channel (or per-tensor) scales for `static` codecs, and MSE-optimal clip
// ratios for dynamic ones. Use the file as `--kv @FILE` on any command.
#include <fstream>
#include <sstream>

#include "absl/strings/str_format.h"
#include "launcher/commands.h"
#include "launcher/model_session.h"
#include "launcher/progress.h"
#include "launcher/read_file.h"
#include "nlohmann/json.hpp"
#include "runtime/kv/kv_calibration.h"

namespace quantkv::launcher {
namespace {

struct CalibrateFlags {
  ModelFlags model;
  std::string text;
  std::string out;
  std::string method;
  std::string granularity;
  double alpha = 0.999;
  int64_t tokens = 4096;
  int64_t ctx = 512;
};

void Define(FlagSet& f, CalibrateFlags& o) {
  DefineModelFlags(f, o.model, {.tensor_parallel = true});
  f.Path("text", &o.text, "", "UTF-8 calibration text (not the evaluation text)", PathKind::kFile)
      .Required();
  f.String("out", &o.out, "", "calibrated KV policy file to write (use as --kv @FILE)")
      .Placeholder("FILE")
      .Required();
  f.Choice("method", &o.method, "minmax", {"minmax", "percentile", "mse"},
           "scale search: min-max, the [1-alpha, alpha] quantiles, or the MSE-optimal clip "
           "ratio (also tunes the clip of dynamic codecs)");
  f.Choice("granularity", &o.granularity, "channel", {"channel", "tensor"},
           "static scales per channel or one per layer's K|V (the naive per-tensor baseline)");
  f.Float("alpha", &o.alpha, 0.999, "quantile kept by --method percentile",
          {.min = 0.5, .max = 1.0, .min_exclusive = true});
  f.Int<int64_t>("tokens", &o.tokens, 4096, "calibration tokens per layer",
                 {.min = 1, .max = 1 << 20});
  f.Int<int64_t>("ctx", &o.ctx, 512, "tokens per forward window", {.min = 1, .max = 1 << 20});
}

int Run(const CalibrateFlags& o, CommandContext& ctx) {
  absl::StatusOr<std::string> read = ReadWholeFile(o.text);
  if (!read.ok()) return ReportFailure(ctx, read.status());
  const std::string text = std::move(*read);
  if (text.empty()) return ReportFailure(ctx, absl::InvalidArgumentError(o.text + ": empty"));

  // The model runs with an exact cache: calibration must see the activations themselves.
  ModelFlags run_flags = o.model;
  run_flags.kv = "fp16";
  KvCalibrator* calibrator = nullptr;
  const Engine* engine = nullptr;
  bool pre_rope = false;
  std::vector<float> k_pre;
  EngineConfig ecfg;
  ecfg.max_chunk_tokens = o.ctx;
  // Under --tp every rank sees every KV head (gathered), so each calibrates the whole model
  // alike and rank 0 writes the file.
  ecfg.kv_observer_all_heads = true;
  ecfg.kv_observer = [&](int64_t layer, int64_t n, const int32_t* positions, const float* k,
                         const float* v) {
    if (calibrator == nullptr) return;
    if (!pre_rope) {
      calibrator->Add(layer, n, k, v);
      return;
    }
    // Pre-RoPE keys: calibrate what the cache encodes, the un-rotated key.
    const ModelConfig& c = engine->model_config();
    const int64_t d = c.head_dim;
    k_pre.assign(k, k + n * c.n_kv_heads * d);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t h = 0; h < c.n_kv_heads; ++h) {
        engine->rope().RotateRows(k_pre.data() + (t * c.n_kv_heads + h) * d, 1, positions[t],
                                  /*inverse=*/true);
      }
    }
    calibrator->Add(layer, n, k_pre.data(), v);
  };
  auto session = OpenModelSession(run_flags, ecfg);
  if (!session.ok()) return ReportFailure(ctx, session.status());
  engine = session->engine.get();
  const ModelConfig& mc = engine->model_config();

  KvCalibrationConfig cc;
  cc.n_layers = mc.n_layers;
  cc.n_kv_heads = mc.n_kv_heads;
  cc.head_dim = mc.head_dim;
  auto policy = ParseKvPolicy(o.model.kv, mc.n_layers);
  if (!policy.ok()) return ReportFailure(ctx, policy.status());
  cc.policy = *policy;
  auto method = ParseCalibrationMethod(o.method);
  if (!method.ok()) return ReportFailure(ctx, method.status());
  cc.method = *method;
  cc.alpha = o.alpha;
  cc.per_tensor = o.granularity == "tensor";
  cc.max_tokens = o.tokens;
  pre_rope = cc.policy.pre_rope_keys;
  auto cal = KvCalibrator::Create(cc);
  if (!cal.ok()) return ReportFailure(ctx, cal.status());
  calibrator = &*cal;

  auto ids = session->tokenizer->Encode(text);
  if (!ids.ok()) return ReportFailure(ctx, ids.status());
  const int64_t window = std::min(o.ctx, mc.context_length);
  const int64_t total = std::min<int64_t>(o.tokens, static_cast<int64_t>(ids->size()));
  if (total < cc.policy.block_tokens) {
    ctx.err << absl::StrFormat(
        "%s: %s has %d tokens, fewer than one KV block (%d); give a longer --text\n", ctx.command,
        o.text, ids->size(), cc.policy.block_tokens);
    return kExitUsage;
  }
  ProgressReporter::Options po;
  po.label = "calibrate";
  po.total = (total + window - 1) / window;
  po.unit = "window";
  // Only rank 0 reports progress (the others' stream drops it).
  ProgressReporter progress(po, &session->ResultStream(ctx.err));
  std::vector<float> logits;
  for (int64_t start = 0, w = 0; start < total; start += window, ++w) {
    const int64_t n = std::min(window, total - start);
    const SequenceId seq = session->engine->NewSequence();
    absl::Status s = session->engine->Forward(
        seq, std::span<const int32_t>(ids->data() + start, static_cast<size_t>(n)), false, &logits);
    (void)session->engine->Release(seq);
    if (!s.ok()) return ReportSessionFailure(ctx, *session, s);
    progress.Update(w + 1);
  }
  progress.Finish();

  auto calibrated = cal->Finish();
  if (!calibrated.ok()) return ReportFailure(ctx, calibrated.status());
  nlohmann::json prov = {{"model", session->path}, {"text", o.text},
                         {"tokens", total},        {"target", o.model.kv},
                         {"method", o.method},     {"granularity", o.granularity}};
  if (o.method == "percentile") prov["alpha"] = o.alpha;
  const std::string json = KvPolicyFileJson(*calibrated, prov.dump());
  if (session->rank() != 0) return kExitOk;  // rank 0 has the same result and writes it
  {
    std::ofstream out(o.out, std::ios::binary | std::ios::trunc);
    if (!out || !(out << json) || !out.flush()) {
      return ReportFailure(ctx, absl::PermissionDeniedError(o.out + ": cannot write"));
    }
  }
  // Read it back as a command would, so a file that does not load is never left behind
  // silently.
  auto check = ParseKvPolicy("@" + o.out, mc.n_layers);
  if (!check.ok()) return ReportFailure(ctx, check.status());
  ctx.out << absl::StrFormat(
      "calibrated %s on %d tokens of %s (%s, %s): %d layers with static scales, %d with "
      "fitted codebooks; wrote %s\n"
      "use it as --kv @%s\n",
      o.model.kv, total, o.text, o.method, o.granularity, calibrated->static_scales.size(),
      calibrated->codebooks.size(), o.out, o.out);
  return kExitOk;
}

}  // namespace

Subcommand CalibrateSubcommand() {
  return MakeSubcommand<CalibrateFlags>(
      "calibrate", "calibrate KV-cache scales on a text and write a policy file (--kv @FILE)",
      Define, Run);
}

}  // namespace quantkv::launcher
