#include "runtime/serve/worker_rendezvous.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "runtime/serve/worker_server.h"
#include "runtime/util/status_macros.h"

namespace quantkv {
namespace {

constexpr size_t kTokenBytes = 64;
constexpr size_t kAddressBytes = 256;

std::string Hostname() {
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0) return "localhost";
  return name;
}

bool IsLoopback(const std::string& host) {
  return host == "localhost" || absl::StartsWith(host, "127.") || host == "[::1]" || host == "::1";
}

}  // namespace

absl::StatusOr<std::string> ShareWorkerToken(Communicator& comm) {
  char buf[kTokenBytes] = {};
  if (comm.rank() == 0) {
    const std::string token = MakeWorkerToken();
    std::memcpy(buf, token.data(), std::min(token.size(), kTokenBytes - 1));
  }
  QKV_RETURN_IF_ERROR(comm.Broadcast(buf, kTokenBytes, 0));
  std::string token(buf, strnlen(buf, kTokenBytes));
  if (token.empty()) return absl::InternalError("rank 0 broadcast an empty worker token");
  return token;
}

std::string AdvertisedWorkerHost(const std::string& listen_host) {
  if (listen_host == "0.0.0.0" || listen_host == "[::]" || listen_host == "::") return Hostname();
  return listen_host;
}

absl::Status CheckWorkerHostReachable(Communicator& comm, const std::string& listen_host) {
  char mine[kAddressBytes] = {};
  const std::string host = Hostname();
  std::memcpy(mine, host.data(), std::min(host.size(), kAddressBytes - 1));
  std::vector<char> all(kAddressBytes * comm.size());
  QKV_RETURN_IF_ERROR(comm.AllGather(mine, kAddressBytes, all.data()));
  const std::string first(all.data(), strnlen(all.data(), kAddressBytes));
  for (int r = 1; r < comm.size(); ++r) {
    const char* h = all.data() + r * kAddressBytes;
    const std::string other(h, strnlen(h, kAddressBytes));
    if (other != first && IsLoopback(listen_host)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "--worker-listen %s: the ranks run on several machines (%s, %s, ...) and rank 0 "
          "cannot reach a loopback address on another; give an address of this network, or "
          "0.0.0.0 to listen everywhere and advertise the hostname",
          listen_host, first, other));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> GatherWorkerAddresses(Communicator& comm,
                                                               const std::string& mine) {
  if (mine.size() >= kAddressBytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("worker address '%s' is longer than %d bytes", mine, kAddressBytes - 1));
  }
  char buf[kAddressBytes] = {};
  std::memcpy(buf, mine.data(), mine.size());
  std::vector<char> all(kAddressBytes * comm.size());
  QKV_RETURN_IF_ERROR(comm.AllGather(buf, kAddressBytes, all.data()));
  std::vector<std::string> out;
  for (int r = 1; r < comm.size(); ++r) {
    const char* a = all.data() + r * kAddressBytes;
    out.emplace_back(a, strnlen(a, kAddressBytes));
  }
  return out;
}

}  // namespace quantkv
