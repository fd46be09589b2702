// Secrets read from files (API keys, the tensor-parallel job's shared secret): the first
// line, surrounding whitespace removed. An empty secret is an error: it would admit anyone.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace quantkv {

// `what` names the file in errors ("the API key file").
absl::StatusOr<std::string> ReadSecretFile(const std::string& path, std::string_view what);

}  // namespace quantkv
