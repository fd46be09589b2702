// `quantkv generate`: stream a completion of a prompt (optionally chat-templated).
#include <chrono>
#include <cstdio>

#include "absl/strings/str_format.h"
#include "launcher/commands.h"
#include "launcher/model_session.h"
#include "launcher/read_file.h"
#include "runtime/engine/sampler.h"
#include "runtime/tokenizer/chat_template.h"

namespace quantkv::launcher {
namespace {

struct GenerateOptions {
  ModelFlags model;
  std::string prompt;
  std::string prompt_file;
  std::string system;
  bool chat = false;
  int max_tokens = 128;
  float temperature = 0.0f;
  int top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repeat_penalty = 1.0f;
  int64_t seed = 0;
  bool ignore_eos = false;
};

void Define(FlagSet& f, GenerateOptions& o) {
  DefineModelFlags(f, o.model, {.tensor_parallel = true});
  f.String("prompt", &o.prompt, "",
           "text to continue (with --chat: the user message); this or --prompt-file is required")
      .Placeholder("TEXT");
  // A command-line argument holds at most 128 KiB on Linux (MAX_ARG_STRLEN): long prompts
  // come from a file.
  f.Path("prompt-file", &o.prompt_file, "",
         "read the prompt from this UTF-8 file instead of --prompt (long prompts)",
         PathKind::kFile);
  f.Bool("chat", &o.chat, "wrap the prompt in the model's chat template");
  f.String("system", &o.system, "", "system message for --chat (default: the template's own)");
  f.Int("max-tokens", &o.max_tokens, 128, "most new tokens to generate",
        {.min = 1, .max = 1 << 20});
  f.Float("temperature", &o.temperature, 0.0f, "sampling temperature; 0 is greedy",
          {.min = 0.0, .max = 100.0});
  f.Int("top-k", &o.top_k, 0, "keep the k most likely tokens (0: all)", {.min = 0});
  f.Float("top-p", &o.top_p, 1.0f, "nucleus sampling mass",
          {.min = 0.0, .max = 1.0, .min_exclusive = true});
  f.Float("min-p", &o.min_p, 0.0f, "drop tokens below min-p times the top probability",
          {.min = 0.0, .max = 1.0, .max_exclusive = true});
  f.Float("repeat-penalty", &o.repeat_penalty, 1.0f, "penalty for tokens already seen (1: off)",
          {.min = 0.0, .max = 10.0, .min_exclusive = true});
  f.Int<int64_t>("seed", &o.seed, 0, "random seed for sampling", {.min = 0});
  f.Bool("ignore-eos", &o.ignore_eos, "keep generating past end-of-turn tokens");
}

int Run(GenerateOptions o, CommandContext& ctx) {
  if (std::optional<int> exit = TakePromptFile(o.prompt_file, &o.prompt, ctx)) return *exit;
  if (!o.prompt_file.empty() && o.prompt.empty()) {
    ctx.err << ctx.command << ": --prompt-file " << o.prompt_file << " is empty\n";
    return kExitUsage;
  }
  if (o.prompt.empty()) {
    ctx.err << ctx.command << ": --prompt (or --prompt-file) is required and must not be empty\n";
    return kExitUsage;
  }
  auto session = OpenModelSession(o.model);
  if (!session.ok()) return ReportFailure(ctx, session.status());
  Engine& engine = *session->engine;
  const Tokenizer& tok = *session->tokenizer;
  // Under --tp every rank runs the same steps and samples the same tokens (the logits are
  // bit-identical and the sampler seeded alike); only rank 0 prints them.
  std::ostream& out = session->ResultStream(ctx.out);
  const bool report = session->rank() == 0;

  std::string text = o.prompt;
  if (o.chat) {
    std::vector<ChatMessage> messages;
    if (!o.system.empty()) messages.push_back({"system", o.system});
    messages.push_back({"user", o.prompt});
    auto templated = ApplyChatTemplate(tok.spec(), messages, /*add_generation_prompt=*/true);
    if (!templated.ok()) return ReportFailure(ctx, templated.status());
    text = *templated;
  }
  auto ids = tok.Encode(text, {.add_special = true, .parse_special = o.chat});
  if (!ids.ok()) return ReportFailure(ctx, ids.status());
  if (ids->empty()) {
    ctx.err << ctx.command << ": the prompt encodes to no tokens\n";
    return kExitUsage;
  }
  const int64_t ctx_len = engine.model_config().context_length;
  if (static_cast<int64_t>(ids->size()) + o.max_tokens > ctx_len) {
    ctx.err << absl::StrFormat(
        "%s: the prompt (%d tokens) plus --max-tokens %d exceeds the model's context of %d\n",
        ctx.command, ids->size(), o.max_tokens, ctx_len);
    return kExitUsage;
  }
  SamplingParams sp;
  sp.temperature = o.temperature;
  sp.top_k = o.top_k;
  sp.top_p = o.top_p;
  sp.min_p = o.min_p;
  sp.repetition_penalty = o.repeat_penalty;
  sp.seed = static_cast<uint64_t>(o.seed);
  if (absl::Status s = ValidateSamplingParams(sp); !s.ok()) return ReportFailure(ctx, s);
  Sampler sampler(sp);

  using Clock = std::chrono::steady_clock;
  const SequenceId seq = engine.NewSequence();
  std::vector<float> logits;
  const auto t0 = Clock::now();
  if (absl::Status s = engine.Forward(seq, *ids, false, &logits); !s.ok()) {
    return ReportSessionFailure(ctx, *session, s);
  }
  const auto t1 = Clock::now();
  StreamDecoder stream(tok, {.skip_special = true});
  std::vector<int32_t> history = *ids;
  int generated = 0;
  std::string stop_reason = "length";
  while (generated < o.max_tokens) {
    const int32_t next = sampler.Sample(logits, history);
    ++generated;
    history.push_back(next);
    if (!o.ignore_eos && tok.IsEog(next)) {
      stop_reason = "end of turn";
      break;
    }
    auto piece = stream.Push(next);
    if (!piece.ok()) return ReportSessionFailure(ctx, *session, piece.status());
    out << *piece << std::flush;
    if (generated == o.max_tokens) break;
    logits.clear();
    if (absl::Status s = engine.Forward(seq, {&next, 1}, false, &logits); !s.ok()) {
      return ReportSessionFailure(ctx, *session, s);
    }
  }
  out << stream.Flush() << "\n";
  const auto t2 = Clock::now();
  const double prefill_s = std::chrono::duration<double>(t1 - t0).count();
  const double decode_s = std::chrono::duration<double>(t2 - t1).count();
  if (!report) return kExitOk;
  ctx.err << absl::StrFormat(
      "[prompt %d tokens in %.0f ms (%.1f tok/s); generated %d tokens in %.0f ms (%.1f tok/s); "
      "stop: %s; KV %s, %.1f bits/element%s]\n",
      ids->size(), prefill_s * 1e3, ids->size() / std::max(prefill_s, 1e-9), generated,
      decode_s * 1e3, generated / std::max(decode_s, 1e-9), stop_reason, o.model.kv,
      engine.kv_cache().BitsPerElementAt(static_cast<int64_t>(history.size())),
      o.model.tp > 1 ? absl::StrFormat("; tensor parallel over %d ranks, %.0f ms in all-reduces",
                                       o.model.tp, engine.comm_ns_total() * 1e-6)
                     : "");
  return kExitOk;
}

}  // namespace

Subcommand GenerateSubcommand() {
  return MakeSubcommand<GenerateOptions>(
      "generate", "generate text from a prompt, streamed as it is produced", Define, Run);
}

}  // namespace quantkv::launcher
