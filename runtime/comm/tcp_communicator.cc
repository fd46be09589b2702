#include "runtime/comm/tcp_communicator.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "runtime/comm/mpi_communicator.h"
#include "runtime/util/constant_time.h"

namespace quantkv {
namespace {

using Clock = std::chrono::steady_clock;

constexpr char kMagic[4] = {'Q', 'K', 'V', 'T'};
constexpr uint32_t kVersion = 1;

// A rank's greeting to rank 0.
struct Hello {
  char magic[4];
  uint32_t version;
  int32_t rank;
  int32_t world;
  uint32_t secret_bytes;
};

// Precedes every collective's payload, so ranks that disagree on the call sequence fail
// with a message instead of reading each other's bytes as data.
struct Frame {
  uint32_t op;
  uint32_t root;
  uint64_t bytes;
};

enum Op : uint32_t { kAllGather = 1, kBroadcast = 2 };

absl::StatusOr<std::pair<std::string, std::string>> SplitHostPort(const std::string& address) {
  const size_t colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos || colon == 0 ||
      !absl::SimpleAtoi(address.substr(colon + 1), &port) || port <= 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrFormat("rendezvous '%s' is not HOST:PORT (port 1-65535)", address));
  }
  std::string host = address.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  return std::make_pair(host, address.substr(colon + 1));
}

class Socket {
 public:
  explicit Socket(int fd = -1) : fd_(fd) {}
  Socket(Socket&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  Socket& operator=(Socket&& o) noexcept {
    std::swap(fd_, o.fd_);
    return *this;
  }
  ~Socket() {
    if (fd_ >= 0) ::close(fd_);
  }
  int fd() const { return fd_; }

 private:
  int fd_;
};

class TcpCommunicator final : public Communicator {
 public:
  TcpCommunicator(int rank, int size, double timeout_s, std::vector<Socket> peers)
      : rank_(rank), size_(size), timeout_s_(timeout_s), peers_(std::move(peers)) {}

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "tcp"; }

  absl::Status AllReduceSum(float* data, int64_t n) override {
    gather_.resize(static_cast<size_t>(n) * size_);
    if (absl::Status s = AllGather(data, n * static_cast<int64_t>(sizeof(float)), gather_.data());
        !s.ok()) {
      return s;
    }
    SumGatheredInRankOrder(gather_.data(), n, size_, data);
    return absl::OkStatus();
  }

  absl::Status AllGather(const void* send, int64_t bytes, void* recv) override {
    ++calls_;
    auto* out = static_cast<uint8_t*>(recv);
    const Frame frame{kAllGather, 0, static_cast<uint64_t>(bytes)};
    if (rank_ != 0) {
      if (absl::Status s = SendFrame(0, frame, send); !s.ok()) return s;
      return RecvFrame(0, {kAllGather, 0, static_cast<uint64_t>(bytes * size_)}, out);
    }
    std::memcpy(out, send, static_cast<size_t>(bytes));
    for (int r = 1; r < size_; ++r) {
      if (absl::Status s = RecvFrame(r, frame, out + r * bytes); !s.ok()) return s;
    }
    const Frame all{kAllGather, 0, static_cast<uint64_t>(bytes * size_)};
    for (int r = 1; r < size_; ++r) {
      if (absl::Status s = SendFrame(r, all, out); !s.ok()) return s;
    }
    return absl::OkStatus();
  }

  absl::Status Broadcast(void* data, int64_t bytes, int root) override {
    ++calls_;
    if (root < 0 || root >= size_) {
      return absl::InvalidArgumentError(absl::StrFormat("broadcast root %d of %d", root, size_));
    }
    const Frame frame{kBroadcast, static_cast<uint32_t>(root), static_cast<uint64_t>(bytes)};
    if (rank_ != 0) {
      if (rank_ == root) return SendFrame(0, frame, data);
      return RecvFrame(0, frame, data);
    }
    if (root != 0) {
      if (absl::Status s = RecvFrame(root, frame, data); !s.ok()) return s;
    }
    for (int r = 1; r < size_; ++r) {
      if (r == root) continue;
      if (absl::Status s = SendFrame(r, frame, data); !s.ok()) return s;
    }
    return absl::OkStatus();
  }

