#include "runtime/serve/metrics_http.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstring>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "runtime/util/monotonic_clock.h"

namespace quantkv {
namespace {

// After the response, unread request bytes are drained for at most this long before the
// close: closing a socket with unread input sends RST, which can destroy the response
// before the client has read it.
constexpr int64_t kDrainNs = 500'000'000;
// Bounds every poll() so that a lost wake-up still cannot delay Stop() for long.
constexpr int kMaxPollMs = 200;

std::string ErrnoText(const char* what, int err) { return absl::StrCat(what, ": ", strerror(err)); }

struct HostPort {
  std::string host;
  std::string port;
};

absl::StatusOr<HostPort> SplitHostPort(std::string_view address) {
  // A std::string for the messages: this absl's StrCat does not take std::string_view.
  const std::string listen(address);
  HostPort hp;
  std::string_view port;
  if (address.starts_with('[')) {
    const size_t close = address.find(']');
    if (close == std::string_view::npos || close + 1 >= address.size() ||
        address[close + 1] != ':') {
      return absl::InvalidArgumentError(
          absl::StrCat("metrics address '", listen, "': expected [IPV6]:PORT"));
    }
    hp.host = std::string(address.substr(1, close - 1));
    port = address.substr(close + 2);
  } else {
    const size_t colon = address.rfind(':');
    if (colon == std::string_view::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("metrics address '", listen, "': expected HOST:PORT"));
    }
    hp.host = std::string(address.substr(0, colon));
    port = address.substr(colon + 1);
    if (hp.host.find(':') != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          "metrics address '", listen, "': put an IPv6 host in brackets, [IPV6]:PORT"));
    }
  }
  // No implicit "every interface": the endpoint has no authentication.
  if (hp.host.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "metrics address '", listen,
        "': the host is missing (127.0.0.1:PORT for loopback, 0.0.0.0:PORT for every interface)"));
  }
  int port_number = -1;
  if (port.empty() || !std::all_of(port.begin(), port.end(), absl::ascii_isdigit) ||
      std::from_chars(port.data(), port.data() + port.size(), port_number).ec != std::errc() ||
      port_number > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics address '", listen, "': the port must be a number in [0, 65535]"));
  }
  hp.port = std::to_string(port_number);
  return hp;
}

// HTTP's token characters (RFC 9110 tchar), which a method consists of.
bool IsTokenChar(char c) {
  return absl::ascii_isalnum(c) || std::strchr("!#$%&'*+-.^_`|~", c) != nullptr;
}

struct Response {
  int code = 200;
  std::string body;
};

const char* ReasonPhrase(int code) {
  switch (code) {
    case 200:
      return "OK";
    case 400:
      return "Bad Request";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
  }
  return "Error";
}

std::string Serialize(const Response& r, bool head) {
  std::string out = absl::StrCat("HTTP/1.1 ", r.code, " ", ReasonPhrase(r.code), "\r\n");
  absl::StrAppend(&out, "Content-Type: ",
                  r.code == 200 ? "text/plain; version=0.0.4; charset=utf-8" : "text/plain",
                  "\r\nContent-Length: ", r.body.size(), "\r\n");
  if (r.code == 405) absl::StrAppend(&out, "Allow: GET, HEAD\r\n");
  absl::StrAppend(&out, "Connection: close\r\n\r\n");
  if (!head) out += r.body;
  return out;
}

// `line` is the request line without its line ending. Sets *head for a HEAD request (the
// response then has no body). A 200 comes back without its body: the caller renders it once
// the request is complete.
Response Route(std::string_view line, bool* head) {
  *head = false;
  const size_t sp1 = line.find(' ');
  const size_t sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
  if (sp2 == std::string_view::npos || line.find(' ', sp2 + 1) != std::string_view::npos) {
    return {400, "bad request line\n"};
  }
  const std::string_view method = line.substr(0, sp1);
  const std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  const std::string_view version = line.substr(sp2 + 1);
  const bool version_ok =
      version.size() == 8 && version.starts_with("HTTP/1.") && absl::ascii_isdigit(version[7]);
  if (method.empty() || !std::all_of(method.begin(), method.end(), IsTokenChar) ||
      !target.starts_with('/') ||
      std::any_of(target.begin(), target.end(),
                  [](char c) { return static_cast<unsigned char>(c) <= 0x20 || c == 0x7f; }) ||
      !version_ok) {
    return {400, "bad request line\n"};
  }
  *head = method == "HEAD";  // no body on any answer to it
  // The query string is ignored: Prometheus may add parameters, the body is the same.
  const std::string_view path = target.substr(0, target.find('?'));
  if (path != "/metrics") return {404, "not found; metrics are at /metrics\n"};
  if (method != "GET" && !*head) return {405, "only GET and HEAD are allowed\n"};
  return {200, ""};
}

