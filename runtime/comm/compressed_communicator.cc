#include "runtime/comm/compressed_communicator.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "runtime/util/monotonic_clock.h"

namespace quantkv {
namespace {

// Adds the time from construction to destruction to *total.
class Timer {
 public:
  explicit Timer(int64_t* total) : total_(total), start_(MonotonicNowNs()) {}
  ~Timer() { *total_ += MonotonicNowNs() - start_; }

 private:
  int64_t* total_;
  int64_t start_;
};

// What the ranks compare at creation; fixed size for one all-gather.
struct ConfigRecord {
  int32_t type, group_size, outliers, exact_layer_count;
  int64_t min_elements;
  uint64_t exact_layers_hash;  // FNV-1a of the sorted list
};

ConfigRecord RecordOf(const CompressedCommConfig& c, const std::vector<int64_t>& sorted_layers) {
  ConfigRecord r{};
  r.type = static_cast<int32_t>(c.codec.type);
  r.group_size = c.codec.group_size;
  r.outliers = c.codec.outliers;
  r.exact_layer_count = static_cast<int32_t>(sorted_layers.size());
  r.min_elements = c.min_elements;
  uint64_t h = 1469598103934665603ull;
  for (int64_t l : sorted_layers) {
    for (int b = 0; b < 8; ++b)
      h = (h ^ ((static_cast<uint64_t>(l) >> (8 * b)) & 0xff)) * 1099511628211ull;
  }
  r.exact_layers_hash = h;
  return r;
}

std::string Describe(const CompressedCommConfig& c) {
  return absl::StrFormat("%s from %d values, exact layers [%s]", c.codec.ToString(), c.min_elements,
                         absl::StrJoin(c.exact_layers, ","));
}

}  // namespace

absl::StatusOr<std::unique_ptr<CompressedCommunicator>> CompressedCommunicator::Create(
    std::unique_ptr<Communicator> inner, const CompressedCommConfig& config) {
  if (inner == nullptr) return absl::InvalidArgumentError("compressed communicator: no inner");
  Communicator* raw = inner.get();
  return Make(raw, std::move(inner), config);
}

absl::StatusOr<std::unique_ptr<CompressedCommunicator>> CompressedCommunicator::Create(
    Communicator& inner, const CompressedCommConfig& config) {
  return Make(&inner, nullptr, config);
}

absl::StatusOr<std::unique_ptr<CompressedCommunicator>> CompressedCommunicator::Make(
    Communicator* inner, std::unique_ptr<Communicator> owned, const CompressedCommConfig& config) {
  // Local checks first, then the comparison: a rank that fails locally still takes part in
  // it (through AgreeOnStatus), so no rank is left waiting in the all-gather.
  absl::StatusOr<std::unique_ptr<kernels::CommCodec>> codec =
      kernels::CommCodec::Create(config.codec);
  absl::Status local = codec.status();
  if (local.ok() && config.min_elements < 0) {
    local = absl::InvalidArgumentError(absl::StrFormat(
        "compressed all-reduce: negative threshold %d values", config.min_elements));
  }
  for (int64_t l : config.exact_layers) {
    if (local.ok() && l < 0) {
      local = absl::InvalidArgumentError(
          absl::StrFormat("compressed all-reduce: exact layer %d is negative", l));
    }
  }
  if (absl::Status s = AgreeOnStatus(*inner, local); !s.ok()) return s;

  std::vector<int64_t> layers = config.exact_layers;
  std::sort(layers.begin(), layers.end());
  layers.erase(std::unique(layers.begin(), layers.end()), layers.end());
  const ConfigRecord mine = RecordOf(config, layers);
  std::vector<ConfigRecord> all(static_cast<size_t>(inner->size()));
  if (absl::Status s = inner->AllGather(&mine, sizeof(mine), all.data()); !s.ok()) return s;
  for (int r = 1; r < inner->size(); ++r) {
    if (std::memcmp(&all[r], &all[0], sizeof(ConfigRecord)) != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "compressed all-reduce: rank %d's settings differ from rank 0's%s; every rank must "
          "use the same --comm-compress settings",
          r, inner->rank() == r || inner->rank() == 0 ? " (here: " + Describe(config) + ")" : ""));
    }
  }
  std::unique_ptr<CompressedCommunicator> c(
      new CompressedCommunicator(inner, std::move(owned), config, std::move(*codec)));
  c->exact_layers_ = std::move(layers);
  return c;
}

