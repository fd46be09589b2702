// What every model-running subcommand shares: the --model/--threads/--kv/... flags and
// loading the engine and tokenizer they describe.
#pragma once

#include <memory>
#include <ostream>
#include <string>

#include "absl/status/statusor.h"
#include "launcher/flags.h"
#include "runtime/engine/engine.h"
#include "runtime/tokenizer/tokenizer.h"

namespace quantkv::launcher {

struct ModelFlags {
  std::string model;
  int threads = 1;
  std::string kv;
  int64_t kv_budget_mb = 0;
};

void DefineModelFlags(FlagSet& flags, ModelFlags& options);

struct ModelSession {
  std::string path;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<Engine> engine;
};

// Resolves --model (path or known name), opens GGUF or an HF directory, builds the
// tokenizer and the engine. `tune` may adjust the engine config before creation.
absl::StatusOr<ModelSession> OpenModelSession(const ModelFlags& flags,
                                              const EngineConfig& base = {});

}  // namespace quantkv::launcher
