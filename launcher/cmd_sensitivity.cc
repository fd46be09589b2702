// `quantkv sensitivity`: measures, layer by layer, what storing only that layer's K (or V)
// with each candidate codec costs (ΔPPL, KL, top-1 against the all-base run) on a short
// calibration text, plus a cheap per-KV-head proxy, and writes a sensitivity file for
// `quantkv kv-allocate` (format: runtime/kv/kv_sensitivity_file.h) and optionally a plot.
#include <spawn.h>
#include <sys/wait.h>

#include <filesystem>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "kernels/kv_codec.h"
#include "launcher/commands.h"
#include "launcher/model_session.h"
#include "launcher/progress.h"
#include "launcher/read_file.h"
#include "nlohmann/json.hpp"
#include "runtime/eval/kv_sensitivity.h"

extern char** environ;

namespace quantkv::launcher {
namespace {

struct SensitivityFlags {
  ModelFlags model;
  std::string text;
  std::string out;
  std::string plot;
  int64_t ctx = 512;
  int64_t chunks = 1;
  std::string bits;
  std::string codec_template;
  std::string k_template;
  std::string v_template;
  std::string layers;
  std::string head_proxy;
  int64_t proxy_ctx = 128;
  int64_t proxy_chunks = 1;
  int64_t caches_per_engine = 16;
};

absl::StatusOr<std::vector<int>> ParseBits(std::string_view text) {
  std::vector<int> bits;
  for (absl::string_view part : absl::StrSplit(absl::string_view(text.data(), text.size()), ',')) {
    int b = 0;
    if (!absl::SimpleAtoi(part, &b) || (b != 2 && b != 3 && b != 4 && b != 8 && b != 16)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("'%s' is not a bit width (want a list of 2, 3, 4, 8, 16)", part));
    }
    bits.push_back(b);
  }
  return bits;
}

// "0,3,5-7" -> {0, 3, 5, 6, 7}; empty: all layers.
absl::StatusOr<std::vector<int64_t>> ParseLayers(std::string_view text) {
  std::vector<int64_t> layers;
  if (text.empty()) return layers;
  for (absl::string_view part : absl::StrSplit(absl::string_view(text.data(), text.size()), ',')) {
    std::vector<absl::string_view> range = absl::StrSplit(part, absl::MaxSplits('-', 1));
    int64_t lo = 0, hi = 0;
    if (!absl::SimpleAtoi(range[0], &lo) || lo < 0 ||
        (range.size() == 2 && (!absl::SimpleAtoi(range[1], &hi) || hi < lo))) {
      return absl::InvalidArgumentError(
          absl::StrFormat("'%s' is not a layer or range (want e.g. 0,3,5-7)", part));
    }
    if (range.size() == 1) hi = lo;
    for (int64_t l = lo; l <= hi; ++l) layers.push_back(l);
  }
  return layers;
}

// The codec a template names at `bits`: "int{b}:g64:asym" at 4 -> "int4:g64:asym"; 16 is fp16.
absl::StatusOr<std::string> CodecFor(const std::string& tmpl, int bits) {
  if (bits == 16) return std::string("fp16");
  const std::string codec = absl::StrReplaceAll(tmpl, {{"{b}", absl::StrCat(bits)}});
  if (absl::Status s = kernels::ParseKvCodecSpec(codec).status(); !s.ok()) return s;
  return codec;
}

absl::Status CheckTemplate(std::string_view t) {
  if (t.empty()) return absl::OkStatus();
  if (t.find("{b}") == std::string_view::npos) {
    return absl::InvalidArgumentError(
        "must contain {b} where the bit width goes (e.g. int{b}:g64:asym)");
  }
  return CodecFor(std::string(t), 4).status();
}

void Define(FlagSet& f, SensitivityFlags& o) {
  DefineModelFlags(f, o.model);
  f.Path("text", &o.text, "", "UTF-8 calibration text (not the evaluation text)", PathKind::kFile)
      .Required();
  f.String("out", &o.out, "", "sensitivity file to write (JSON, for kv-allocate)")
      .Placeholder("FILE")
      .Required();
  f.String("plot", &o.plot, "",
           "also draw the per-layer sensitivities to this PNG (needs python3 with matplotlib; "
           "skipped with a warning otherwise)")
      .Placeholder("PNG");
  f.Int<int64_t>("ctx", &o.ctx, 512, "window length in tokens (the second half is scored)",
                 {.min = 8, .max = 1 << 20});
  f.Int<int64_t>("chunks", &o.chunks, 1, "windows per run (at most what the text holds)",
                 {.min = 1, .max = 1 << 20});
  f.String("bits", &o.bits, "8,4,2", "candidate bit widths (2, 3, 4, 8; 16 means fp16)",
           [](std::string_view v) { return ParseBits(v).status(); })
      .Placeholder("LIST");
  f.String("codec-template", &o.codec_template, "int{b}:g64:asym",
           "candidate codec with {b} for the bit width, for K and V", CheckTemplate)
      .Placeholder("CODEC");
  f.String("k-codec-template", &o.k_template, "",
           "keys' template instead (e.g. int{b}:chan for KIVI keys; pair with --kv "
           "fp16,block=128)",
           CheckTemplate)
      .Placeholder("CODEC");
  f.String("v-codec-template", &o.v_template, "", "values' template instead", CheckTemplate)
      .Placeholder("CODEC");
  f.String("layers", &o.layers, "", "layers to measure, e.g. 0,3,5-7 (default: all)",
           [](std::string_view v) { return ParseLayers(v).status(); })
      .Placeholder("LIST");
  f.Choice("head-proxy", &o.head_proxy, "mse", {"mse", "kl", "none"},
           "per-KV-head proxy: mse (codec reconstruction error of the head's rows, free), kl "
           "(KL with only that head changed on --proxy-ctx tokens; costs a run per head, K|V "
           "and width) or none");
  f.Int<int64_t>("proxy-ctx", &o.proxy_ctx, 128, "window of the per-head kl runs",
                 {.min = 8, .max = 1 << 20});
  f.Int<int64_t>("proxy-chunks", &o.proxy_chunks, 1, "windows of the per-head kl runs",
                 {.min = 1, .max = 1 << 20});
  f.Int<int64_t>("caches-per-engine", &o.caches_per_engine, 16,
                 "configurations measured side by side in one loaded engine (memory: about one "
                 "fp32 window of KV each)",
                 {.min = 1, .max = 1024});
}

// The source tree's plot script, found from the build's record of it.
std::string PlotScript() {
#ifdef QUANTKV_SOURCE_TREE
  return std::string(QUANTKV_SOURCE_TREE) + "/scripts/plot_kv_sensitivity.py";
#else
  return "scripts/plot_kv_sensitivity.py";
#endif
}

// Runs python3 on the plot script (no shell); its exit status, or -1 if it did not start.
int RunPlot(const std::string& script, const std::string& json, const std::string& png) {
  std::vector<std::string> args = {"python3", script, json, png};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  if (posix_spawnp(&pid, "python3", nullptr, nullptr, argv.data(), environ) != 0) return -1;
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

int Run(const SensitivityFlags& o, CommandContext& ctx) {
  absl::StatusOr<std::string> read = ReadWholeFile(o.text);
  if (!read.ok()) return ReportFailure(ctx, read.status());
  if (read->empty()) return ReportFailure(ctx, absl::InvalidArgumentError(o.text + ": empty"));

  KvSensitivityOptions opt;
  opt.base = o.model.kv;
  opt.ctx = o.ctx;
  opt.chunks = o.chunks;
  opt.head_proxy = o.head_proxy;
  opt.proxy_ctx = o.proxy_ctx;
  opt.proxy_chunks = o.proxy_chunks;
  opt.caches_per_engine = o.caches_per_engine;
  opt.layers = *ParseLayers(o.layers);
  const std::vector<int> bits = *ParseBits(o.bits);  // checked by the flag
  std::map<std::string, std::string> flag_of;        // codec -> the flag that made it
  for (int b : bits) {
    for (auto [tmpl, dst, flag] :
         {std::tuple{o.k_template.empty() ? o.codec_template : o.k_template, &opt.k_codecs,
                     o.k_template.empty() ? "codec-template" : "k-codec-template"},
          std::tuple{o.v_template.empty() ? o.codec_template : o.v_template, &opt.v_codecs,
                     o.v_template.empty() ? "codec-template" : "v-codec-template"}}) {
      absl::StatusOr<std::string> c = CodecFor(tmpl, b);
      if (!c.ok()) {
        ctx.err << absl::StrFormat("%s: --%s %s at --bits %d: %s\n", ctx.command, flag, tmpl, b,
                                   c.status().message());
        return kExitUsage;
      }
      dst->push_back(*c);
      flag_of[*c] = flag;
    }
  }

  // One session for the tokenizer and the model's shape; the runs open their own engines.
  ModelFlags probe_flags = o.model;
  probe_flags.kv_budget_mb = 16;
  EngineConfig probe_config;
  probe_config.pack_weights = false;
  auto probe = OpenModelSession(probe_flags, probe_config);
  if (!probe.ok()) return ReportFailure(ctx, probe.status());
  const ModelConfig mc = probe->engine->model_config();
  for (auto [value, flag] : {std::pair{o.ctx, "ctx"}, std::pair{o.proxy_ctx, "proxy-ctx"}}) {
    if (value > mc.context_length) {
      ctx.err << absl::StrFormat("%s: --%s %d exceeds the model's context length %d\n", ctx.command,
                                 flag, value, mc.context_length);
      return kExitUsage;
    }
  }
  for (int64_t l : opt.layers) {
    if (l >= mc.n_layers) {
      ctx.err << absl::StrFormat("%s: --layers %s: layer %d is past the model's %d layers\n",
                                 ctx.command, o.layers, l, mc.n_layers);
      return kExitUsage;
    }
  }
  // Candidates must fit the model's heads and the base's block (e.g. gN must divide head_dim).
  const int64_t block = probe->engine->kv_cache().policy().block_tokens;
  for (const auto& [codec, flag] : flag_of) {
    absl::Status fits =
        kernels::KvCodec::Create(*kernels::ParseKvCodecSpec(codec), mc.head_dim, block).status();
    if (!fits.ok()) {
      ctx.err << absl::StrFormat("%s: --%s gives %s, which does not fit this model: %s\n",
                                 ctx.command, flag, codec, fits.message());
      return kExitUsage;
    }
  }
  auto ids = probe->tokenizer->Encode(*read);
  if (!ids.ok()) return ReportFailure(ctx, ids.status());
  if (static_cast<int64_t>(ids->size()) < o.ctx) {
    ctx.err << absl::StrFormat("%s: %s has %d tokens, fewer than one window (--ctx %d)\n",
                               ctx.command, o.text, ids->size(), o.ctx);
    return kExitUsage;
  }
  if (probe->tokenizer->spec().add_bos) opt.bos_id = probe->tokenizer->bos_id();
  const std::string model_path = probe->path;
  probe->engine.reset();

  KvEngineFactory factory =
      [&](const EngineConfig& cfg) -> absl::StatusOr<std::unique_ptr<Engine>> {
    ModelFlags f = o.model;
    f.kv = cfg.kv_spec;
    f.kv_budget_mb = std::max<int64_t>(1, (cfg.kv_max_bytes + (1 << 20) - 1) >> 20);
    absl::StatusOr<ModelSession> s = OpenModelSession(f, cfg);
    if (!s.ok()) return s.status();
    return std::move(s->engine);
  };
  std::unique_ptr<ProgressReporter> progress;
  std::string stage;
  opt.progress = [&](const std::string& st, int64_t done, int64_t total) {
    if (st != stage) {
      if (progress) progress->Finish();
      stage = st;
      ProgressReporter::Options po;
      po.label = "sensitivity " + st;
      po.total = total;
      po.unit = "run";
      progress = std::make_unique<ProgressReporter>(po);
    }
    progress->Update(done);
  };
  absl::StatusOr<KvSensitivity> s = MeasureKvSensitivity(factory, *ids, opt);
  if (progress) progress->Finish();
  if (!s.ok()) return ReportFailure(ctx, s.status());
  s->model = std::filesystem::path(model_path).filename().string();
  s->text = o.text;
  if (absl::Status w = WriteKvSensitivity(o.out, *s); !w.ok()) return ReportFailure(ctx, w);
  // Read it back as kv-allocate will, so a file that does not load is never left silently.
  if (absl::Status r = ReadKvSensitivity(o.out).status(); !r.ok()) return ReportFailure(ctx, r);

  ctx.out << absl::StrFormat(
      "base %s: PPL %.4f over %d tokens (%d x %d, second halves); KL vs base per layer:\n", s->base,
      s->baseline_ppl, s->tokens_scored, s->chunks, s->ctx);
  ctx.out << absl::StrFormat("%5s", "layer");
  for (const char* kind : {"K", "V"}) {
    for (const std::string& c : kind[0] == 'K' ? opt.k_codecs : opt.v_codecs) {
      ctx.out << absl::StrFormat(" %16s", std::string(kind) + " " + c.substr(0, c.find(':')));
    }
  }
  ctx.out << "\n";
  for (const KvLayerSensitivity& l : s->layers) {
    ctx.out << absl::StrFormat("%5d", l.layer);
    for (const auto* ms : {&l.k, &l.v}) {
      for (const KvSensitivityMeasure& m : *ms) ctx.out << absl::StrFormat(" %16.6f", m.kl);
    }
    ctx.out << "\n";
  }
  const nlohmann::json report = nlohmann::json::parse(s->report_json);
  for (const auto& [name, r] : report["spearman"].items()) {
    if (name == "full_kl") continue;
    ctx.out << absl::StrFormat(
        "head proxy %s, summed per layer: Spearman vs full ΔPPL %.3f, vs full KL %.3f (mean "
        "over K/V x widths)\n",
        name, r["mean_vs_dppl"].get<double>(), r["mean_vs_kl"].get<double>());
  }
  ctx.out << absl::StrFormat(
      "full KL vs full ΔPPL: Spearman %.3f; %d layer runs%s in %.1f s; wrote %s\n",
      report["spearman"]["full_kl"]["mean_vs_dppl"].get<double>(),
      report["runs"]["layers"].get<int64_t>(),
      o.head_proxy == "kl"
          ? absl::StrFormat(" + %d head runs", report["runs"]["heads"].get<int64_t>())
          : "",
      s->seconds, o.out);
  if (!o.plot.empty()) {
    const std::string script = PlotScript();
    const int rc = RunPlot(script, o.out, o.plot);
    if (rc == 0) {
      ctx.out << "wrote " << o.plot << "\n";
    } else {
      ctx.err << absl::StrFormat(
          "%s: warning: no plot (python3 %s exited with %d; it needs matplotlib); the "
          "sensitivity file is written. Draw it later with: python3 %s %s %s\n",
          ctx.command, script, rc, script, o.out, o.plot);
    }
  }
  return kExitOk;
}

}  // namespace

Subcommand SensitivitySubcommand() {
  return MakeSubcommand<SensitivityFlags>(
      "sensitivity",
      "KV quantization sensitivity per layer and KV head, for kv-allocate",
      Define, Run);
}

}  // namespace quantkv::launcher
