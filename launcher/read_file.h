// Reading a whole (text or PEM) file named by a flag, with an error that names it.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace quantkv::launcher {

// NOT_FOUND "PATH: cannot open" when the file cannot be read.
absl::StatusOr<std::string> ReadWholeFile(const std::string& path);

}  // namespace quantkv::launcher
