// The dense LLaMA forward on one CUDA device (runtime/engine/device_forward.h). Host code:
// it plans each step on the host, uploads the plan (tokens, positions, block tables, the
// per-layer views of every sequence, the blocks to encode) in one copy, and launches the
// kernels of kernels/cuda/ on one stream. Logits come back to the host for sampling (the
// documented copy: vocab floats per returned row).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "kernels/activation.h"
#include "kernels/attention.h"
#include "kernels/cuda/device.h"
#include "kernels/dequantize.h"
#include "kernels/embedding.h"
#include "kernels/fp16.h"
#include "kernels/kv_encode.h"
#include "kernels/kv_slab_format.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "runtime/engine/device_forward.h"
#include "runtime/util/status_macros.h"

namespace quantkv {
namespace {

using kernels::cuda::CudaCheck;

// A device allocation; grows (never shrinks) when asked for more.
class DeviceMemory {
 public:
  DeviceMemory() = default;
  ~DeviceMemory() { Free(); }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  DeviceMemory(DeviceMemory&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  DeviceMemory& operator=(DeviceMemory&& o) noexcept {
    if (this != &o) {
      Free();
      std::swap(ptr_, o.ptr_);
      std::swap(bytes_, o.bytes_);
    }
    return *this;
  }

  absl::Status Reserve(int64_t bytes, const char* what) {
    if (bytes <= bytes_) return absl::OkStatus();
    Free();
    void* p = nullptr;
    QKV_RETURN_IF_ERROR(CudaCheck(cudaMalloc(&p, static_cast<size_t>(std::max<int64_t>(bytes, 1))),
                                  absl::StrFormat("cudaMalloc %d bytes for %s", bytes, what)));
    ptr_ = p;
    bytes_ = bytes;
    return absl::OkStatus();
  }
  void Free() {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  template <typename T = uint8_t>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  int64_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  int64_t bytes_ = 0;
};

// Pinned host memory for the step plan and the tensor-parallel staging.
class PinnedMemory {
 public:
  ~PinnedMemory() {
    if (ptr_ != nullptr) cudaFreeHost(ptr_);
  }
  absl::Status Reserve(int64_t bytes) {
    if (bytes <= bytes_) return absl::OkStatus();
    if (ptr_ != nullptr) cudaFreeHost(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
    const int64_t want = std::max<int64_t>(bytes, 1 << 16);
    QKV_RETURN_IF_ERROR(CudaCheck(cudaMallocHost(&ptr_, static_cast<size_t>(want)),
                                  absl::StrFormat("cudaMallocHost %d bytes", want)));
    bytes_ = want;
    return absl::OkStatus();
  }
  uint8_t* get() const { return static_cast<uint8_t*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  int64_t bytes_ = 0;
};

int LocalRank() {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"}) {
    if (const char* v = std::getenv(name)) return std::max(0, std::atoi(v));
  }
  return 0;
}

// A matrix in device memory, [rows][cols] of the chosen weight type.
struct DeviceMatrix {
  DeviceMemory mem;
  int64_t rows = 0, cols = 0;
};

struct DeviceLayer {
  DeviceMatrix q, k, v, o, gate, up, down;
  DeviceMemory attn_norm, ffn_norm, q_bias, k_bias, v_bias, o_bias, q_norm, k_norm;
  bool has_q_bias = false, has_o_bias = false, has_qk_norm = false;
  kernels::KvSlabFormat k_format, v_format;
  int64_t k_bytes = 0, v_bytes = 0;  // one block's K (V) slabs of this layer, all heads
  int64_t region = 0;                // offset of this layer's region in the pool
  float score_scale = 1.0f;          // 1 / temperature of the KV policy
};

// A sequence's protected rows on the device: [layer][K|V][ring_tokens][kv_dim] and
// [layer][K|V][sink_tokens][kv_dim] elements of the cache's protected storage.
struct DeviceSequence {
  DeviceMemory ring, sinks;
};

class CudaForward final : public DeviceForward {
 public:
  static absl::StatusOr<std::unique_ptr<CudaForward>> Create(
      const WeightSource& weights, const ModelConfig& config, const TensorShard& shard,
      const kernels::RopeTable& rope, const KvCache& cache, Communicator* comm,
      const DeviceForwardConfig& dc);
  ~CudaForward() override;

  absl::Status Step(std::span<const DeviceStepInput> inputs, std::vector<float>* logits,
                    int64_t* comm_ns) override;
  void Release(int64_t seq) override { sequences_.erase(seq); }
  int64_t weight_bytes() const override { return weight_bytes_; }
  int64_t kv_pool_bytes() const override { return pool_.bytes(); }
  std::string Describe() const override {
    return absl::StrFormat("cuda:%d %s (sm_%d%d), %s weights", info_.ordinal, info_.name,
                           info_.sm_major, info_.sm_minor,
                           gemm_weights_ == kernels::cuda::GemmWeights::kBF16 ? "bf16" : "f32");
  }

 private:
  CudaForward() = default;
  absl::Status LoadWeights(const WeightSource& w);
  absl::Status Upload(const void* host, int64_t bytes, DeviceMemory* dst, const char* what);
  // Dequantizes a [rows x cols] tensor, keeps rows [r0, r0 + nr) and columns [c0, c0 + nc),
  // and uploads it as the GEMM weight type.
  absl::Status UploadMatrix(const WeightSource& w, const std::string& name, int64_t rows,
                            int64_t cols, ShardRange keep_rows, ShardRange keep_cols,
                            DeviceMatrix* out);
  absl::Status UploadVector(const WeightSource& w, const std::string& name, int64_t n,
                            ShardRange keep, DeviceMemory* out);
  absl::Status SetUpCache(const KvCache& cache);
  absl::Status Gemm(const float* x, const DeviceMatrix& w, float* y, int64_t n, bool accumulate);
  // Sums a row-parallel partial output over the group through pinned host memory.
  absl::Status ReduceSum(float* x, int64_t n, int64_t layer, int64_t* comm_ns);
  absl::Status RunStep(std::span<const DeviceStepInput> inputs, std::vector<float>* logits,
                       int64_t* comm_ns);

  DeviceInfo info_;
  ModelConfig config_;
  TensorShard shard_;
  Communicator* comm_ = nullptr;
  DeviceForwardConfig dc_;
  kernels::cuda::GemmWeights gemm_weights_ = kernels::cuda::GemmWeights::kBF16;
  cudaStream_t stream_ = nullptr;
  void* cublas_ = nullptr;
  int64_t weight_bytes_ = 0;

  std::vector<DeviceLayer> layers_;
  DeviceMatrix embedding_, lm_head_;
  bool tied_ = false;
  DeviceMemory output_norm_;
  DeviceMemory rope_cos_, rope_sin_;
  int64_t rope_positions_ = 0;
  bool rope_neox_ = false;

  // KV pool: [layer region][block][K slabs | V slabs].
  DeviceMemory pool_;
  int64_t n_blocks_ = 0;
  int64_t block_tokens_ = 0, ring_tokens_ = 0, sink_tokens_ = 0, window_tokens_ = 0;
  kernels::KvStorage storage_ = kernels::KvStorage::kF16;
  int64_t row_elems_ = 0;  // kv_dim of this rank
  int64_t elem_bytes_ = 2;
  absl::flat_hash_map<int64_t, DeviceSequence> sequences_;

  // Step buffers (grown on demand).
  DeviceMemory h_, xn_, q_, k_, v_, attn_, proj_, gate_, up_, final_, logits_, gemm_scratch_,
      attn_workspace_, plan_dev_;
  PinnedMemory plan_host_, staging_;
};

CudaForward::~CudaForward() {
  if (cublas_ != nullptr) kernels::cuda::DestroyCublasHandle(cublas_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::Status CudaForward::Upload(const void* host, int64_t bytes, DeviceMemory* dst,
                                 const char* what) {
  QKV_RETURN_IF_ERROR(dst->Reserve(bytes, what));
  weight_bytes_ += bytes;
  return CudaCheck(cudaMemcpy(dst->get(), host, static_cast<size_t>(bytes), cudaMemcpyHostToDevice),
                   absl::StrFormat("upload %s", what));
}

absl::Status CudaForward::UploadMatrix(const WeightSource& w, const std::string& name, int64_t rows,
                                       int64_t cols, ShardRange keep_rows, ShardRange keep_cols,
                                       DeviceMatrix* out) {
  const WeightTensor* t = w.Find(name);
  if (t == nullptr) {
    return absl::NotFoundError(absl::StrFormat("%s: missing tensor '%s'", w.origin(), name));
  }
  if (t->dims.size() != 2 || t->dims[0] != cols || t->dims[1] != rows) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: tensor '%s' does not have the shape the config implies (%d x %d)",
                        w.origin(), name, rows, cols));
  }
  const kernels::GgmlTypeInfo& info = kernels::GgmlTypeInfoOf(t->type);
  const int64_t row_bytes = cols / info.block_size * info.type_size;
  std::vector<float> row(static_cast<size_t>(cols));
  std::vector<float> f32(static_cast<size_t>(keep_rows.size * keep_cols.size));
  for (int64_t r = 0; r < keep_rows.size; ++r) {
    QKV_RETURN_IF_ERROR(kernels::DequantizeRow(t->type, t->data + (keep_rows.begin + r) * row_bytes,
                                               row.data(), cols));
    std::copy_n(row.data() + keep_cols.begin, keep_cols.size, f32.data() + r * keep_cols.size);
  }
  out->rows = keep_rows.size;
  out->cols = keep_cols.size;
  if (gemm_weights_ == kernels::cuda::GemmWeights::kF32) {
    return Upload(f32.data(), static_cast<int64_t>(f32.size()) * 4, &out->mem, name.c_str());
  }
  std::vector<uint16_t> b16(f32.size());
  for (size_t i = 0; i < f32.size(); ++i) b16[i] = kernels::Fp32ToBf16(f32[i]);
  return Upload(b16.data(), static_cast<int64_t>(b16.size()) * 2, &out->mem, name.c_str());
}

absl::Status CudaForward::UploadVector(const WeightSource& w, const std::string& name, int64_t n,
                                       ShardRange keep, DeviceMemory* out) {
  const WeightTensor* t = w.Find(name);
  if (t == nullptr) {
    return absl::NotFoundError(absl::StrFormat("%s: missing tensor '%s'", w.origin(), name));
  }
  if (t->dims.size() != 1 || t->dims[0] != n) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: tensor '%s' is not a vector of %d", w.origin(), name, n));
  }
  std::vector<float> v(static_cast<size_t>(n));
  QKV_RETURN_IF_ERROR(kernels::DequantizeRow(t->type, t->data, v.data(), n));
  return Upload(v.data() + keep.begin, keep.size * 4, out, name.c_str());
}

absl::Status CudaForward::LoadWeights(const WeightSource& w) {
  const ModelConfig& c = config_;
  const ShardRange all_hidden{0, c.hidden};
  const ShardRange q_rows{shard_.heads.begin * c.head_dim, shard_.heads.size * c.head_dim};
  const ShardRange kv_rows{shard_.kv_heads.begin * c.head_dim, shard_.kv_heads.size * c.head_dim};
  const ShardRange ff = shard_.intermediate;
  const int64_t q_dim = c.n_heads * c.head_dim;
  const int64_t kv_dim = c.n_kv_heads * c.head_dim;
  QKV_RETURN_IF_ERROR(UploadMatrix(w, "token_embd.weight", c.vocab_size, c.hidden,
                                   {0, c.vocab_size}, all_hidden, &embedding_));
  tied_ = w.Find("output.weight") == nullptr;
  if (!tied_) {
    QKV_RETURN_IF_ERROR(UploadMatrix(w, "output.weight", c.vocab_size, c.hidden, {0, c.vocab_size},
                                     all_hidden, &lm_head_));
  }
  QKV_RETURN_IF_ERROR(UploadVector(w, "output_norm.weight", c.hidden, all_hidden, &output_norm_));
  for (int64_t i = 0; i < c.n_layers; ++i) {
    DeviceLayer& l = layers_[i];
    const std::string p = absl::StrFormat("blk.%d.", i);
    QKV_RETURN_IF_ERROR(
        UploadMatrix(w, p + "attn_q.weight", q_dim, c.hidden, q_rows, all_hidden, &l.q));
    QKV_RETURN_IF_ERROR(
        UploadMatrix(w, p + "attn_k.weight", kv_dim, c.hidden, kv_rows, all_hidden, &l.k));
    QKV_RETURN_IF_ERROR(
        UploadMatrix(w, p + "attn_v.weight", kv_dim, c.hidden, kv_rows, all_hidden, &l.v));
    QKV_RETURN_IF_ERROR(
        UploadMatrix(w, p + "attn_output.weight", c.hidden, q_dim, all_hidden, q_rows, &l.o));
    QKV_RETURN_IF_ERROR(
        UploadMatrix(w, p + "ffn_gate.weight", c.intermediate, c.hidden, ff, all_hidden, &l.gate));
    QKV_RETURN_IF_ERROR(
        UploadMatrix(w, p + "ffn_up.weight", c.intermediate, c.hidden, ff, all_hidden, &l.up));
    QKV_RETURN_IF_ERROR(
        UploadMatrix(w, p + "ffn_down.weight", c.hidden, c.intermediate, all_hidden, ff, &l.down));
    QKV_RETURN_IF_ERROR(
        UploadVector(w, p + "attn_norm.weight", c.hidden, all_hidden, &l.attn_norm));
    QKV_RETURN_IF_ERROR(UploadVector(w, p + "ffn_norm.weight", c.hidden, all_hidden, &l.ffn_norm));
    if (c.qk_norm) {
      l.has_qk_norm = true;
      QKV_RETURN_IF_ERROR(
          UploadVector(w, p + "attn_q_norm.weight", c.head_dim, {0, c.head_dim}, &l.q_norm));
      QKV_RETURN_IF_ERROR(
          UploadVector(w, p + "attn_k_norm.weight", c.head_dim, {0, c.head_dim}, &l.k_norm));
    }
    if (c.attention_bias) {
      l.has_q_bias = true;
      QKV_RETURN_IF_ERROR(UploadVector(w, p + "attn_q.bias", q_dim, q_rows, &l.q_bias));
      QKV_RETURN_IF_ERROR(UploadVector(w, p + "attn_k.bias", kv_dim, kv_rows, &l.k_bias));
      QKV_RETURN_IF_ERROR(UploadVector(w, p + "attn_v.bias", kv_dim, kv_rows, &l.v_bias));
    }
    if (w.Find(p + "attn_output.bias") != nullptr) {
      l.has_o_bias = true;
      QKV_RETURN_IF_ERROR(UploadVector(w, p + "attn_output.bias", c.hidden, all_hidden, &l.o_bias));
    }
  }
  return absl::OkStatus();
}

absl::Status CudaForward::SetUpCache(const KvCache& cache) {
  const KvPolicy& policy = cache.policy();
  if (policy.pre_rope_keys || policy.rotate_k || policy.rotate_v) {
    return absl::UnimplementedError(absl::StrFormat(
        "--device cuda: the KV policy '%s' stores keys before RoPE or Hadamard-rotated; the "
        "CUDA cache does neither yet (use --device cpu)",
        policy.name));
  }
  if (cache.config().page_summaries || cache.elastic()) {
    return absl::UnimplementedError(
        "--device cuda: page selection and elastic re-quantization run on the CPU only");
  }
  block_tokens_ = cache.block_tokens();
  ring_tokens_ = cache.ring_tokens();
  sink_tokens_ = policy.sink_tokens;
  window_tokens_ = policy.window_tokens;
  storage_ = cache.storage();
  elem_bytes_ = kernels::KvStorageBytes(storage_);
  row_elems_ = shard_.kv_heads.size * config_.head_dim;
  n_blocks_ = cache.allocator().num_blocks();
  int64_t per_block = 0;
  for (int64_t l = 0; l < config_.n_layers; ++l) {
    if (policy.HasHeadOverrides(l)) {
      return absl::UnimplementedError(absl::StrFormat(
          "--device cuda: layer %d's KV heads use different codecs; the CUDA cache takes one "
          "codec per layer for K and one for V",
          l));
    }
    const LayerKvPolicy& lp = policy.ForLayer(l);
    DeviceLayer& dl = layers_[l];
    for (int kv = 0; kv < 2; ++kv) {
      const kernels::KvCodecSpec& spec = kv == 0 ? lp.k : lp.v;
      absl::StatusOr<kernels::KvSlabFormat> f =
          kernels::KvSlabFormatOf(spec, config_.head_dim, block_tokens_);
      if (!f.ok()) {
        return absl::Status(f.status().code(),
                            absl::StrFormat("--device cuda, layer %d %s: %s", l, kv ? "V" : "K",
                                            f.status().message()));
      }
      (kv == 0 ? dl.k_format : dl.v_format) = *f;
    }
    dl.k_bytes = shard_.kv_heads.size * dl.k_format.slab_bytes;
    dl.v_bytes = shard_.kv_heads.size * dl.v_format.slab_bytes;
    dl.region = per_block * n_blocks_;  // regions follow each other
    per_block += dl.k_bytes + dl.v_bytes;
    dl.score_scale = policy.ScoreScale(l);
  }
  const int64_t pool_bytes = per_block * n_blocks_;
  size_t free_b = 0, total_b = 0;
  QKV_RETURN_IF_ERROR(CudaCheck(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo"));
  if (pool_bytes > static_cast<int64_t>(free_b)) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "--device cuda: the KV pool of %d blocks needs %d MB, the device has %d MB free; lower "
        "--kv-budget-mb or --gpu-memory-fraction",
        n_blocks_, pool_bytes >> 20, static_cast<int64_t>(free_b) >> 20));
  }
  return pool_.Reserve(pool_bytes, "the KV pool");
}

absl::StatusOr<std::unique_ptr<CudaForward>> CudaForward::Create(
    const WeightSource& weights, const ModelConfig& config, const TensorShard& shard,
    const kernels::RopeTable& rope, const KvCache& cache, Communicator* comm,
    const DeviceForwardConfig& dc) {
  if (config.moe.enabled()) {
    return absl::UnimplementedError(
        "--device cuda: mixture-of-experts layers run on the CPU only (use --device cpu)");
  }
  if (dc.weights != "bf16" && dc.weights != "f32") {
    return absl::InvalidArgumentError(
        absl::StrFormat("--gpu-weights '%s' is not one of bf16, f32", dc.weights));
  }
  std::unique_ptr<CudaForward> f(new CudaForward());
  QKV_ASSIGN_OR_RETURN(f->info_, OpenCudaDevice());
  f->config_ = config;
  f->shard_ = shard;
  f->comm_ = shard.whole() ? nullptr : comm;
  f->dc_ = dc;
  f->gemm_weights_ =
      dc.weights == "bf16" ? kernels::cuda::GemmWeights::kBF16 : kernels::cuda::GemmWeights::kF32;
  QKV_RETURN_IF_ERROR(
      CudaCheck(cudaStreamCreateWithFlags(&f->stream_, cudaStreamNonBlocking), "cudaStreamCreate"));
  QKV_ASSIGN_OR_RETURN(f->cublas_, kernels::cuda::CreateCublasHandle(f->stream_));
  // The cache first: a policy the device cannot hold is refused before seconds of uploads
  // (and "auto" then falls back to the CPU at once).
  f->layers_.resize(config.n_layers);
  QKV_RETURN_IF_ERROR(f->SetUpCache(cache));
  QKV_RETURN_IF_ERROR(f->LoadWeights(weights));
  // cos/sin for every position a sequence may reach (Engine::CheckStep caps it at 16x the
  // context), capped at 2^18 positions (64 MB at head_dim 64).
  f->rope_positions_ = std::min<int64_t>(config.context_length * 16, int64_t{1} << 18);
  f->rope_neox_ = rope.spec().neox;
  std::vector<float> cos, sin;
  rope.CosSin(f->rope_positions_, &cos, &sin);
  QKV_RETURN_IF_ERROR(
      f->Upload(cos.data(), static_cast<int64_t>(cos.size()) * 4, &f->rope_cos_, "RoPE cos"));
  QKV_RETURN_IF_ERROR(
      f->Upload(sin.data(), static_cast<int64_t>(sin.size()) * 4, &f->rope_sin_, "RoPE sin"));
  return f;
}

absl::Status CudaForward::Gemm(const float* x, const DeviceMatrix& w, float* y, int64_t n,
                               bool accumulate) {
  const int64_t need = kernels::cuda::GemmScratchBytes(gemm_weights_, n, w.cols);
  QKV_RETURN_IF_ERROR(gemm_scratch_.Reserve(need, "GEMM scratch"));
  return kernels::cuda::Gemm(cublas_, x, w.mem.get(), gemm_weights_, y, n, w.cols, w.rows,
                             accumulate, gemm_scratch_.get(), gemm_scratch_.bytes());
}

absl::Status CudaForward::ReduceSum(float* x, int64_t n, int64_t layer, int64_t* comm_ns) {
  const auto start = std::chrono::steady_clock::now();
  QKV_RETURN_IF_ERROR(staging_.Reserve(n * 4));
  float* host = reinterpret_cast<float*>(staging_.get());
  QKV_RETURN_IF_ERROR(CudaCheck(
      cudaMemcpyAsync(host, x, static_cast<size_t>(n) * 4, cudaMemcpyDeviceToHost, stream_),
      "copy partial sums to the host"));
  QKV_RETURN_IF_ERROR(CudaCheck(cudaStreamSynchronize(stream_), "step (before all-reduce)"));
  QKV_RETURN_IF_ERROR(comm_->AllReduceSumForLayer(host, n, layer));
  QKV_RETURN_IF_ERROR(CudaCheck(
      cudaMemcpyAsync(x, host, static_cast<size_t>(n) * 4, cudaMemcpyHostToDevice, stream_),
      "copy sums to the device"));
  *comm_ns +=
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
          .count();
  return absl::OkStatus();
}

// Host plan of a step, laid out in one buffer so that a single copy uploads it; device
// structs inside it point at device addresses of the same buffer.
class PlanBuilder {
 public:
  // Reserves `bytes` (16-byte aligned) and returns its offset.
  int64_t Add(int64_t bytes) {
    const int64_t at = (size_ + 15) / 16 * 16;
    size_ = at + bytes;
    return at;
  }
  int64_t size() const { return size_; }

