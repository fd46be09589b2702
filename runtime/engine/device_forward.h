// The forward pass on an accelerator, behind the CPU Engine (EngineConfig::device): the
// Engine keeps every piece of bookkeeping (sequences, lengths, the KV cache's block
// allocator and block tables, as TensorRT-LLM keeps block metadata apart from device
// storage) and hands each Step to a DeviceForward, which holds the weights, the KV pool's
// bytes and each sequence's protected rows in device memory. The pool has exactly the host
// cache's blocks, with the same slab layout (kernels/kv_slab_format.h), so block ids mean the
// same on both sides and admission (capacity, Stats) is unchanged.
//
// No CUDA types here: builds without CUDA compile this header and get an error from Create.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/rope.h"
#include "runtime/comm/communicator.h"
#include "runtime/comm/tensor_shard.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/model/weight_source.h"

namespace quantkv {

// What the engine learns about its device before sizing the KV pool.
struct DeviceInfo {
  int ordinal = 0;  // the CUDA device this process uses
  std::string name;
  int64_t free_bytes = 0;
  int64_t total_bytes = 0;
  int sm_major = 0, sm_minor = 0;
};

// The device of this process: the node-local rank's GPU (OMPI_COMM_WORLD_LOCAL_RANK,
// MPI_LOCALRANKID or SLURM_LOCALID, else 0) modulo the devices present. UNAVAILABLE naming
// why when there is none or this build has no CUDA.
absl::StatusOr<DeviceInfo> OpenCudaDevice();

// True when this build has the CUDA backend and a device is usable (EngineConfig::device
// "auto" picks "cuda" then).
bool CudaDeviceUsable();

struct DeviceForwardConfig {
  // Weight element type after dequantization at load: "bf16" (the default: half the
  // memory, tensor cores) or "f32" (exact fp32 GEMMs, for comparisons with the CPU).
  std::string weights = "bf16";
  int64_t max_chunk_tokens = 512;
};

// One sequence of a step as the device sees it: its bookkeeping after Engine::Step's
// Reserve (blocks for every block full at length + tokens.size(); length is before the step).
struct DeviceStepInput {
  int64_t seq = 0;  // SequenceId
  const SequenceKv* kv = nullptr;
  std::span<const int32_t> tokens;
  bool all_logits = false;
};

class DeviceForward {
 public:
  virtual ~DeviceForward() = default;
  // Runs the step and appends logits rows in input order as Engine::Step does. On error the
  // sequences' device state may be partly written; the engine then fails the step without
  // advancing any length, so the rows are overwritten when the step is retried.
  virtual absl::Status Step(std::span<const DeviceStepInput> inputs, std::vector<float>* logits,
                            int64_t* comm_ns) = 0;
  // Frees the device state of `seq` (its protected rows); its blocks are the allocator's.
  virtual void Release(int64_t seq) = 0;
  // Device bytes held: weights, KV pool, activations.
  virtual int64_t weight_bytes() const = 0;
  virtual int64_t kv_pool_bytes() const = 0;
  virtual std::string Describe() const = 0;  // "cuda:0 NVIDIA H200 (sm_90), bf16 weights"
};

// The whole model's (or with a communicator, rank comm->rank()'s shard of the) dense LLaMA
// forward on this process's CUDA device: weights dequantized on the host and uploaded once,
// a KV pool of cache.allocator().num_blocks() blocks of the cache's policy. UNIMPLEMENTED
// naming the feature for what it does not do (MoE layers, codecs without a plain slab
// layout, per-head codecs, pre-RoPE keys, rotations); UNAVAILABLE without a device.
absl::StatusOr<std::unique_ptr<DeviceForward>> CreateCudaForward(
    const WeightSource& weights, const ModelConfig& config, const TensorShard& shard,
    const kernels::RopeTable& rope, const KvCache& cache, Communicator* comm,
    const DeviceForwardConfig& device_config);

}  // namespace quantkv
