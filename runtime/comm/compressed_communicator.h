// Compressed activation exchange: a Communicator decorator whose sum all-reduce sends
// group-quantized payloads (kernels/comm_codec.h) instead of fp32 for large vectors.
//
// AllReduceSum of n >= min_elements values over p ranks, in group-aligned chunks (chunk r
// belongs to rank r):
//   1. every rank encodes each chunk of its partial sums;
//   2. reduce-scatter: each rank sends encoded chunk q to rank q (the wrapped
//      communicator's AllToAllV: a rank receives only the others' encodings of its own
//      chunk), and rank r decodes them and sums the p partials in fp32 in rank order (its
//      own partial enters exactly, not decoded);
//   3. rank r requantizes its reduced chunk once, the encoded reduced chunks are
//      all-gathered, and every rank decodes all of them, its own included.
// Step 3's decode depends only on the payload bytes, so every rank ends with the same bits
// (ranks sample from the logits). Error per value: the decode error of the other ranks'
// partials plus one requantization of the sum (CommCodec::ElementErrorBound).
//
// Smaller calls (decode steps: latency-bound, a few KB) and layers listed in exact_layers
// are delegated to the wrapped communicator unchanged, exact.
//
// ReduceScatterSum of n >= min_elements values is compressed the same way, steps 1 and 2
// over its own chunks (ReduceScatterChunk, not group-aligned: a chunk's last group is
// zero-padded by the codec): the result is the rank-ordered fp32 sum of this rank's exact
// partial and the others' decoded ones, within the decode error of p - 1 partials (no
// requantization: nothing is sent after the sum). Smaller ones are exact. Every other
// collective (AllGather, AllToAllV of bytes, Broadcast, Barrier) is delegated as is. Like the
// wrapped communicator, single-threaded: one caller at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/comm_codec.h"
#include "runtime/comm/communicator.h"

namespace quantkv {

struct CompressedCommConfig {
  kernels::CommCodecConfig codec;
  // All-reduces of fewer values stay exact: below a few tens of KB the exchange is bound by
  // latency, not bytes, and decode steps (one hidden row per sequence) live there.
  int64_t min_elements = 16384;
  // Layers whose all-reduces stay exact (AllReduceSumForLayer): sensitive layers can be
  // opted out, e.g. the first and last.
  std::vector<int64_t> exact_layers;
};

struct CompressedCommStats {
  int64_t calls = 0;             // AllReduceSum / AllReduceSumForLayer calls
  int64_t compressed_calls = 0;  // of them, compressed
  int64_t elements = 0;          // values summed, all calls
  // Bytes of payload this rank sent to its peers in the all-reduces: as if every call were
  // exact ((p - 1) times the fp32 vector: an all-gather of the partial sums, what the MPI
  // communicator sends below its reduce-scatter threshold), and actually (the encoded
  // chunks for the other ranks, then (p - 1) times the requantized chunk).
  int64_t raw_bytes = 0;
  int64_t wire_bytes = 0;
  int64_t comm_ns = 0;   // in the wrapped communicator's collectives
  int64_t codec_ns = 0;  // encoding, decoding and summing
};

class CompressedCommunicator final : public Communicator {
 public:
  // Collective: the ranks compare their configs (codec, threshold, exact layers) and all
  // fail when one differs, since they would otherwise disagree on which calls to compress
  // and exchange payloads of different sizes. The first form owns `inner`.
  static absl::StatusOr<std::unique_ptr<CompressedCommunicator>> Create(
      std::unique_ptr<Communicator> inner, const CompressedCommConfig& config);
  static absl::StatusOr<std::unique_ptr<CompressedCommunicator>> Create(
      Communicator& inner, const CompressedCommConfig& config);

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string name() const override;  // "mpi+int8:g64"

  absl::Status AllReduceSum(float* data, int64_t n) override;
  // AllReduceSum as the engine calls it, naming the layer the sum belongs to: exact for the
  // layers in config().exact_layers.
  absl::Status AllReduceSumForLayer(float* data, int64_t n, int64_t layer) override;
  absl::Status ReduceScatterSum(const float* send, int64_t n, float* recv) override;
  absl::Status AllGather(const void* send, int64_t bytes, void* recv) override {
    return inner_->AllGather(send, bytes, recv);
  }
  absl::Status AllToAllV(const void* send, std::span<const int64_t> send_bytes,
                         std::vector<uint8_t>* recv, std::vector<int64_t>* recv_bytes) override {
    return inner_->AllToAllV(send, send_bytes, recv, recv_bytes);
  }
  absl::Status Broadcast(void* data, int64_t bytes, int root) override {
    return inner_->Broadcast(data, bytes, root);
  }
  absl::Status Barrier() override { return inner_->Barrier(); }
  int64_t bytes_sent() const override { return inner_->bytes_sent(); }
  [[noreturn]] void Abort(int exit_code) override;

  const CompressedCommConfig& config() const { return config_; }
  Communicator& inner() { return *inner_; }
  const CompressedCommStats& stats() const { return stats_; }
  void ResetStats() { stats_ = {}; }

  // The elements [begin, end) of chunk r of an n-value all-reduce: ceil(groups / p) whole
  // groups per rank, the last ranks' chunks shorter or empty.
  struct Chunk {
    int64_t begin, end;
  };
  static Chunk ChunkOf(int64_t n, int ranks, int group_size, int r);

 private:
  CompressedCommunicator(Communicator* inner, std::unique_ptr<Communicator> owned,
                         const CompressedCommConfig& config,
                         std::unique_ptr<kernels::CommCodec> codec);
  static absl::StatusOr<std::unique_ptr<CompressedCommunicator>> Make(
      Communicator* inner, std::unique_ptr<Communicator> owned, const CompressedCommConfig& config);
  absl::Status Exact(float* data, int64_t n);
  absl::Status Compressed(float* data, int64_t n);
  // Steps 1-2 for chunks `chunks` of data: this rank's chunk, summed, into out; wire bytes
  // counted in stats_ for an all-reduce's.
  absl::Status CompressedReduceScatter(const float* data, const std::vector<Chunk>& chunks,
                                       float* out, bool all_reduce);

  Communicator* inner_;
  std::unique_ptr<Communicator> owned_;
  CompressedCommConfig config_;
  std::vector<int64_t> exact_layers_;  // sorted
  std::unique_ptr<kernels::CommCodec> codec_;
  CompressedCommStats stats_;
  // Buffers kept between calls (the engine makes the same calls every step).
  std::vector<uint8_t> send_, recv_;
  std::vector<int64_t> send_counts_, recv_counts_;
  std::vector<float> sum_, decoded_, reduced_;
};

}  // namespace quantkv