struct Conn {
  enum class Phase { kReading, kWriting, kDraining };
  int fd = -1;
  Phase phase = Phase::kReading;
  std::string in;
  std::string out;
  size_t sent = 0;
  int64_t deadline_ns = 0;
};

void CloseConn(Conn& c) {
  if (c.fd >= 0) close(c.fd);
  c.fd = -1;
}

// Sends what the socket takes now; on completion half-closes and starts draining.
void Write(Conn& c, int64_t now) {
  while (c.sent < c.out.size()) {
    const ssize_t n = send(c.fd, c.out.data() + c.sent, c.out.size() - c.sent, MSG_NOSIGNAL);
    if (n > 0) {
      c.sent += n;
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return;
    } else {
      CloseConn(c);
      return;
    }
  }
  shutdown(c.fd, SHUT_WR);
  c.phase = Conn::Phase::kDraining;
  c.deadline_ns = std::min(c.deadline_ns, now + kDrainNs);
}

void Respond(Conn& c, const Response& r, bool head, int64_t now) {
  c.in.clear();
  c.out = Serialize(r, head);
  c.phase = Conn::Phase::kWriting;
  Write(c, now);
}

// Reads what is there; answers once the request line and headers are complete (or the
// request line is already bad, or the request is too long).
void Read(Conn& c, const MetricsHttpServer::RenderFn& render, int64_t max_bytes, int64_t now) {
  char buf[4096];
  bool eof = false;
  while (true) {
    const ssize_t n = recv(c.fd, buf, sizeof(buf), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (n <= 0) {
      // A client may half-close right after its request (printf ... | nc): what it sent
      // is still answered below.
      eof = true;
      break;
    }
    if (c.phase != Conn::Phase::kReading) continue;  // discarded
    c.in.append(buf, n);
    if (static_cast<int64_t>(c.in.size()) > max_bytes) break;
  }
  if (c.phase == Conn::Phase::kReading) {
    // Only the first max_bytes count: a request whose line or headers end beyond them is
    // too long even when all of it has arrived.
    const size_t max = static_cast<size_t>(max_bytes);
    const size_t eol = c.in.find('\n');
    const bool too_long = c.in.size() > max;
    if (eol == std::string::npos || eol >= max) {
      if (too_long) Respond(c, {400, "request line too long\n"}, false, now);
    } else {
      std::string_view line(c.in.data(), eol);
      if (line.ends_with('\r')) line.remove_suffix(1);
      bool head = false;
      Response r = Route(line, &head);
      // The headers end at the first empty line after the request line.
      const size_t crlf = c.in.find("\n\r\n", eol);
      const size_t lf = c.in.find("\n\n", eol);
      const size_t end = std::min(crlf == std::string::npos ? crlf : crlf + 3,
                                  lf == std::string::npos ? lf : lf + 2);
      if (r.code == 400) {
        // At once, without waiting for headers that may never come.
        Respond(c, r, false, now);
      } else if (end <= max) {
        if (r.code == 200) r.body = render();
        Respond(c, r, head, now);
      } else if (too_long) {
        Respond(c, {400, "request headers too long\n"}, false, now);
      }
    }
  }
  // An unanswered request that ended early, or a drained one: done. A response still being
  // written is finished first (the client may read after half-closing).
  if (eof && c.fd >= 0 && c.phase != Conn::Phase::kWriting) CloseConn(c);
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    std::string_view listen, RenderFn render, const MetricsHttpOptions& options) {
  if (!render) return absl::InvalidArgumentError("MetricsHttpServer needs a render function");
  if (options.max_request_bytes < 16 || options.max_connections < 1 ||
      options.client_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "MetricsHttpOptions: max_request_bytes >= 16, max_connections >= 1 and a positive "
        "client_timeout are required");
  }
  const std::string address(listen);  // for the messages
  absl::StatusOr<HostPort> hp = SplitHostPort(listen);
  if (!hp.ok()) return hp.status();

  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  if (int rc = getaddrinfo(hp->host.c_str(), hp->port.c_str(), &hints, &res); rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", address, " for metrics: ", gai_strerror(rc)));
  }
  int fd = -1;
  std::string error = "no address";
  for (addrinfo* ai = res; ai != nullptr && fd < 0; ai = ai->ai_next) {
    fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      error = ErrnoText("socket", errno);
      continue;
    }
    // A restarted server can rebind while old connections sit in TIME_WAIT.
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
      error = ErrnoText("bind", errno);
    } else if (::listen(fd, 64) != 0) {
      error = ErrnoText("listen", errno);
    } else {
      break;
    }
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", address, " for metrics: ", error));
  }

  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  char host[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len) == 0) {
    if (bound.ss_family == AF_INET6) {
      const auto* a = reinterpret_cast<const sockaddr_in6*>(&bound);
      inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
      port = ntohs(a->sin6_port);
    } else {
      const auto* a = reinterpret_cast<const sockaddr_in*>(&bound);
      inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
      port = ntohs(a->sin_port);
    }
  }

  int wake[2];
  if (pipe2(wake, O_NONBLOCK | O_CLOEXEC) != 0) {
    const int err = errno;
    close(fd);
    return absl::InternalError(ErrnoText("metrics server: pipe2", err));
  }
  std::unique_ptr<MetricsHttpServer> s(
      new MetricsHttpServer(fd, wake[0], wake[1], std::move(render), options));
  s->port_ = port;
  s->address_ = bound.ss_family == AF_INET6 ? absl::StrCat("[", host, "]:", port)
                                            : absl::StrCat(host, ":", port);
  s->thread_ = std::thread([p = s.get()] { p->Run(); });
  return s;
}