 private:
  int64_t size_ = 0;
};

absl::Status CudaForward::Step(std::span<const DeviceStepInput> inputs, std::vector<float>* logits,
                               int64_t* comm_ns) {
  absl::Status s = RunStep(inputs, logits, comm_ns);
  // A failed step may have queued copies from the pinned plan and kernels on its buffers:
  // let them finish before the next step rewrites either.
  if (!s.ok()) cudaStreamSynchronize(stream_);
  return s;
}

absl::Status CudaForward::RunStep(std::span<const DeviceStepInput> inputs,
                                  std::vector<float>* logits, int64_t* comm_ns) {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden;
  const int64_t n_heads = shard_.heads.size;
  const int64_t n_kv_heads = shard_.kv_heads.size;
  const int64_t d = c.head_dim;
  const int64_t q_dim = n_heads * d;
  const int64_t kv_dim = n_kv_heads * d;
  const int64_t I = shard_.intermediate.size;
  const int64_t L = c.n_layers;
  const int64_t S = static_cast<int64_t>(inputs.size());
  *comm_ns = 0;

  // Rows, their sequences and positions; the rows whose logits are returned.
  std::vector<int32_t> tokens, positions, row_seq, out_rows;
  int64_t max_context = 0;
  for (int64_t i = 0; i < S; ++i) {
    const DeviceStepInput& in = inputs[i];
    const int64_t base = in.kv->length;
    const int64_t n = static_cast<int64_t>(in.tokens.size());
    if (base + n > rope_positions_) {
      return absl::OutOfRangeError(absl::StrFormat(
          "--device cuda: position %d is past the %d positions of the device RoPE table",
          base + n - 1, rope_positions_));
    }
    for (int64_t j = 0; j < n; ++j) {
      if (in.all_logits || j == n - 1) out_rows.push_back(static_cast<int32_t>(tokens.size()));
      tokens.push_back(in.tokens[j]);
      positions.push_back(static_cast<int32_t>(base + j));
      row_seq.push_back(static_cast<int32_t>(i));
    }
    max_context = std::max(max_context, base + n);
  }
  const int64_t total = static_cast<int64_t>(tokens.size());
  const int64_t n_out = static_cast<int64_t>(out_rows.size());
  if (total == 0) return absl::OkStatus();

  // Device state of new sequences.
  const int64_t ring_bytes = L * 2 * ring_tokens_ * row_elems_ * elem_bytes_;
  const int64_t sink_bytes = L * 2 * sink_tokens_ * row_elems_ * elem_bytes_;
  for (const DeviceStepInput& in : inputs) {
    DeviceSequence& ds = sequences_[in.seq];
    QKV_RETURN_IF_ERROR(ds.ring.Reserve(ring_bytes, "a sequence's KV ring"));
    if (sink_bytes > 0) QKV_RETURN_IF_ERROR(ds.sinks.Reserve(sink_bytes, "a sequence's sinks"));
  }

  // Blocks filled in this step, per input: [length / bt, (length + n) / bt).
  struct Fill {
    int64_t input, block;
  };
  std::vector<Fill> fills;
  for (int64_t i = 0; i < S; ++i) {
    const int64_t before = inputs[i].kv->length;
    const int64_t after = before + static_cast<int64_t>(inputs[i].tokens.size());
    for (int64_t b = before / block_tokens_; b < after / block_tokens_; ++b) {
      if (b >= static_cast<int64_t>(inputs[i].kv->blocks.size())) {
        return absl::InternalError("--device cuda: a filled block was not reserved");
      }
      fills.push_back({i, b});
    }
  }
  const int64_t n_fills = static_cast<int64_t>(fills.size());

  // The plan's layout.
  PlanBuilder pb;
  const int64_t o_tokens = pb.Add(total * 4);
  const int64_t o_positions = pb.Add(total * 4);
  const int64_t o_row_seq = pb.Add(total * 4);
  const int64_t o_out_rows = pb.Add(n_out * 4);
  std::vector<int64_t> o_table(S);
  for (int64_t i = 0; i < S; ++i) {
    o_table[i] =
        pb.Add(std::max<int64_t>(1, static_cast<int64_t>(inputs[i].kv->blocks.size())) * 4);
  }
  const int64_t o_seqs = pb.Add(L * S * static_cast<int64_t>(sizeof(kernels::cuda::DeviceSeqKv)));
  const int64_t o_rows =
      pb.Add(L * 2 * S * static_cast<int64_t>(sizeof(kernels::cuda::KvProtectedRows)));
  const int64_t o_jobs = pb.Add(L * 2 * std::max<int64_t>(n_fills, 1) *
                                static_cast<int64_t>(sizeof(kernels::cuda::KvEncodeJob)));
  QKV_RETURN_IF_ERROR(plan_host_.Reserve(pb.size()));
  QKV_RETURN_IF_ERROR(plan_dev_.Reserve(pb.size(), "the step plan"));
  uint8_t* host = plan_host_.get();
  uint8_t* dev = plan_dev_.get();
  std::memcpy(host + o_tokens, tokens.data(), total * 4);
  std::memcpy(host + o_positions, positions.data(), total * 4);
  std::memcpy(host + o_row_seq, row_seq.data(), total * 4);
  std::memcpy(host + o_out_rows, out_rows.data(), n_out * 4);
  for (int64_t i = 0; i < S; ++i) {
    const std::vector<int32_t>& blocks = inputs[i].kv->blocks;
    for (int32_t b : blocks) {
      if (b < 0 || b >= n_blocks_) {
        return absl::InternalError(absl::StrFormat(
            "--device cuda: block id %d outside the pool of %d (requantized blocks are CPU-only)",
            b, n_blocks_));
      }
    }
    std::memcpy(host + o_table[i], blocks.data(), blocks.size() * 4);
  }
  auto* seqs = reinterpret_cast<kernels::cuda::DeviceSeqKv*>(host + o_seqs);
  auto* prot = reinterpret_cast<kernels::cuda::KvProtectedRows*>(host + o_rows);
  auto* jobs = reinterpret_cast<kernels::cuda::KvEncodeJob*>(host + o_jobs);
  const int64_t slab_row = row_elems_ * elem_bytes_;
  for (int64_t l = 0; l < L; ++l) {
    const DeviceLayer& dl = layers_[l];
    for (int64_t i = 0; i < S; ++i) {
      const DeviceSequence& ds = sequences_.at(inputs[i].seq);
      const int64_t end = inputs[i].kv->length + static_cast<int64_t>(inputs[i].tokens.size());
      uint8_t* ring[2];
      uint8_t* sinks[2];
      for (int kv = 0; kv < 2; ++kv) {
        ring[kv] = ds.ring.get() + (l * 2 + kv) * ring_tokens_ * slab_row;
        sinks[kv] =
            sink_bytes > 0 ? ds.sinks.get() + (l * 2 + kv) * sink_tokens_ * slab_row : nullptr;
        prot[(l * 2 + kv) * S + i] = {ring[kv], sinks[kv]};
      }
      kernels::cuda::DeviceSeqKv& sv = seqs[l * S + i];
      sv.block_table = reinterpret_cast<const int32_t*>(dev + o_table[i]);
      sv.n_blocks =
          std::min<int64_t>(static_cast<int64_t>(inputs[i].kv->blocks.size()), end / block_tokens_);
      sv.n_tokens = end;
      sv.k_ring = ring[0];
      sv.v_ring = ring[1];
      sv.k_sinks = sinks[0];
      sv.v_sinks = sinks[1];
    }
    for (int kv = 0; kv < 2; ++kv) {
      for (int64_t j = 0; j < n_fills; ++j) {
        const Fill& fl = fills[j];
        const int32_t block = inputs[fl.input].kv->blocks[fl.block];
        kernels::cuda::KvEncodeJob& job = jobs[(l * 2 + kv) * n_fills + j];
        job.ring = prot[(l * 2 + kv) * S + fl.input].ring;
        job.first_token = fl.block * block_tokens_;
        job.dst = pool_.get() + dl.region + block * (dl.k_bytes + dl.v_bytes) +
                  (kv == 0 ? 0 : dl.k_bytes);
      }
    }
  }
  QKV_RETURN_IF_ERROR(CudaCheck(
      cudaMemcpyAsync(dev, host, static_cast<size_t>(pb.size()), cudaMemcpyHostToDevice, stream_),
      "upload the step plan"));
  const auto* d_tokens = reinterpret_cast<const int32_t*>(dev + o_tokens);
  const auto* d_positions = reinterpret_cast<const int32_t*>(dev + o_positions);
  const auto* d_row_seq = reinterpret_cast<const int32_t*>(dev + o_row_seq);
  const auto* d_out_rows = reinterpret_cast<const int32_t*>(dev + o_out_rows);
  const auto* d_seqs = reinterpret_cast<const kernels::cuda::DeviceSeqKv*>(dev + o_seqs);
  const auto* d_prot = reinterpret_cast<const kernels::cuda::KvProtectedRows*>(dev + o_rows);
  const auto* d_jobs = reinterpret_cast<const kernels::cuda::KvEncodeJob*>(dev + o_jobs);

  // Activations.
  QKV_RETURN_IF_ERROR(h_.Reserve(total * H * 4, "activations"));
  QKV_RETURN_IF_ERROR(xn_.Reserve(total * H * 4, "activations"));
  QKV_RETURN_IF_ERROR(q_.Reserve(total * q_dim * 4, "activations"));
  QKV_RETURN_IF_ERROR(k_.Reserve(total * kv_dim * 4, "activations"));
  QKV_RETURN_IF_ERROR(v_.Reserve(total * kv_dim * 4, "activations"));
  QKV_RETURN_IF_ERROR(attn_.Reserve(total * q_dim * 4, "activations"));
  QKV_RETURN_IF_ERROR(gate_.Reserve(total * I * 4, "activations"));
  QKV_RETURN_IF_ERROR(up_.Reserve(total * I * 4, "activations"));
  if (comm_ != nullptr) QKV_RETURN_IF_ERROR(proj_.Reserve(total * H * 4, "activations"));
  QKV_RETURN_IF_ERROR(final_.Reserve(n_out * H * 4, "activations"));
  QKV_RETURN_IF_ERROR(logits_.Reserve(n_out * c.vocab_size * 4, "logits"));
  // Scratch for the widest GEMM input up front: growing it mid-step would free memory that
  // queued kernels still use (cudaFree waits for them, but only after they were queued).
  QKV_RETURN_IF_ERROR(
      gemm_scratch_.Reserve(kernels::cuda::GemmScratchBytes(gemm_weights_, std::max(total, n_out),
                                                            std::max({H, q_dim, I})),
                            "GEMM scratch"));
  const int64_t ws = kernels::cuda::PagedAttentionWorkspaceBytes(total, n_heads, d, max_context);
  QKV_RETURN_IF_ERROR(attn_workspace_.Reserve(ws, "attention workspace"));
  float* h = h_.get<float>();
  float* xn = xn_.get<float>();
  float* q = q_.get<float>();
  float* k = k_.get<float>();
  float* v = v_.get<float>();
  float* attn = attn_.get<float>();
  float* gate = gate_.get<float>();
  float* up = up_.get<float>();
  void* st = stream_;
  const kernels::EmbeddingTable table_type = gemm_weights_ == kernels::cuda::GemmWeights::kBF16
                                                 ? kernels::EmbeddingTable::kBF16
                                                 : kernels::EmbeddingTable::kF32;

  QKV_RETURN_IF_ERROR(kernels::cuda::EmbeddingGather(embedding_.mem.get(), table_type, c.vocab_size,
                                                     H, d_tokens, total, h, st));
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  for (int64_t li = 0; li < L; ++li) {
    const DeviceLayer& l = layers_[li];
    QKV_RETURN_IF_ERROR(
        kernels::cuda::RmsNorm(h, l.attn_norm.get<float>(), xn, total, H, c.rms_eps, st));
    QKV_RETURN_IF_ERROR(Gemm(xn, l.q, q, total, false));
    QKV_RETURN_IF_ERROR(Gemm(xn, l.k, k, total, false));
    QKV_RETURN_IF_ERROR(Gemm(xn, l.v, v, total, false));
    if (l.has_q_bias) {
      QKV_RETURN_IF_ERROR(kernels::cuda::AddRowBias(q, l.q_bias.get<float>(), total, q_dim, st));
      QKV_RETURN_IF_ERROR(kernels::cuda::AddRowBias(k, l.k_bias.get<float>(), total, kv_dim, st));
      QKV_RETURN_IF_ERROR(kernels::cuda::AddRowBias(v, l.v_bias.get<float>(), total, kv_dim, st));
    }
    if (l.has_qk_norm) {
      QKV_RETURN_IF_ERROR(
          kernels::cuda::RmsNorm(q, l.q_norm.get<float>(), q, total * n_heads, d, c.rms_eps, st));
      QKV_RETURN_IF_ERROR(kernels::cuda::RmsNorm(k, l.k_norm.get<float>(), k, total * n_kv_heads, d,
                                                 c.rms_eps, st));
    }
    QKV_RETURN_IF_ERROR(kernels::cuda::RopeApply(q, total, n_heads, d, d_positions,
                                                 rope_cos_.get<float>(), rope_sin_.get<float>(),
                                                 rope_positions_, rope_neox_, st));
    QKV_RETURN_IF_ERROR(kernels::cuda::RopeApply(k, total, n_kv_heads, d, d_positions,
                                                 rope_cos_.get<float>(), rope_sin_.get<float>(),
                                                 rope_positions_, rope_neox_, st));
    // Every row into its sequence's ring (and sinks), then the blocks that filled up
    // encoded from the ring, then attention: what KvCache::Write and View give the CPU.
    for (int kv = 0; kv < 2; ++kv) {
      kernels::cuda::KvWriteBatch wb;
      wb.x = kv == 0 ? k : v;
      wb.positions = d_positions;
      wb.row_seq = d_row_seq;
      wb.seqs = d_prot + (li * 2 + kv) * S;
      wb.rows = total;
      wb.n_kv_heads = n_kv_heads;
      wb.head_dim = d;
      wb.ring_tokens = ring_tokens_;
      wb.sink_tokens = sink_tokens_;
      wb.storage = storage_;
      QKV_RETURN_IF_ERROR(kernels::cuda::KvWriteRows(wb, st));
      if (n_fills > 0) {
        QKV_RETURN_IF_ERROR(kernels::cuda::KvEncodeBlocks(
            kv == 0 ? l.k_format : l.v_format, n_kv_heads, ring_tokens_, storage_,
            d_jobs + (li * 2 + kv) * n_fills, n_fills, st));
      }
    }
    kernels::cuda::DeviceKvLayer view;
    view.k_format = l.k_format;
    view.v_format = l.v_format;
    view.k_base = pool_.get() + l.region;
    view.v_base = pool_.get() + l.region + l.k_bytes;
    view.block_stride = l.k_bytes + l.v_bytes;
    view.n_kv_heads = n_kv_heads;
    view.head_dim = d;
    view.block_tokens = block_tokens_;
    view.ring_tokens = ring_tokens_;
    view.sink_tokens = sink_tokens_;
    view.window_tokens = window_tokens_;
    view.storage = storage_;
    kernels::cuda::DeviceAttentionBatch ab;
    ab.q = q;
    ab.positions = d_positions;
    ab.row_seq = d_row_seq;
    ab.seqs = d_seqs + li * S;
    ab.rows = total;
    ab.n_heads = n_heads;
    ab.scale = scale * l.score_scale;
    ab.max_context = max_context;
    ab.out = attn;
    ab.workspace = attn_workspace_.get();
    ab.workspace_bytes = attn_workspace_.bytes();
    QKV_RETURN_IF_ERROR(kernels::cuda::PagedAttention(view, ab, st));
    // o_proj: the residual add fused into the GEMM on one rank; summed over the group first
    // under tensor parallelism.
    if (comm_ == nullptr) {
      QKV_RETURN_IF_ERROR(Gemm(attn, l.o, h, total, true));
      if (l.has_o_bias) {
        QKV_RETURN_IF_ERROR(kernels::cuda::AddRowBias(h, l.o_bias.get<float>(), total, H, st));
      }
      QKV_RETURN_IF_ERROR(
          kernels::cuda::RmsNorm(h, l.ffn_norm.get<float>(), xn, total, H, c.rms_eps, st));
    } else {
      float* proj = proj_.get<float>();
      QKV_RETURN_IF_ERROR(Gemm(attn, l.o, proj, total, false));
      QKV_RETURN_IF_ERROR(ReduceSum(proj, total * H, li, comm_ns));
      if (l.has_o_bias) {
        QKV_RETURN_IF_ERROR(kernels::cuda::AddRowBias(proj, l.o_bias.get<float>(), total, H, st));
      }
      QKV_RETURN_IF_ERROR(
          kernels::cuda::AddRmsNorm(h, proj, l.ffn_norm.get<float>(), xn, total, H, c.rms_eps, st));
    }
    QKV_RETURN_IF_ERROR(Gemm(xn, l.gate, gate, total, false));
    QKV_RETURN_IF_ERROR(Gemm(xn, l.up, up, total, false));
    QKV_RETURN_IF_ERROR(kernels::cuda::SwiGlu(gate, up, gate, total * I, st));
    if (comm_ == nullptr) {
      QKV_RETURN_IF_ERROR(Gemm(gate, l.down, h, total, true));
    } else {
      float* proj = proj_.get<float>();
      QKV_RETURN_IF_ERROR(Gemm(gate, l.down, proj, total, false));
      QKV_RETURN_IF_ERROR(ReduceSum(proj, total * H, li, comm_ns));
      // h += proj through AddRmsNorm's residual add; its normed output (xn) is not used, the
      // next layer norms h with its own weights.
      QKV_RETURN_IF_ERROR(kernels::cuda::AddRmsNorm(h, proj, output_norm_.get<float>(), xn, total,
                                                    H, c.rms_eps, st));
    }
  }
  // The returned rows: gathered like embedding rows from h, normed, through the lm_head.
  float* fin = final_.get<float>();
  QKV_RETURN_IF_ERROR(kernels::cuda::EmbeddingGather(h, kernels::EmbeddingTable::kF32, total, H,
                                                     d_out_rows, n_out, fin, st));
  QKV_RETURN_IF_ERROR(
      kernels::cuda::RmsNorm(fin, output_norm_.get<float>(), fin, n_out, H, c.rms_eps, st));
  float* lg = logits_.get<float>();
  QKV_RETURN_IF_ERROR(Gemm(fin, tied_ ? embedding_ : lm_head_, lg, n_out, false));
  const size_t offset = logits->size();
  logits->resize(offset + static_cast<size_t>(n_out * c.vocab_size));
  QKV_RETURN_IF_ERROR(CudaCheck(
      cudaMemcpyAsync(logits->data() + offset, lg, static_cast<size_t>(n_out * c.vocab_size) * 4,
                      cudaMemcpyDeviceToHost, stream_),
      "copy logits to the host"));
  return CudaCheck(cudaStreamSynchronize(stream_), "--device cuda step");
}

}  // namespace

absl::StatusOr<DeviceInfo> OpenCudaDevice() {
  absl::StatusOr<int> count = kernels::cuda::QueryCudaDeviceCount();
  if (!count.ok()) {
    return absl::UnavailableError(
        absl::StrFormat("--device cuda: no usable GPU (%s)", count.status().message()));
  }
  if (*count == 0) return absl::UnavailableError("--device cuda: the driver reports no GPU");
  DeviceInfo info;
  info.ordinal = LocalRank() % *count;
  QKV_RETURN_IF_ERROR(
      CudaCheck(cudaSetDevice(info.ordinal), absl::StrFormat("cudaSetDevice(%d)", info.ordinal)));
  cudaDeviceProp prop;
  QKV_RETURN_IF_ERROR(
      CudaCheck(cudaGetDeviceProperties(&prop, info.ordinal), "cudaGetDeviceProperties"));
  info.name = prop.name;
  info.sm_major = prop.major;
  info.sm_minor = prop.minor;
  size_t free_b = 0, total_b = 0;
  QKV_RETURN_IF_ERROR(CudaCheck(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo"));
  info.free_bytes = static_cast<int64_t>(free_b);
  info.total_bytes = static_cast<int64_t>(total_b);
  return info;
}

bool CudaDeviceUsable() { return kernels::cuda::CudaDeviceCount() > 0; }

absl::StatusOr<std::unique_ptr<DeviceForward>> CreateCudaForward(
    const WeightSource& weights, const ModelConfig& config, const TensorShard& shard,
    const kernels::RopeTable& rope, const KvCache& cache, Communicator* comm,
    const DeviceForwardConfig& device_config) {
  QKV_ASSIGN_OR_RETURN(
      std::unique_ptr<CudaForward> f,
      CudaForward::Create(weights, config, shard, rope, cache, comm, device_config));
  return std::unique_ptr<DeviceForward>(std::move(f));
}

}  // namespace quantkv