CompressedCommunicator::CompressedCommunicator(Communicator* inner,
                                               std::unique_ptr<Communicator> owned,
                                               const CompressedCommConfig& config,
                                               std::unique_ptr<kernels::CommCodec> codec)
    : inner_(inner), owned_(std::move(owned)), config_(config), codec_(std::move(codec)) {}

void CompressedCommunicator::Abort(int exit_code) {
  inner_->Abort(exit_code);
  std::exit(exit_code);  // not reached; the virtual call does not carry [[noreturn]]
}

std::string CompressedCommunicator::name() const {
  return inner_->name() + "+" + config_.codec.ToString();
}

CompressedCommunicator::Chunk CompressedCommunicator::ChunkOf(int64_t n, int ranks, int group_size,
                                                              int r) {
  const int64_t groups = (n + group_size - 1) / group_size;
  const int64_t per = (groups + ranks - 1) / ranks * group_size;
  return {std::min(n, r * per), std::min(n, (r + 1) * per)};
}

absl::Status CompressedCommunicator::AllReduceSum(float* data, int64_t n) {
  return AllReduceSumForLayer(data, n, -1);
}

absl::Status CompressedCommunicator::AllReduceSumForLayer(float* data, int64_t n, int64_t layer) {
  if (n < 0) return absl::InvalidArgumentError("AllReduceSum: negative count");
  ++stats_.calls;
  stats_.elements += n;
  stats_.raw_bytes += (size() - 1) * n * static_cast<int64_t>(sizeof(float));
  const bool exact_layer =
      layer >= 0 && std::binary_search(exact_layers_.begin(), exact_layers_.end(), layer);
  if (size() == 1 || n < config_.min_elements || n == 0 || exact_layer) return Exact(data, n);
  ++stats_.compressed_calls;
  return Compressed(data, n);
}

absl::Status CompressedCommunicator::Exact(float* data, int64_t n) {
  stats_.wire_bytes += (size() - 1) * n * static_cast<int64_t>(sizeof(float));
  Timer t(&stats_.comm_ns);
  return inner_->AllReduceSum(data, n);
}

absl::Status CompressedCommunicator::CompressedReduceScatter(const float* data,
                                                             const std::vector<Chunk>& chunks,
                                                             float* out, bool all_reduce) {
  const int p = size();
  const int me = rank();
  // 1. Encode every chunk of this rank's partial sums, chunk q's payload for rank q.
  send_counts_.assign(static_cast<size_t>(p), 0);
  int64_t vector_bytes = 0;
  for (int q = 0; q < p; ++q) {
    send_counts_[q] = codec_->PayloadBytes(chunks[q].end - chunks[q].begin);
    vector_bytes += send_counts_[q];
  }
  {
    Timer t(&stats_.codec_ns);
    send_.resize(static_cast<size_t>(vector_bytes));
    int64_t offset = 0;
    for (int q = 0; q < p; ++q) {
      // This rank's own chunk enters its sum exactly: no need to encode it, nor to send it.
      if (q == me) {
        send_counts_[q] = 0;
        continue;
      }
      codec_->Encode(data + chunks[q].begin, chunks[q].end - chunks[q].begin,
                     send_.data() + offset);
      offset += send_counts_[q];
    }
  }
  // 2. Reduce-scatter: each rank receives the others' encodings of its chunk.
  {
    Timer t(&stats_.comm_ns);
    // The stats are the all-reduces' (raw_bytes has no counterpart for a reduce-scatter).
    if (all_reduce) {
      for (int q = 0; q < p; ++q) stats_.wire_bytes += send_counts_[q];
    }
    if (absl::Status s = inner_->AllToAllV(send_.data(), send_counts_, &recv_, &recv_counts_);
        !s.ok()) {
      return s;
    }
  }
  const Chunk mine = chunks[me];
  const int64_t len = mine.end - mine.begin;
  Timer t(&stats_.codec_ns);
  sum_.resize(static_cast<size_t>(len));
  decoded_.resize(static_cast<size_t>(len));
  int64_t offset = 0;
  for (int q = 0; q < p; ++q) {
    const float* part = data + mine.begin;  // this rank's own partial: exact
    if (q != me) {
      if (absl::Status s =
              codec_->Decode(recv_.data() + offset, recv_counts_[q], decoded_.data(), len);
          !s.ok()) {
        return absl::InternalError(
            absl::StrFormat("compressed reduce-scatter: rank %d's chunk: %s", q, s.message()));
      }
      part = decoded_.data();
    }
    offset += recv_counts_[q];
    if (q == 0) {
      std::copy(part, part + len, sum_.begin());
    } else {
      for (int64_t i = 0; i < len; ++i) sum_[i] += part[i];
    }
  }
  std::copy(sum_.begin(), sum_.end(), out);
  return absl::OkStatus();
}

