#include "launcher/model_session.h"

#include <filesystem>
#include <thread>

#include "absl/strings/str_format.h"
#include "runtime/model/gguf_model.h"
#include "runtime/model/hf_model.h"
#include "runtime/kv/kv_policy.h"
#include "runtime/util/model_cache.h"
#include "runtime/util/status_macros.h"

namespace quantkv::launcher {

void DefineModelFlags(FlagSet& flags, ModelFlags& o) {
  flags.String("model", &o.model, "smollm2-135m",
               "GGUF file, HF model directory, or a known model name (see fetch-model --list)")
      .Placeholder("PATH|NAME");
  const int cores = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  flags.Int("threads", &o.threads, cores, "CPU threads for the forward pass", {.min = 1, .max = 256});
  std::string presets;
  for (const KvPreset& p : KvPresets()) presets += (presets.empty() ? "" : ", ") + p.name;
  flags.String("kv", &o.kv, "fp16",
               "KV cache policy: a preset (" + presets +
                   "), a spec like k=int4:chan,v=int4,sink=4,window=16, or @policy.json "
                   "(see `quantkv kv-presets`)",
               [](std::string_view v) { return ParseKvPolicy(v).status(); })
      .Placeholder("SPEC");
  flags.Int<int64_t>("kv-budget-mb", &o.kv_budget_mb, 1024,
                     "KV cache pool size in MiB (sets how many tokens fit)",
                     {.min = 1, .max = int64_t{1} << 20});
}

absl::StatusOr<ModelSession> OpenModelSession(const ModelFlags& flags, const EngineConfig& base) {
  ModelSession s;
  QKV_ASSIGN_OR_RETURN(std::filesystem::path path, ResolveModel(flags.model));
  s.path = path.string();
  std::unique_ptr<WeightSource> weights;
  if (std::filesystem::is_directory(path)) {
    QKV_ASSIGN_OR_RETURN(weights, OpenHfModelDir(s.path));
    const std::filesystem::path tok = path / "tokenizer.json";
    if (!std::filesystem::exists(tok)) {
      return absl::NotFoundError(
          absl::StrFormat("%s: no tokenizer.json in the model directory", s.path));
    }
    QKV_ASSIGN_OR_RETURN(s.tokenizer, Tokenizer::FromJson(tok.string()));
  } else {
    QKV_ASSIGN_OR_RETURN(std::unique_ptr<GgufModel> gguf, GgufModel::Open(s.path));
    QKV_ASSIGN_OR_RETURN(s.tokenizer, Tokenizer::FromGguf(gguf->gguf()));
    weights = std::move(gguf);
  }
  if (s.tokenizer->vocab_size() > weights->config().vocab_size) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: the tokenizer has %d tokens but the embedding only %d rows", s.path,
        s.tokenizer->vocab_size(), weights->config().vocab_size));
  }
  EngineConfig cfg = base;
  cfg.threads = flags.threads;
  cfg.kv_spec = flags.kv;
  cfg.kv_max_bytes = flags.kv_budget_mb << 20;
  QKV_ASSIGN_OR_RETURN(s.engine, Engine::Create(std::move(weights), cfg));
  return s;
}

}  // namespace quantkv::launcher
