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

}  // namespace quantkv::launcher