absl::Status CompressedCommunicator::ReduceScatterSum(const float* send, int64_t n, float* recv) {
  if (n < 0 || size() == 1 || n < config_.min_elements) {
    return inner_->ReduceScatterSum(send, n, recv);
  }
  std::vector<Chunk> chunks(static_cast<size_t>(size()));
  for (int q = 0; q < size(); ++q) {
    const ChunkRange c = ReduceScatterChunk(n, size(), q);
    chunks[q] = {c.begin, c.end};
  }
  return CompressedReduceScatter(send, chunks, recv, /*all_reduce=*/false);
}

absl::Status CompressedCommunicator::Compressed(float* data, int64_t n) {
  const int p = size();
  const int gs = config_.codec.group_size;
  std::vector<Chunk> chunks(p);
  for (int r = 0; r < p; ++r) chunks[r] = ChunkOf(n, p, gs, r);
  // Chunk 0 is the longest; shorter reduced chunks are padded to its size for the gather.
  const int64_t chunk_bytes = codec_->PayloadBytes(chunks[0].end - chunks[0].begin);

  // 1-2. This rank's chunk, summed over the ranks (decoded partials).
  const Chunk mine = chunks[rank()];
  reduced_.resize(static_cast<size_t>(mine.end - mine.begin));
  if (absl::Status s = CompressedReduceScatter(data, chunks, reduced_.data(), /*all_reduce=*/true);
      !s.ok()) {
    return s;
  }
  {
    // 3. One requantization of the reduced chunk (padding bytes zeroed: they are sent).
    Timer t(&stats_.codec_ns);
    send_.assign(static_cast<size_t>(chunk_bytes), 0);
    codec_->Encode(reduced_.data(), mine.end - mine.begin, send_.data());
  }
  recv_.resize(static_cast<size_t>(p * chunk_bytes));
  {
    Timer t(&stats_.comm_ns);
    stats_.wire_bytes += (p - 1) * chunk_bytes;
    if (absl::Status s = inner_->AllGather(send_.data(), chunk_bytes, recv_.data()); !s.ok()) {
      return s;
    }
  }
  Timer t(&stats_.codec_ns);
  for (int q = 0; q < p; ++q) {
    const int64_t m = chunks[q].end - chunks[q].begin;
    if (absl::Status s =
            codec_->Decode(recv_.data() + q * chunk_bytes, chunk_bytes, data + chunks[q].begin, m);
        !s.ok()) {
      return absl::InternalError(
          absl::StrFormat("compressed all-reduce: rank %d's reduced chunk: %s", q, s.message()));
    }
  }
  return absl::OkStatus();
}

}  // namespace quantkv
