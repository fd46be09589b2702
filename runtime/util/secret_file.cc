#include "runtime/util/secret_file.h"

#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace quantkv {

absl::StatusOr<std::string> ReadSecretFile(const std::string& path, std::string_view what) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", std::string(what), " ", path));
  std::string line;
  std::getline(in, line);
  std::string secret(absl::StripAsciiWhitespace(line));
  if (secret.empty())
    return absl::InvalidArgumentError(absl::StrCat(std::string(what), " ", path, " is empty"));
  return secret;
}

}  // namespace quantkv
