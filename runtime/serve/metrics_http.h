// A minimal HTTP/1.1 server for Prometheus scrapes: `GET /metrics` answers 200 with the
// text a callback renders, as `text/plain; version=0.0.4`. Nothing else is served (404 for
// other paths, 405 for other methods, 400 for a request line that is not HTTP or too long).
//
// It is deliberately not a general web server: one background thread multiplexes the
// listening socket and a bounded number of connections with poll(); every connection is
// closed after one response, and one that does not complete its request within
// client_timeout is dropped, so idle or slow clients cannot wedge the scrape endpoint or
// Stop(). It has no TLS and no authentication: bind it to loopback (or a private network)
// and let the scraper reach it there.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace quantkv {

struct MetricsHttpOptions {
  // A connection that has not sent a complete request (or read its response) by then is
  // closed without one.
  absl::Duration client_timeout = absl::Seconds(10);
  // Request line plus headers; beyond it the request is answered 400.
  int64_t max_request_bytes = 8192;
  // Connections served at once; more wait in the listen backlog.
  int max_connections = 32;
};

class MetricsHttpServer {
 public:
  // Produces the body of `GET /metrics`. Called on the server thread, so it must be
  // thread-safe with respect to whatever records the metrics.
  using RenderFn = std::function<std::string()>;

  // Listens on `listen` = HOST:PORT ("127.0.0.1:9090", "[::1]:0"; port 0 picks a free one)
  // and starts the thread. INVALID_ARGUMENT for a malformed address, UNAVAILABLE naming the
  // address when it cannot be resolved, bound or listened on.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      std::string_view listen, RenderFn render, const MetricsHttpOptions& options = {});
  ~MetricsHttpServer();  // Stop()
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // The bound address as HOST:PORT (numeric host, IPv6 in brackets, the actual port).
  const std::string& address() const { return address_; }
  int port() const { return port_; }

  // Closes the listening socket and every connection and joins the thread; returns without
  // waiting for clients. Idempotent.
  void Stop();

 private:
  MetricsHttpServer(int listen_fd, int wake_read, int wake_write, RenderFn render,
                    const MetricsHttpOptions& options);
  void Run();

  int listen_fd_;
  // A self-pipe: Stop() writes a byte so that poll() returns at once.
  int wake_read_;
  int wake_write_;
  RenderFn render_;
  MetricsHttpOptions options_;
  std::string address_;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace quantkv