  absl::Status Barrier() override {
    uint8_t mine = 1;
    std::vector<uint8_t> all(size_);
    return AllGather(&mine, 1, all.data());
  }

  [[noreturn]] void Abort(int exit_code) override {
    std::fflush(stderr);
    // Closing the sockets tells every peer at once.
    peers_.clear();
    std::_Exit(exit_code);
  }

 private:
  // peers_[r] is the connection to rank r (rank 0 holds all; the others only [0]).
  int Fd(int r) const { return peers_[rank_ == 0 ? r : 0].fd(); }

  absl::Status SendFrame(int r, const Frame& frame, const void* data) {
    if (absl::Status s = SendAll(r, &frame, sizeof(frame)); !s.ok()) return s;
    return SendAll(r, data, static_cast<int64_t>(frame.bytes));
  }

  absl::Status RecvFrame(int r, const Frame& want, void* data) {
    Frame got{};
    if (absl::Status s = RecvAll(r, &got, sizeof(got)); !s.ok()) return s;
    if (got.op != want.op || got.root != want.root || got.bytes != want.bytes) {
      return absl::InternalError(absl::StrFormat(
          "tcp collective #%d: rank %d sent op %d (root %d, %d bytes), rank %d expected op %d "
          "(root %d, %d bytes): the ranks disagree on the sequence of collectives",
          calls_, r, got.op, got.root, got.bytes, rank_, want.op, want.root, want.bytes));
    }
    return RecvAll(r, data, static_cast<int64_t>(want.bytes));
  }

  absl::Status SendAll(int r, const void* data, int64_t n) {
    const auto* p = static_cast<const uint8_t*>(data);
    while (n > 0) {
      const ssize_t k = ::send(Fd(r), p, static_cast<size_t>(n), MSG_NOSIGNAL);
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) {
        return absl::UnavailableError(absl::StrFormat(
            "tcp collective #%d: sending to rank %d failed (%s): it may have exited or died",
            calls_, r, std::strerror(errno)));
      }
      p += k;
      n -= k;
    }
    return absl::OkStatus();
  }

  absl::Status RecvAll(int r, void* data, int64_t n) {
    auto* p = static_cast<uint8_t*>(data);
    const auto start = Clock::now();
    while (n > 0) {
      int wait_ms = -1;
      if (timeout_s_ > 0) {
        const double left =
            timeout_s_ - std::chrono::duration<double>(Clock::now() - start).count();
        if (left <= 0) return Timeout(r);
        wait_ms = static_cast<int>(std::ceil(left * 1000));
      }
      pollfd pfd{Fd(r), POLLIN, 0};
      const int ready = ::poll(&pfd, 1, wait_ms);
      if (ready < 0 && errno == EINTR) continue;
      if (ready == 0) return Timeout(r);
      const ssize_t k = ::recv(Fd(r), p, static_cast<size_t>(n), 0);
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) {
        return absl::UnavailableError(absl::StrFormat(
            "tcp collective #%d: rank %d closed the connection%s: it exited or died", calls_, r,
            k < 0 ? absl::StrFormat(" (%s)", std::strerror(errno)) : ""));
      }
      p += k;
      n -= k;
    }
    return absl::OkStatus();
  }

  absl::Status Timeout(int r) const {
    return absl::DeadlineExceededError(absl::StrFormat(
        "tcp collective #%d: rank %d of %d waited %g s for rank %d: it may have died or hung "
        "(QUANTKV_COMM_TIMEOUT_S sets the limit, 0 waits forever)",
        calls_, rank_, size_, timeout_s_, r));
  }

  int rank_, size_;
  double timeout_s_;
  std::vector<Socket> peers_;
  std::vector<float> gather_;
  int64_t calls_ = 0;
};

