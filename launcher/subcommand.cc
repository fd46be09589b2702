#include "launcher/subcommand.h"

#include <algorithm>
#include <exception>
#include <limits>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "launcher/version.h"

namespace quantkv::launcher {
namespace {

constexpr char kProgram[] = "quantkv";

std::string TopLevelUsage(std::span<const Subcommand> commands) {
  std::string out = absl::StrCat("Usage: ", kProgram, " COMMAND [flags] [args]\n       ", kProgram,
                                 " COMMAND --help\n       ", kProgram, " --version\n\n", "QuantKV ",
                                 std::string(QuantkvVersion()),
                                 ": LLM inference with a quantized, error-compensated KV cache.\n\n"
                                 "Commands:\n");
  size_t width = 4;  // "help"
  for (const Subcommand& c : commands) width = std::max(width, c.name.size());
  for (const Subcommand& c : commands) {
    absl::StrAppend(&out, "  ", c.name, std::string(width - c.name.size() + 3, ' '), c.summary,
                    "\n");
  }
  absl::StrAppend(&out, "  help", std::string(width - 4 + 3, ' '), "Show the help of a command\n");
  absl::StrAppend(&out, "\nRun '", kProgram, " COMMAND --help' for the flags of a command.\n");
  return out;
}

const Subcommand* FindCommand(std::span<const Subcommand> commands, std::string_view name) {
  for (const Subcommand& c : commands) {
    if (c.name == name) return &c;
  }
  return nullptr;
}

int UnknownCommand(std::span<const Subcommand> commands, std::string_view name, std::ostream& err) {
  const Subcommand* best = nullptr;
  size_t best_distance = std::numeric_limits<size_t>::max();
  for (const Subcommand& c : commands) {
    const size_t d = flags_internal::EditDistance(name, c.name);
    if (d < best_distance) {
      best_distance = d;
      best = &c;
    }
  }
  err << kProgram << ": unknown command '" << name << "'";
  if (best != nullptr && best_distance <= std::max<size_t>(2, name.size() / 3)) {
    err << "; did you mean '" << best->name << "'?";
  }
  err << "\nRun '" << kProgram << " --help' for the list of commands.\n";
  return kExitUsage;
}

int RunSubcommand(const Subcommand& command, std::span<const std::string> args, std::ostream& out,
                  std::ostream& err) {
  const std::string full_name = absl::StrCat(kProgram, " ", command.name);
  FlagSet flags(full_name, command.summary);
  CommandAction action = command.setup(flags);
  const absl::Status status = flags.Parse(args);
  if (!status.ok()) {
    if (status.code() == absl::StatusCode::kInternal) {
      // A broken flag definition is the program's fault, not the user's.
      err << full_name << ": internal error: " << status.message() << "\n";
      return kExitFailure;
    }
    err << full_name << ": " << status.message() << "\nRun '" << full_name
        << " --help' for usage.\n";
    return kExitUsage;
  }
  if (flags.help_requested()) {
    out << flags.Usage();
    return kExitOk;
  }
  CommandContext ctx{full_name, out, err};
  try {
    return action(ctx);
  } catch (const std::exception& e) {
    err << full_name << ": error: unexpected exception: " << e.what() << "\n";
    return kExitFailure;
  }
}

}  // namespace

int ReportFailure(CommandContext& ctx, const absl::Status& status) {
  ctx.err << ctx.command << ": error: " << status.message() << "\n";
  return kExitFailure;
}

std::string_view QuantkvVersion() { return QUANTKV_VERSION_STRING; }

int RunCommandLine(std::span<const Subcommand> commands, std::span<const std::string> args,
                   std::ostream& out, std::ostream& err) {
  absl::flat_hash_set<std::string_view> names;
  for (const Subcommand& c : commands) {
    if (c.name == "help" || !names.insert(c.name).second || !c.setup) {
      err << kProgram << ": internal error: subcommand '" << c.name
          << "' is registered twice, shadows 'help', or has no setup function\n";
      return kExitFailure;
    }
  }
  if (args.empty()) {
    err << TopLevelUsage(commands);
    return kExitUsage;
  }
  const std::string& first = args[0];
  if (first == "--help" || first == "-h" || (first == "help" && args.size() == 1)) {
    out << TopLevelUsage(commands);
    return kExitOk;
  }
  if (first == "--version" || first == "version") {
    out << kProgram << " " << QuantkvVersion() << "\n";
    return kExitOk;
  }
  if (first == "help") {
    const Subcommand* command = FindCommand(commands, args[1]);
    if (command == nullptr) return UnknownCommand(commands, args[1], err);
    const std::string help_args[] = {"--help"};
    return RunSubcommand(*command, help_args, out, err);
  }
  if (absl::StartsWith(first, "-")) {
    err << kProgram << ": unknown option '" << first
        << "' (options other than --help and --version go after the command)\nRun '" << kProgram
        << " --help' for usage.\n";
    return kExitUsage;
  }
  const Subcommand* command = FindCommand(commands, first);
  if (command == nullptr) return UnknownCommand(commands, first, err);
  return RunSubcommand(*command, args.subspan(1), out, err);
}

}  // namespace quantkv::launcher
