#include "runtime/comm/tcp_communicator.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
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

// Sum all-reduces from this many values go through rank 0's sum (one vector each way per
// rank) rather than an all-gather (size() vectors back to each rank). Measured on loopback
// with 2 and 3 ranks on 2 cores: from 4608 values it is faster (at 3 ranks 39 vs 49-57 us,
// 294912 values 1.4-1.7 vs 3.4 ms), at 576 (one decode row) 5 us slower with 3 ranks.
constexpr int64_t kRootReduceMinElements = 4096;

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

enum Op : uint32_t {
  kAllGather = 1,
  kBroadcast = 2,
  kReduce = 3,         // the sum all-reduce's partials, to rank 0, and the sum back
  kReduceScatter = 4,  // the partials to rank 0, and each rank's chunk of the sum back
  kAllToAllV = 5,      // every rank's pieces for the others to rank 0, and each rank's back
  // Rank 0 gave up on a collective (a rank passed a bad argument or another size): `root`
  // carries the absl status code, the payload the message, so every rank gets it at once.
  kError = 6,
};

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

  // Rank 0 receives every rank's partials, adds them in rank order (SumGatheredInRankOrder:
  // the bits of an MPI group of the same size) and sends the sum back: each other rank sends
  // and receives the vector once, one round trip. Below kRootReduceMinElements the older
  // all-gather of the partials, summed on every rank, is as fast or faster (rank 0 does not
  // add before it can send); the bits are the same either way.
  absl::Status AllReduceSum(float* data, int64_t n) override {
    if (n >= 0 && n < kRootReduceMinElements) {
      gather_.resize(static_cast<size_t>(n) * size_);
      if (absl::Status s = AllGather(data, n * static_cast<int64_t>(sizeof(float)), gather_.data());
          !s.ok()) {
        return s;
      }
      SumGatheredInRankOrder(gather_.data(), n, size_, data);
      return absl::OkStatus();
    }
    ++calls_;
    const absl::Status local = CheckN("AllReduceSum", n);
    const uint64_t bytes = local.ok() ? static_cast<uint64_t>(n) * sizeof(float) : 0;
    if (rank_ != 0) {
      if (absl::Status s = SendToRoot(kReduce, bytes, data, local); !s.ok()) return s;
      return RecvFrame(0, {kReduce, 0, bytes}, data);
    }
    if (local.ok()) {
      gather_.resize(static_cast<size_t>(n) * size_);
      std::copy(data, data + n, gather_.begin());
    }
    if (absl::Status s = GatherAtRoot("AllReduceSum", kReduce, bytes,
                                      reinterpret_cast<uint8_t*>(gather_.data()), local);
        !s.ok()) {
      return s;
    }
    SumGatheredInRankOrder(gather_.data(), n, size_, data);
    for (int r = 1; r < size_; ++r) {
      if (absl::Status s = SendFrame(r, {kReduce, 0, bytes}, data); !s.ok()) return s;
    }
    return absl::OkStatus();
  }

  // Through rank 0 like the all-reduce, which sends each rank back only its chunk.
  absl::Status ReduceScatterSum(const float* send, int64_t n, float* recv) override {
    ++calls_;
    const absl::Status local = CheckN("ReduceScatterSum", n);
    const uint64_t bytes = local.ok() ? static_cast<uint64_t>(n) * sizeof(float) : 0;
    if (rank_ != 0) {
      if (absl::Status s = SendToRoot(kReduceScatter, bytes, send, local); !s.ok()) return s;
      const ChunkRange mine = ReduceScatterChunk(n, size_, rank_);
      return RecvFrame(0, {kReduceScatter, 0, static_cast<uint64_t>(mine.size()) * sizeof(float)},
                       recv);
    }
    if (local.ok()) {
      gather_.resize(static_cast<size_t>(n) * size_);
      std::copy(send, send + n, gather_.begin());
    }
    if (absl::Status s = GatherAtRoot("ReduceScatterSum", kReduceScatter, bytes,
                                      reinterpret_cast<uint8_t*>(gather_.data()), local);
        !s.ok()) {
      return s;
    }
    sum_.resize(static_cast<size_t>(n));
    SumGatheredInRankOrder(gather_.data(), n, size_, sum_.data());
    for (int r = 1; r < size_; ++r) {
      const ChunkRange c = ReduceScatterChunk(n, size_, r);
      if (absl::Status s =
              SendFrame(r, {kReduceScatter, 0, static_cast<uint64_t>(c.size()) * sizeof(float)},
                        sum_.data() + c.begin);
          !s.ok()) {
        return s;
      }
    }
    const ChunkRange mine = ReduceScatterChunk(n, size_, 0);
    std::copy(sum_.begin() + mine.begin, sum_.begin() + mine.end, recv);
    return absl::OkStatus();
  }

  // The counts first (ExchangeAllToAllCounts, an all-gather), so every rank knows every
  // frame's size; then each rank sends rank 0 its pieces for the other ranks (its own piece
  // stays here) and rank 0 sends each rank the pieces addressed to it, in source order.
  absl::Status AllToAllV(const void* send, std::span<const int64_t> send_bytes,
                         std::vector<uint8_t>* recv, std::vector<int64_t>* recv_bytes) override {
    std::vector<int64_t> m;
    if (absl::Status s = ExchangeAllToAllCounts(*this, send_bytes, 0, &m); !s.ok()) return s;
    ++calls_;
    const int p = size_;
    auto count = [&](int from, int to) { return m[static_cast<size_t>(from) * p + to]; };
    // Offsets of piece `to` in rank `from`'s send buffer, and of piece `from` in rank `to`'s
    // receive buffer.
    auto send_offset = [&](int from, int to) {
      int64_t o = 0;
      for (int q = 0; q < to; ++q) o += count(from, q);
      return o;
    };
    auto recv_offset = [&](int to, int from) {
      int64_t o = 0;
      for (int q = 0; q < from; ++q) o += count(q, to);
      return o;
    };
    auto total_out = [&](int from) { return send_offset(from, p); };
    auto total_in = [&](int to) { return recv_offset(to, p); };
    const auto* in = static_cast<const uint8_t*>(send);
    recv->resize(static_cast<size_t>(total_in(rank_)));
    recv_bytes->resize(static_cast<size_t>(p));
    for (int q = 0; q < p; ++q) (*recv_bytes)[q] = count(q, rank_);
    const int64_t self = count(rank_, rank_);
    if (self > 0) {
      std::memcpy(recv->data() + recv_offset(rank_, rank_), in + send_offset(rank_, rank_),
                  static_cast<size_t>(self));
    }
    // Frames skip the self piece: the bytes before it, then the bytes after it.
    if (rank_ != 0) {
      const int64_t before = send_offset(rank_, rank_);
      const Frame out{kAllToAllV, 0, static_cast<uint64_t>(total_out(rank_) - self)};
      if (absl::Status s = SendAll(0, &out, sizeof(out)); !s.ok()) return s;
      if (absl::Status s = SendAll(0, in, before); !s.ok()) return s;
      if (absl::Status s = SendAll(0, in + before + self, total_out(rank_) - before - self);
          !s.ok()) {
        return s;
      }
      bytes_sent_ += total_out(rank_) - self;
      Frame got{};
      const int64_t gap = recv_offset(rank_, rank_);
      if (absl::Status s = RecvHeader(0, &got); !s.ok()) return s;
      if (absl::Status s =
              CheckHeader(0, got, {kAllToAllV, 0, static_cast<uint64_t>(total_in(rank_) - self)});
          !s.ok()) {
        return s;
      }
      if (absl::Status s = RecvAll(0, recv->data(), gap); !s.ok()) return s;
      return RecvAll(0, recv->data() + gap + self, total_in(rank_) - gap - self);
    }
    // Rank 0: every other rank's pieces (minus their self piece), then one frame per rank.
    std::vector<std::vector<uint8_t>> from(p);
    for (int r = 1; r < p; ++r) {
      from[r].resize(static_cast<size_t>(total_out(r) - count(r, r)));
      if (absl::Status s =
              RecvFrame(r, {kAllToAllV, 0, static_cast<uint64_t>(from[r].size())}, from[r].data());
          !s.ok()) {
        return FailPeers(s);
      }
    }
    // Where rank `src`'s piece for `dst` lies: in rank 0's send buffer, or in from[src].
    auto piece = [&](int src, int dst) -> const uint8_t* {
      if (src == 0) return in + send_offset(0, dst);
      int64_t o = send_offset(src, dst);
      if (dst > src) o -= count(src, src);
      return from[src].data() + o;
    };
    for (int q = 1; q < p; ++q) {
      if (count(q, 0) > 0) {
        std::memcpy(recv->data() + recv_offset(0, q), piece(q, 0),
                    static_cast<size_t>(count(q, 0)));
      }
    }
    std::vector<uint8_t> frame;
    for (int r = 1; r < p; ++r) {
      frame.clear();
      for (int q = 0; q < p; ++q) {
        if (q == r) continue;
        const uint8_t* b = piece(q, r);
        frame.insert(frame.end(), b, b + count(q, r));
      }
      if (absl::Status s = SendFrame(r, {kAllToAllV, 0, frame.size()}, frame.data()); !s.ok()) {
        return s;
      }
    }
    return absl::OkStatus();
  }

  absl::Status AllGather(const void* send, int64_t bytes, void* recv) override {
    ++calls_;
    auto* out = static_cast<uint8_t*>(recv);
    const Frame frame{kAllGather, 0, static_cast<uint64_t>(bytes)};
    // Rank 0 sends each rank every piece but its own: (N - 1) pieces, not N.
    const Frame others{kAllGather, 0, static_cast<uint64_t>(bytes * (size_ - 1))};
    if (rank_ != 0) {
      if (absl::Status s = SendFrame(0, frame, send); !s.ok()) return s;
      std::memmove(out + rank_ * bytes, send, static_cast<size_t>(bytes));
      Frame got{};
      if (absl::Status s = RecvHeader(0, &got); !s.ok()) return s;
      if (absl::Status s = CheckHeader(0, got, others); !s.ok()) return s;
      if (absl::Status s = RecvAll(0, out, rank_ * bytes); !s.ok()) return s;
      return RecvAll(0, out + (rank_ + 1) * bytes, (size_ - 1 - rank_) * bytes);
    }
    std::memmove(out, send, static_cast<size_t>(bytes));
    for (int r = 1; r < size_; ++r) {
      if (absl::Status s = RecvFrame(r, frame, out + r * bytes); !s.ok()) return FailPeers(s);
    }
    for (int r = 1; r < size_; ++r) {
      if (absl::Status s = SendAll(r, &others, sizeof(others)); !s.ok()) return s;
      if (absl::Status s = SendAll(r, out, r * bytes); !s.ok()) return s;
      if (absl::Status s = SendAll(r, out + (r + 1) * bytes, (size_ - 1 - r) * bytes); !s.ok()) {
        return s;
      }
      bytes_sent_ += static_cast<int64_t>(others.bytes);
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
      if (absl::Status s = RecvFrame(root, frame, data); !s.ok()) return FailPeers(s);
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

  int64_t bytes_sent() const override { return bytes_sent_; }

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
    bytes_sent_ += static_cast<int64_t>(frame.bytes);
    return SendAll(r, data, static_cast<int64_t>(frame.bytes));
  }

  absl::Status RecvFrame(int r, const Frame& want, void* data) {
    Frame got{};
    if (absl::Status s = RecvHeader(r, &got); !s.ok()) return s;
    if (absl::Status s = CheckHeader(r, got, want); !s.ok()) return s;
    return RecvAll(r, data, static_cast<int64_t>(want.bytes));
  }

  absl::Status RecvHeader(int r, Frame* got) { return RecvAll(r, got, sizeof(*got)); }

  // A header that is not `want`: an error frame (its message, read here) or a mismatch.
  absl::Status CheckHeader(int r, const Frame& got, const Frame& want) {
    if (got.op == kError && got.bytes <= 4096) {
      std::string message(got.bytes, '\0');
      if (absl::Status s = RecvAll(r, message.data(), static_cast<int64_t>(got.bytes)); !s.ok()) {
        return s;
      }
      return absl::Status(
          static_cast<absl::StatusCode>(got.root),
          absl::StrFormat("tcp collective #%d: from rank %d: %s", calls_, r, message));
    }
    if (got.op != want.op || got.root != want.root || got.bytes != want.bytes) {
      return absl::InternalError(absl::StrFormat(
          "tcp collective #%d: rank %d sent op %d (root %d, %d bytes), rank %d expected op %d "
          "(root %d, %d bytes): the ranks disagree on the sequence of collectives",
          calls_, r, got.op, got.root, got.bytes, rank_, want.op, want.root, want.bytes));
    }
    return absl::OkStatus();
  }

  absl::Status CheckN(const char* what, int64_t n) const {
    if (n >= 0) return absl::OkStatus();
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: rank %d passed a negative count %d", what, rank_, n));
  }

  // A non-zero rank's contribution to a collective through rank 0: its frame, or when its
  // arguments are bad (`local`) an error frame instead, whose reply it then reads (rank 0
  // answers every rank, keeping the streams in step) before returning its own error.
  absl::Status SendToRoot(uint32_t op, uint64_t bytes, const void* data,
                          const absl::Status& local) {
    if (local.ok()) return SendFrame(0, {op, 0, bytes}, data);
    if (absl::Status s = SendError(0, local); !s.ok()) return s;
    Frame got{};
    if (absl::Status s = RecvHeader(0, &got); !s.ok()) return s;
    (void)CheckHeader(0, got, {op, 0, 0});  // reads the error frame's message
    return local;
  }

  // Rank 0: one `op` frame of `bytes` bytes from every other rank into out + r * bytes. Every
  // rank's frame is read whatever it holds (an error frame, another size: the payload is
  // drained), then the first problem (`local`, this rank's own, first) goes to every rank as
  // an error frame, so that all fail at once and the streams stay in step. A broken
  // connection ends it at once.
  absl::Status GatherAtRoot(const char* what, uint32_t op, uint64_t bytes, uint8_t* out,
                            absl::Status verdict) {
    for (int r = 1; r < size_; ++r) {
      Frame got{};
      if (absl::Status s = RecvHeader(r, &got); !s.ok()) return FailPeers(s);
      if (got.op == kError) {
        absl::Status theirs = CheckHeader(r, got, {op, 0, bytes});
        if (!IsConnectionError(theirs) && verdict.ok()) verdict = theirs;
        if (IsConnectionError(theirs)) return FailPeers(theirs);
        continue;
      }
      if (got.op != op) return FailPeers(CheckHeader(r, got, {op, 0, bytes}));
      if (verdict.ok() && got.bytes != bytes) {
        verdict = absl::InvalidArgumentError(absl::StrFormat(
            "%s: rank %d passed n = %d, rank 0 n = %d; every rank must pass the same n", what, r,
            got.bytes / sizeof(float), bytes / sizeof(float)));
      }
      if (verdict.ok()) {
        if (absl::Status s = RecvAll(r, out + r * bytes, static_cast<int64_t>(bytes)); !s.ok()) {
          return FailPeers(s);
        }
      } else if (absl::Status s = Drain(r, got.bytes); !s.ok()) {
        return FailPeers(s);
      }
    }
    return verdict.ok() ? verdict : FailPeers(verdict);
  }

  // Reads and drops n bytes from rank r.
  absl::Status Drain(int r, uint64_t n) {
    uint8_t buf[65536];
    while (n > 0) {
      const uint64_t k = std::min<uint64_t>(n, sizeof(buf));
      if (absl::Status s = RecvAll(r, buf, static_cast<int64_t>(k)); !s.ok()) return s;
      n -= k;
    }
    return absl::OkStatus();
  }

  static bool IsConnectionError(const absl::Status& s) {
    return s.code() == absl::StatusCode::kUnavailable ||
           s.code() == absl::StatusCode::kDeadlineExceeded;
  }

  // An error frame carrying `status` to rank r (best effort: r may be gone).
  absl::Status SendError(int r, const absl::Status& status) {
    const std::string message(status.message().substr(0, 4096));
    const Frame frame{kError, static_cast<uint32_t>(status.code()), message.size()};
    if (absl::Status s = SendAll(r, &frame, sizeof(frame)); !s.ok()) return s;
    return SendAll(r, message.data(), static_cast<int64_t>(message.size()));
  }

  // Rank 0, giving up on a collective: tells every other rank why (instead of leaving them
  // to wait for a reply until the timeout), then returns the error itself. The streams are
  // out of step after that: the group is unusable, as after any failed collective.
  absl::Status FailPeers(const absl::Status& status) {
    for (int r = 1; r < size_; ++r) (void)SendError(r, status);
    return status;
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
    // Spin on non-blocking reads for a while before sleeping in poll(): waking a blocked
    // process took ~100 us in the VMs measured (bench/results/tp_netns.md), several times a
    // decode step's whole all-reduce, and MPI spins the same way before it blocks.
    const auto spin_until = start + SpinDuration();
    while (n > 0 && Clock::now() < spin_until) {
      const ssize_t k = ::recv(Fd(r), p, static_cast<size_t>(n), MSG_DONTWAIT);
      if (k > 0) {
        p += k;
        n -= k;
        continue;
      }
      if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) continue;
      break;  // closed or failed: the blocking path below reports it
    }
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

  // QUANTKV_COMM_SPIN_US (default 500; 0: block at once).
  static std::chrono::microseconds SpinDuration() {
    static const std::chrono::microseconds spin = [] {
      const char* env = std::getenv("QUANTKV_COMM_SPIN_US");
      const long us = env != nullptr ? std::strtol(env, nullptr, 10) : 500;
      return std::chrono::microseconds(std::clamp<long>(us, 0, 1000000));
    }();
    return spin;
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
  std::vector<float> gather_, sum_;
  int64_t calls_ = 0;
  int64_t bytes_sent_ = 0;
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
