// The Worker service (proto/quantkv/v1/worker.proto) of a tensor-parallel rank other than the
// coordinator: it runs the steps rank 0 sends on this rank's shard of the engine and holds
// only per-sequence cache state, keyed by the coordinator's sequence ids.
//
// A step the worker cannot run (an unknown sequence, a step id out of order) means the
// ranks' states have diverged while the others are about to wait for this rank in the
// step's collectives; WorkerServerOptions::on_desync decides what happens then (the
// command ends the job at once rather than letting the collectives time out).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/server.h"
#include "runtime/engine/engine.h"

namespace quantkv {

// Metadata key of the job's shared secret, required in every Worker call.
inline constexpr char kWorkerTokenMetadata[] = "x-quantkv-worker-token";

// 32 hex digits from std::random_device: the token rank 0 makes and broadcasts.
std::string MakeWorkerToken();

struct WorkerServerOptions {
  // HOST:PORT; port 0 picks a free one (see address()).
  std::string listen = "127.0.0.1:0";
  std::string token;  // must not be empty
  int rank = 1;
  int world_size = 2;
  std::string model_path;  // reported by Info
  // Called (on a gRPC thread) with the reason when a Step with inputs cannot be run here.
  std::function<void(const absl::Status&)> on_desync;
};

class WorkerServer {
 public:
  // `engine` is not owned and must outlive the server.
  static absl::StatusOr<std::unique_ptr<WorkerServer>> Start(Engine* engine,
                                                             const WorkerServerOptions& options);
  ~WorkerServer();  // Stop()

  // HOST:PORT with the bound port.
  const std::string& address() const { return address_; }
  int port() const { return port_; }

  // Blocks until a Shutdown call arrives (true) or `deadline` passes (false).
  bool WaitForShutdown(absl::Time deadline);
  // When the last authenticated call arrived (the start time before any): rank 0 sends a
  // Health call every few seconds, so a long silence means it is gone.
  absl::Time last_call() const;
  // Stops serving; waits for calls in flight. Idempotent.
  void Stop();

 private:
  class Service;
  WorkerServer() = default;
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
  int port_ = 0;
  bool stopped_ = false;
};

}  // namespace quantkv
