#include "runtime/serve/generation_server.h"

#include "absl/strings/str_cat.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#ifdef QUANTKV_GRPC_REFLECTION
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#endif

namespace quantkv {

absl::StatusOr<std::unique_ptr<GenerationServer>> GenerationServer::Start(
    EngineLoop* loop, const GenerationServerOptions& options) {
  if (options.tls_cert_pem.empty() != options.tls_key_pem.empty()) {
    return absl::InvalidArgumentError("TLS needs both a certificate and its key");
  }
  std::unique_ptr<GenerationServer> s(new GenerationServer());
  s->loop_ = loop;
  s->service_ = std::make_unique<GenerationService>(GenerationServiceConfig{
      .loop = loop, .api_key = options.api_key, .model_path = options.model_path});

  std::shared_ptr<grpc::ServerCredentials> creds;
  if (options.tls_cert_pem.empty()) {
    creds = grpc::InsecureServerCredentials();
  } else {
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({options.tls_key_pem, options.tls_cert_pem});
    creds = grpc::SslServerCredentials(ssl);
  }
  grpc::EnableDefaultHealthCheckService(true);
#ifdef QUANTKV_GRPC_REFLECTION
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
#endif
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, creds, &s->port_);
  builder.SetMaxReceiveMessageSize(kMaxRequestBytes);
  builder.RegisterService(s->service_.get());
  s->server_ = builder.BuildAndStart();
  if (s->server_ == nullptr || s->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen));
  }
  // The host part as given, with the port actually bound (matters for port 0).
  const size_t colon = options.listen.rfind(':');
  s->address_ = absl::StrCat(options.listen.substr(0, colon), ":", s->port_);
  return s;
}

GenerationServer::~GenerationServer() { Shutdown(); }

void GenerationServer::Shutdown(absl::Duration grace) {
  if (shut_down_) return;
  shut_down_ = true;
  // Aborting the loop first ends every waiting stream handler, so gRPC's shutdown does not
  // sit out its deadline on streams that would otherwise run to max_tokens.
  if (auto* health = server_->GetHealthCheckService()) health->Shutdown();
  loop_->Shutdown();
  server_->Shutdown(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(grace));
  server_->Wait();
}

}  // namespace quantkv
