// Reading a whole (text or PEM) file named by a flag, with an error that names it.
#pragma once

#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "launcher/subcommand.h"

namespace quantkv::launcher {

// NOT_FOUND "PATH: cannot open" when the file cannot be read.
absl::StatusOr<std::string> ReadWholeFile(const std::string& path);

// --prompt / --prompt-file, as `generate` and `client` take them: with `file` given, *prompt
// becomes its text. On an error (both given: a usage error; the file unreadable: a failure)
// it is printed on ctx.err and the command's exit code returned; nullopt when all is well.
std::optional<int> TakePromptFile(const std::string& file, std::string* prompt,
                                  CommandContext& ctx);

}  // namespace quantkv::launcher