absl::Status SendBytes(int fd, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    const ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return absl::UnavailableError(std::strerror(errno));
    p += k;
    n -= static_cast<size_t>(k);
  }
  return absl::OkStatus();
}

// Reads n bytes within `deadline`.
absl::Status RecvBytes(int fd, void* data, size_t n, Clock::time_point deadline) {
  auto* p = static_cast<uint8_t*>(data);
  while (n > 0) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return absl::DeadlineExceededError("timed out");
    pollfd pfd{fd, POLLIN, 0};
    const int ready = ::poll(&pfd, 1, static_cast<int>(left));
    if (ready < 0 && errno == EINTR) continue;
    if (ready == 0) return absl::DeadlineExceededError("timed out");
    const ssize_t k = ::recv(fd, p, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return absl::UnavailableError("connection closed");
    p += k;
    n -= static_cast<size_t>(k);
  }
  return absl::OkStatus();
}

void NoDelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

absl::StatusOr<std::vector<Socket>> AcceptPeers(const TcpCommunicatorOptions& o,
                                                const std::string& host, const std::string& port,
                                                Clock::time_point deadline) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  if (int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &res);
      rc != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("rendezvous %s: %s", o.rendezvous, ::gai_strerror(rc)));
  }
  Socket listener(::socket(res->ai_family, res->ai_socktype, res->ai_protocol));
  int one = 1;
  ::setsockopt(listener.fd(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  const bool bound = listener.fd() >= 0 &&
                     ::bind(listener.fd(), res->ai_addr, res->ai_addrlen) == 0 &&
                     ::listen(listener.fd(), o.world_size) == 0;
  const int err = errno;
  ::freeaddrinfo(res);
  if (!bound) {
    return absl::UnavailableError(absl::StrFormat("rank 0 cannot listen on rendezvous %s: %s",
                                                  o.rendezvous, std::strerror(err)));
  }
  std::vector<Socket> peers(o.world_size);
  int joined = 1;
  while (joined < o.world_size) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    pollfd pfd{listener.fd(), POLLIN, 0};
    const int ready = left > 0 ? ::poll(&pfd, 1, static_cast<int>(left)) : 0;
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) {
      return absl::DeadlineExceededError(
          absl::StrFormat("rank 0: %d of %d ranks joined at %s within %g s", joined, o.world_size,
                          o.rendezvous, o.join_timeout_s));
    }
    Socket c(::accept(listener.fd(), nullptr, nullptr));
    if (c.fd() < 0) continue;
    Hello hello{};
    const auto hello_deadline = std::min(deadline, Clock::now() + std::chrono::seconds(10));
    if (!RecvBytes(c.fd(), &hello, sizeof(hello), hello_deadline).ok() ||
        std::memcmp(hello.magic, kMagic, 4) != 0 || hello.version != kVersion ||
        hello.secret_bytes > 4096) {
      continue;  // not one of ours: drop it
    }
    std::string secret(hello.secret_bytes, '\0');
    if (!RecvBytes(c.fd(), secret.data(), secret.size(), hello_deadline).ok()) continue;
    uint8_t verdict = 0;
    std::string why;
    if (!ConstantTimeEquals(secret, o.secret)) {
      why = "wrong secret";
    } else if (hello.world != o.world_size) {
      why = absl::StrFormat("world size %d, rank 0 has %d", hello.world, o.world_size);
    } else if (hello.rank <= 0 || hello.rank >= o.world_size) {
      why = absl::StrFormat("rank %d outside 1..%d", hello.rank, o.world_size - 1);
    } else if (peers[hello.rank].fd() >= 0) {
      why = absl::StrFormat("rank %d joined twice", hello.rank);
    } else {
      verdict = 1;
    }
    (void)SendBytes(c.fd(), &verdict, 1);
    if (verdict == 0) {
      std::fprintf(stderr, "quantkv: rank 0: refused a connection at %s: %s\n",
                   o.rendezvous.c_str(), why.c_str());
      continue;
    }
    NoDelay(c.fd());
    peers[hello.rank] = std::move(c);
    ++joined;
  }
  return peers;
}

