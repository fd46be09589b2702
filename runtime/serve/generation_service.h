// quantkv.v1.Generation over an EngineLoop (sync gRPC API). Handlers validate and tokenize
// on the gRPC thread, submit to the loop, and a streaming handler then writes its request's
// events as they arrive, polling ServerContext::IsCancelled() between waits so a client that
// goes away (or whose deadline passes) frees its KV blocks at once.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "quantkv/v1/generation.grpc.pb.h"
#include "runtime/serve/engine_loop.h"
#include "runtime/serve/service_checks.h"

namespace quantkv {

struct GenerationServiceConfig {
  EngineLoop* loop = nullptr;  // not owned; outlives the service
  std::string api_key;         // empty: no authentication
  std::string model_path;      // reported by ModelInfo
};

class GenerationService final : public v1::Generation::Service {
 public:
  explicit GenerationService(const GenerationServiceConfig& config);

  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override;
  grpc::Status Tokenize(grpc::ServerContext* context, const v1::TokenizeRequest* request,
                        v1::TokenizeResponse* response) override;
  grpc::Status ModelInfo(grpc::ServerContext* context, const v1::ModelInfoRequest* request,
                         v1::ModelInfoResponse* response) override;
  grpc::Status Stats(grpc::ServerContext* context, const v1::StatsRequest* request,
                     v1::StatsResponse* response) override;
  grpc::Status Abort(grpc::ServerContext* context, const v1::AbortRequest* request,
                     v1::AbortResponse* response) override;
  grpc::Status Score(grpc::ServerContext* context, const v1::ScoreRequest* request,
                     v1::ScoreResponse* response) override;

 private:
  absl::Status Authorize(const grpc::ServerContext* context) const;
  // Prompt ids of a text or chat prompt, as Generate feeds them.
  absl::StatusOr<std::vector<int32_t>> EncodeText(const std::string& text) const;
  absl::StatusOr<std::vector<int32_t>> EncodeChat(const v1::ChatPrompt& chat) const;

  GenerationServiceConfig config_;
  RequestLimits limits_;
};

}  // namespace quantkv
