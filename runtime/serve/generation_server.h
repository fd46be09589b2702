// Assembles the gRPC server of `quantkv serve`: the Generation service, the standard
// grpc.health.v1 Health service, server reflection (when built with it), the message size
// limit, TLS and the API key. Shared by the command and the in-process tests.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/server.h"
#include "runtime/serve/engine_loop.h"
#include "runtime/serve/generation_service.h"

namespace quantkv {

struct GenerationServerOptions {
  // HOST:PORT; port 0 picks a free one (see port()). Loopback unless the caller asks for
  // more: a model server should not be on every interface by accident.
  std::string listen = "127.0.0.1:50051";
  std::string api_key;  // empty: no authentication
  // PEM contents; both set: TLS (grpc::SslServerCredentials), both empty: plaintext.
  std::string tls_cert_pem;
  std::string tls_key_pem;
  std::string model_path;  // reported by ModelInfo
};

class GenerationServer {
 public:
  // `loop` is not owned and must outlive the server.
  static absl::StatusOr<std::unique_ptr<GenerationServer>> Start(
      EngineLoop* loop, const GenerationServerOptions& options);
  ~GenerationServer();  // Shutdown()

  int port() const { return port_; }
  // The address clients dial, with the port actually bound.
  const std::string& address() const { return address_; }

  // Stops taking requests: the loop is shut down first, so in-flight streams end with
  // FINISH_REASON_ABORT, then gRPC waits up to `grace` for handlers. Idempotent.
  void Shutdown(absl::Duration grace = absl::Seconds(5));

 private:
  GenerationServer() = default;

  EngineLoop* loop_ = nullptr;
  std::unique_ptr<GenerationService> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::string address_;
  bool shut_down_ = false;
};

}  // namespace quantkv