absl::StatusOr<Socket> Join(const TcpCommunicatorOptions& o, const std::string& host,
                            const std::string& port, Clock::time_point deadline) {
  std::string last = "no attempt";
  while (Clock::now() < deadline) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    if (int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &res); rc != 0) {
      last = ::gai_strerror(rc);
    } else {
      for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
        Socket s(::socket(a->ai_family, a->ai_socktype, a->ai_protocol));
        if (s.fd() < 0 || ::connect(s.fd(), a->ai_addr, a->ai_addrlen) != 0) {
          last = std::strerror(errno);
          continue;
        }
        ::freeaddrinfo(res);
        res = nullptr;
        Hello hello{};
        std::memcpy(hello.magic, kMagic, 4);
        hello.version = kVersion;
        hello.rank = o.rank;
        hello.world = o.world_size;
        hello.secret_bytes = static_cast<uint32_t>(o.secret.size());
        uint8_t verdict = 0;
        if (!SendBytes(s.fd(), &hello, sizeof(hello)).ok() ||
            !SendBytes(s.fd(), o.secret.data(), o.secret.size()).ok() ||
            !RecvBytes(s.fd(), &verdict, 1, deadline).ok()) {
          return absl::UnavailableError(absl::StrFormat(
              "rank %d: rank 0 at %s closed the connection while joining", o.rank, o.rendezvous));
        }
        if (verdict != 1) {
          return absl::PermissionDeniedError(absl::StrFormat(
              "rank %d: rank 0 at %s refused to let it join (wrong secret, world size or rank; "
              "rank 0's log says which)",
              o.rank, o.rendezvous));
        }
        NoDelay(s.fd());
        return s;
      }
      if (res != nullptr) ::freeaddrinfo(res);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // rank 0 may be starting
  }
  return absl::DeadlineExceededError(
      absl::StrFormat("rank %d: cannot reach rank 0 at %s within %g s (last error: %s)", o.rank,
                      o.rendezvous, o.join_timeout_s, last));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> CreateTcpCommunicator(
    const TcpCommunicatorOptions& o) {
  if (o.world_size < 1 || o.rank < 0 || o.rank >= o.world_size) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tcp communicator: rank %d of world %d", o.rank, o.world_size));
  }
  if (o.secret.empty()) {
    return absl::InvalidArgumentError("tcp communicator: an empty secret would admit anyone");
  }
  double timeout_s = o.timeout_s;
  if (timeout_s < 0) {
    absl::StatusOr<double> env = CommTimeoutFromEnv();
    if (!env.ok()) return env.status();
    timeout_s = *env;
  }
  absl::StatusOr<std::pair<std::string, std::string>> hp = SplitHostPort(o.rendezvous);
  if (!hp.ok()) return hp.status();
  const auto deadline =
      Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(o.join_timeout_s * 1000));
  std::vector<Socket> peers;
  if (o.rank == 0) {
    absl::StatusOr<std::vector<Socket>> accepted = AcceptPeers(o, hp->first, hp->second, deadline);
    if (!accepted.ok()) return accepted.status();
    peers = std::move(*accepted);
  } else {
    absl::StatusOr<Socket> s = Join(o, hp->first, hp->second, deadline);
    if (!s.ok()) return s.status();
    peers.push_back(std::move(*s));
  }
  return std::unique_ptr<Communicator>(
      new TcpCommunicator(o.rank, o.world_size, timeout_s, std::move(peers)));
}

}  // namespace quantkv
