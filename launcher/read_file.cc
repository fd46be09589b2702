#include "launcher/read_file.h"

#include <fstream>
#include <sstream>

#include "absl/status/status.h"

namespace quantkv::launcher {

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(path + ": cannot open");
  std::stringstream buf;
  buf << in.rdbuf();
  if (in.bad()) return absl::DataLossError(path + ": read error");
  return buf.str();
}

std::optional<int> TakePromptFile(const std::string& file, std::string* prompt,
                                  CommandContext& ctx) {
  if (file.empty()) return std::nullopt;
  if (!prompt->empty()) {
    ctx.err << ctx.command << ": give --prompt or --prompt-file, not both\n";
    return kExitUsage;
  }
  absl::StatusOr<std::string> text = ReadWholeFile(file);
  if (!text.ok()) return ReportFailure(ctx, text.status());
  *prompt = *std::move(text);
  return std::nullopt;
}

}  // namespace quantkv::launcher
