// Subcommands of the `quantkv` binary and the dispatcher that picks one from argv.
//
// A subcommand is a name, a one-line summary and a setup function: setup defines the
// subcommand's flags on a FlagSet and returns the action to run once they parsed. The
// dispatcher owns --help, parse errors and exit codes, so every subcommand behaves the same:
//
//   quantkv --help | --version | help [COMMAND]
//   quantkv COMMAND [flags] [args]      exit 0 ok, 1 failure, 2 usage error
//
// MakeSubcommand() builds one from an options struct, a flag definer and a run function.
#pragma once

#include <functional>
#include <memory>
#include <ostream>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "launcher/flags.h"

namespace quantkv::launcher {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;  // the command ran and failed (bad model file, I/O, ...)
inline constexpr int kExitUsage = 2;    // the command line was wrong; nothing was run

// What a running subcommand may use instead of reaching for globals, so tests can capture it.
struct CommandContext {
  std::string command;  // "quantkv generate", for messages
  std::ostream& out;    // results (tokens, JSON, paths)
  std::ostream& err;    // diagnostics and progress
};

// Prints "COMMAND: error: MESSAGE" on ctx.err and returns kExitFailure.
int ReportFailure(CommandContext& ctx, const absl::Status& status);

using CommandAction = std::function<int(CommandContext&)>;

struct Subcommand {
  std::string name;     // what the user types: lower-case, words joined by '-'
  std::string summary;  // one line for `quantkv --help`; also heads `quantkv NAME --help`
  // Defines the flags on `flags` (bound to state the action captures) and returns the action.
  std::function<CommandAction(FlagSet& flags)> setup;
};

// A subcommand whose flags fill an `Options` value: `define` binds flags to the fields of a
// fresh Options, `run` gets it after a successful parse.
template <typename Options>
Subcommand MakeSubcommand(std::string name, std::string summary,
                          std::function<void(FlagSet&, Options&)> define,
                          std::function<int(const Options&, CommandContext&)> run) {
  Subcommand command;
  command.name = std::move(name);
  command.summary = std::move(summary);
  command.setup = [define = std::move(define), run = std::move(run)](FlagSet& flags) {
    auto options = std::make_shared<Options>();
    define(flags, *options);
    return CommandAction([options, run](CommandContext& ctx) { return run(*options, ctx); });
  };
  return command;
}

// "0.1.0", from the project() version in CMakeLists.txt.
std::string_view QuantkvVersion();

// Runs the command line `args` (argv without argv[0]) against `commands` and returns the exit
// code. Usage errors go to `err` with exit code kExitUsage; --help and --version go to `out`.
// An exception escaping a subcommand is reported as a failure rather than terminating.
int RunCommandLine(std::span<const Subcommand> commands, std::span<const std::string> args,
                   std::ostream& out, std::ostream& err);

}  // namespace quantkv::launcher