MetricsHttpServer::MetricsHttpServer(int listen_fd, int wake_read, int wake_write, RenderFn render,
                                     const MetricsHttpOptions& options)
    : listen_fd_(listen_fd),
      wake_read_(wake_read),
      wake_write_(wake_write),
      render_(std::move(render)),
      options_(options) {}

MetricsHttpServer::~MetricsHttpServer() { Stop(); }

void MetricsHttpServer::Stop() {
  if (!thread_.joinable()) return;
  stop_.store(true);
  const char byte = 0;
  (void)!write(wake_write_, &byte, 1);
  thread_.join();
  close(listen_fd_);
  close(wake_read_);
  close(wake_write_);
}

void MetricsHttpServer::Run() {
  const int64_t timeout_ns = absl::ToInt64Nanoseconds(options_.client_timeout);
  std::vector<Conn> conns;
  std::vector<pollfd> fds;
  while (!stop_.load()) {
    int64_t now = MonotonicNowNs();
    fds.clear();
    fds.push_back({.fd = wake_read_, .events = POLLIN, .revents = 0});
    // At the connection limit the listener is not polled: new clients wait in the backlog.
    const bool accepting = static_cast<int>(conns.size()) < options_.max_connections;
    fds.push_back({.fd = accepting ? listen_fd_ : -1, .events = POLLIN, .revents = 0});
    int64_t wait_ns = int64_t{kMaxPollMs} * 1'000'000;
    for (const Conn& c : conns) {
      fds.push_back(
          {.fd = c.fd,
           .events = static_cast<short>(c.phase == Conn::Phase::kWriting ? POLLOUT : POLLIN),
           .revents = 0});
      wait_ns = std::min(wait_ns, c.deadline_ns - now);
    }
    const int wait_ms = static_cast<int>(std::max<int64_t>(0, (wait_ns + 999'999) / 1'000'000));
    if (poll(fds.data(), fds.size(), wait_ms) < 0 && errno != EINTR) break;
    if (stop_.load()) break;
    now = MonotonicNowNs();

    for (size_t i = 0; i < conns.size(); ++i) {
      Conn& c = conns[i];
      const short ev = fds[i + 2].revents;
      if (ev == 0) continue;
      if (c.phase == Conn::Phase::kWriting) {
        if (ev & (POLLERR | POLLNVAL)) {
          CloseConn(c);
        } else {
          Write(c, now);
        }
      } else {
        // POLLHUP/POLLERR surface as recv() returning 0 or an error.
        Read(c, render_, options_.max_request_bytes, now);
      }
    }
    for (Conn& c : conns) {
      if (c.fd >= 0 && now >= c.deadline_ns) CloseConn(c);  // too slow, or drained long enough
    }
    std::erase_if(conns, [](const Conn& c) { return c.fd < 0; });

    if (fds[1].revents & POLLIN) {
      while (static_cast<int>(conns.size()) < options_.max_connections) {
        const int cfd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cfd < 0) break;  // EAGAIN, or a connection that died in the backlog
        Conn& c = conns.emplace_back();
        c.fd = cfd;
        c.deadline_ns = now + timeout_ns;
      }
    }
  }
  for (Conn& c : conns) CloseConn(c);
}

}  // namespace quantkv
