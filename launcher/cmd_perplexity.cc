// `quantkv perplexity`: llama.cpp-style windowed perplexity of a text file, optionally
// against a saved baseline (KL divergence, top-1 agreement).
#include <fstream>
#include <sstream>

#include "absl/strings/str_format.h"
#include "launcher/commands.h"
#include "launcher/model_session.h"
#include "launcher/progress.h"
#include "launcher/read_file.h"
#include "nlohmann/json.hpp"
#include "runtime/eval/perplexity.h"

namespace quantkv::launcher {
namespace {

struct PerplexityFlags {
  ModelFlags model;
  std::string text;
  int64_t ctx = 512;
  int64_t chunks = 0;
  bool json = false;
  int64_t position_buckets = 0;
  std::string kl_base;
  std::string save_logits;
  int64_t step_tokens = 0;
  bool requantize_all = false;
};

void Define(FlagSet& f, PerplexityFlags& o) {
  DefineModelFlags(f, o.model, {.tensor_parallel = true});
  f.Path("text", &o.text, "", "UTF-8 text file to score", PathKind::kFile).Required();
  f.Int<int64_t>("ctx", &o.ctx, 512, "window length in tokens (the second half is scored)",
                 {.min = 8, .max = 1 << 20});
  f.Int<int64_t>("chunks", &o.chunks, 0, "windows to score (0: all that fit)", {.min = 0});
  f.Bool("json", &o.json, "print one JSON object instead of text");
  f.Bool("requantize-all", &o.requantize_all,
         "with --kv-floor: after every step, re-encode every full block pair of the window to "
         "the floor (the quality cost of the floor at full memory pressure)");
  f.Int<int64_t>("position-buckets", &o.position_buckets, 0,
                 "also report PPL of every window position in N equal position ranges (how "
                 "quality changes along the context)",
                 {.min = 0, .max = 1 << 16});
  f.String("kl-base", &o.kl_base, "", "baseline from --save-logits: report KL and top-1 agreement")
      .Placeholder("FILE");
  f.String("save-logits", &o.save_logits, "", "record this run's distributions as a baseline")
      .Placeholder("FILE");
  f.Int<int64_t>("step-tokens", &o.step_tokens, 0,
                 "run each window in engine steps of this many tokens (chunked prefill, as a "
                 "server does; what --kv-promote decides at the end of a step reaches the "
                 "steps after it); 0: the whole window in one step",
                 {.min = 0, .max = 1 << 20});
}

int Run(const PerplexityFlags& o, CommandContext& ctx) {
  absl::StatusOr<std::string> read = ReadWholeFile(o.text);
  if (!read.ok()) return ReportFailure(ctx, read.status());
  const std::string text = std::move(*read);
  if (text.empty()) return ReportFailure(ctx, absl::InvalidArgumentError(o.text + ": empty"));

  LogitsBaseline base;
  PerplexityOptions opt;
  if (!o.kl_base.empty()) {
    auto b = ReadLogitsBaseline(o.kl_base);
    if (!b.ok()) return ReportFailure(ctx, b.status());
    base = std::move(*b);
    opt.kl_base = &base;
  }
  EngineConfig ecfg;
  ecfg.max_chunk_tokens = o.step_tokens > 0 ? std::min(o.step_tokens, o.ctx) : o.ctx;
  auto session = OpenModelSession(o.model, ecfg);
  if (!session.ok()) return ReportFailure(ctx, session.status());
  // Under --tp every rank scores the same windows; only rank 0 prints and writes files.
  std::ostream& out = session->ResultStream(ctx.out);
  const bool report = session->rank() == 0;
  if (o.ctx > session->engine->model_config().context_length) {
    ctx.err << absl::StrFormat("%s: --ctx %d exceeds the model's context length %d\n", ctx.command,
                               o.ctx, session->engine->model_config().context_length);
    return kExitUsage;
  }
  auto ids = session->tokenizer->Encode(text);
  if (!ids.ok()) return ReportFailure(ctx, ids.status());
  if (static_cast<int64_t>(ids->size()) < o.ctx) {
    ctx.err << absl::StrFormat("%s: %s has %d tokens, fewer than one window (--ctx %d)\n",
                               ctx.command, o.text, ids->size(), o.ctx);
    return kExitUsage;
  }
  const int64_t available = static_cast<int64_t>(ids->size()) / o.ctx;
  const int64_t chunks = o.chunks > 0 ? std::min(o.chunks, available) : available;
  opt.ctx = o.ctx;
  opt.max_chunks = chunks;
  opt.position_buckets = o.position_buckets;
  if (o.requantize_all && o.model.kv_floor.empty()) {
    ctx.err << ctx.command << ": --requantize-all needs --kv-floor\n";
    return kExitUsage;
  }
  opt.requantize_all = o.requantize_all;
  if (session->tokenizer->spec().add_bos) opt.bos_id = session->tokenizer->bos_id();
  LogitsBaseline save;
  if (!o.save_logits.empty()) opt.save_logits = &save;
  ProgressReporter::Options progress_options;
  progress_options.label = "perplexity";
  progress_options.total = chunks;
  progress_options.unit = "chunk";
  ProgressReporter progress(progress_options, &session->ResultStream(std::cerr));
  opt.progress = [&](int64_t done, int64_t) { progress.Update(done); };
  auto r = ComputePerplexity(*session->engine, *ids, opt);
  progress.Finish();
  if (!r.ok()) return ReportSessionFailure(ctx, *session, r.status());
  if (!o.save_logits.empty() && report) {
    if (absl::Status s = WriteLogitsBaseline(o.save_logits, save); !s.ok()) {
      return ReportFailure(ctx, s);
    }
  }
  // Every window holds ctx tokens at its end: that is the cache the numbers describe.
  const KvCache& kv = session->engine->kv_cache();
  const double kv_bits = kv.BitsPerElementAt(o.ctx);
  const double kv_bytes = kv.BytesPerTokenAt(o.ctx);
  if (o.json) {
    nlohmann::json j = {{"model", session->path},
                        {"text", o.text},
                        {"kv", o.model.kv},
                        {"ctx", o.ctx},
                        {"chunks", r->chunks},
                        {"ppl", r->ppl},
                        {"ppl_stderr", r->ppl_stderr},
                        {"mean_nll", r->mean_nll},
                        {"tokens_scored", r->tokens_scored},
                        {"tokens_per_s", r->tokens_per_s},
                        {"seconds", r->seconds},
                        {"kv_policy", kv.policy().name},
                        {"step_tokens", o.step_tokens},
                        {"kv_bits_per_element", kv_bits},
                        {"kv_bytes_per_token", kv_bytes},
                        {"kv_compression_vs_fp16", 16.0 / kv_bits},
                        {"tp", o.model.tp},
                        // rank 0's time in the all-reduces, waiting for slower ranks included
                        {"tp_comm_seconds", session->engine->comm_ns_total() * 1e-9},
                        // bytes per token above: rank 0's share of the KV heads
                        {"kv_heads_rank0", kv.config().n_kv_heads}};
    if (o.model.tp > 1 && session->engine->model_config().moe.enabled()) {
      // Rank 0's bytes in the MoE layers' collectives (dispatch, combine, all-gather, or the
      // all-reduce form's), under --ep-payload's encoding.
      j["moe_bytes_sent_rank0"] = session->engine->moe_bytes_sent_total();
      j["ep_dispatch"] = o.model.ep_dispatch;
      j["ep_payload"] = o.model.ep_payload;
    }
    // Adapters change the model being measured: name them beside the cache.
    if (!o.model.kv_correction.empty()) j["kv_correction"] = o.model.kv_correction;
    if (!o.model.lora.empty()) j["lora"] = o.model.lora;
    if (session->compressed_comm != nullptr) {
      // Rank 0's all-reduce traffic (bytes it sent to its peers), raw fp32 vs compressed.
      const CompressedCommStats& cs = session->compressed_comm->stats();
      j["comm_compress"] = session->compressed_comm->config().codec.ToString();
      j["comm_allreduces"] = cs.calls;
      j["comm_allreduces_compressed"] = cs.compressed_calls;
      j["comm_bytes_raw"] = cs.raw_bytes;
      j["comm_bytes_wire"] = cs.wire_bytes;
      j["comm_seconds"] = cs.comm_ns * 1e-9;
      j["comm_codec_seconds"] = cs.codec_ns * 1e-9;
    }
    if (!r->buckets.empty()) {
      nlohmann::json buckets = nlohmann::json::array();
      for (const PositionBucket& b : r->buckets) {
        buckets.push_back(
            {{"begin", b.begin}, {"end", b.end}, {"tokens", b.tokens}, {"ppl", b.ppl}});
      }
      j["position_buckets"] = buckets;
    }
    if (r->has_kl) {
      j["kl_mean"] = r->kl_mean;
      j["kl_stderr"] = r->kl_stderr;
      j["top1_agreement"] = r->top1_agreement;
    }
    out << j.dump() << "\n";
    return kExitOk;
  }
  out << absl::StrFormat(
      "PPL = %.4f +/- %.4f over %d scored tokens (%d windows of %d, second halves)\n"
      "%.1f tokens/s; KV %s: %.2f bits/element (%.2fx smaller than fp16), %.0f bytes/token "
      "at %d tokens\n",
      r->ppl, r->ppl_stderr, r->tokens_scored, r->chunks, o.ctx, r->tokens_per_s, o.model.kv,
      kv_bits, 16.0 / kv_bits, kv_bytes, o.ctx);
  if (const std::string experts = ExpertPrecisionSummary(*session->engine); !experts.empty()) {
    out << experts << "\n";
  }
  if (o.model.tp > 1) {
    // The cache is sharded by KV head: the byte counts above are rank 0's share.
    out << absl::StrFormat("tensor parallel over %d ranks: rank 0 caches %d of %d KV heads\n",
                           o.model.tp, kv.config().n_kv_heads,
                           session->engine->model_config().n_kv_heads);
  }
  for (const PositionBucket& b : r->buckets) {
    out << absl::StrFormat("positions %6d-%-6d  PPL %9.4f over %d tokens\n", b.begin, b.end - 1,
                           b.ppl, b.tokens);
  }
  if (r->has_kl) {
    out << absl::StrFormat("KL vs baseline = %.6f +/- %.6f, top-1 agreement = %.2f%%\n", r->kl_mean,
                           r->kl_stderr, 100.0 * r->top1_agreement);
  }
  return kExitOk;
}

}  // namespace

Subcommand PerplexitySubcommand() {
  return MakeSubcommand<PerplexityFlags>(
      "perplexity",
      "perplexity of a text file (llama.cpp's windowed method), with KL vs a baseline", Define,
      Run);
}

}  // namespace quantkv::launcher
