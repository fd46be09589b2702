// Locating test inputs: fixtures in the source tree, and the default model in the cache.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>

namespace quantkv::testing {

inline std::filesystem::path SourceDir() {
  if (const char* dir = std::getenv("QUANTKV_SOURCE_DIR")) return dir;
  return std::filesystem::current_path();
}

inline std::filesystem::path FixturePath(const std::string& name) {
  return SourceDir() / "tests" / "fixtures" / name;
}

// The default model as `quantkv fetch-model` stores it: $QUANTKV_HOME or ~/.cache/quantkv.
inline std::filesystem::path DefaultModelPath() {
  std::filesystem::path home;
  // An empty QUANTKV_HOME counts as unset, as ModelCacheDir() treats it.
  if (const char* h = std::getenv("QUANTKV_HOME"); h != nullptr && *h != '\0') {
    home = h;
  } else if (const char* u = std::getenv("HOME")) {
    home = std::filesystem::path(u) / ".cache" / "quantkv";
  }
  return home / "SmolLM2-135M-Instruct.Q4_1.gguf";
}

}  // namespace quantkv::testing
