#include "runtime/engine/moe_dispatch.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "absl/strings/str_format.h"
#include "runtime/util/status_macros.h"

namespace quantkv {
namespace {

// Adds the time from construction to destruction to *total.
class CommTimer {
 public:
  explicit CommTimer(int64_t* total) : total_(total), start_(std::chrono::steady_clock::now()) {}
  ~CommTimer() {
    *total_ += std::chrono::duration_cast<std::chrono::nanoseconds>(
                   std::chrono::steady_clock::now() - start_)
                   .count();
  }

 private:
  int64_t* total_;
  std::chrono::steady_clock::time_point start_;
};

constexpr int64_t kRecordHeaderBytes = 8;  // int32 row, tag byte, 3 zero bytes
enum RecordTag : uint8_t { kExact = 0, kLow = 1, kHigh = 2 };

// The codec a record of `tag` uses (null for kExact).
kernels::CommCodec* CodecOf(MoeAllToAllScratch& a, uint8_t tag) {
  return tag == kLow ? a.low_codec.get() : tag == kHigh ? a.high_codec.get() : nullptr;
}

int64_t ValueBytes(MoeAllToAllScratch& a, uint8_t tag, int64_t hidden) {
  kernels::CommCodec* codec = CodecOf(a, tag);
  return codec != nullptr ? codec->PayloadBytes(hidden)
                          : hidden * static_cast<int64_t>(sizeof(float));
}

// Appends row's record to a.send; returns its size.
int64_t AppendRecord(MoeAllToAllScratch& a, const MoePayloadConfig& p, int32_t row,
                     const float* values, int64_t hidden, bool sensitive) {
  const uint8_t tag = sensitive ? (p.high ? kHigh : kExact) : (p.low ? kLow : kExact);
  const int64_t bytes = kRecordHeaderBytes + ValueBytes(a, tag, hidden);
  const size_t at = a.send.size();
  a.send.resize(at + static_cast<size_t>(bytes), 0);
  uint8_t* record = a.send.data() + at;
  std::memcpy(record, &row, sizeof(row));
  record[4] = tag;
  if (kernels::CommCodec* codec = CodecOf(a, tag)) {
    codec->Encode(values, hidden, record + kRecordHeaderBytes);
  } else {
    std::memcpy(record + kRecordHeaderBytes, values, static_cast<size_t>(hidden) * sizeof(float));
  }
  (tag == kHigh ? a.counts.high : tag == kLow ? a.counts.low : a.counts.exact) += 1;
  return bytes;
}

// Decodes every record of a.recv into a.recv_rows / a.recv_values, sender by sender.
absl::Status DecodeReceived(MoeAllToAllScratch& a, int64_t hidden, const char* what) {
  a.recv_rows.clear();
  a.recv_values.clear();
  a.recv_begin.assign(1, 0);
  const uint8_t* at = a.recv.data();
  for (size_t p = 0; p < a.recv_counts.size(); ++p) {
    const uint8_t* end = at + a.recv_counts[p];
    while (at < end) {
      const int64_t left = end - at;
      uint8_t tag = 0;
      int64_t value_bytes = -1;
      if (left >= kRecordHeaderBytes) {
        tag = at[4];
        if (tag <= kHigh && (tag == kExact || CodecOf(a, tag) != nullptr)) {
          value_bytes = ValueBytes(a, tag, hidden);
        }
      }
      if (value_bytes < 0 || left < kRecordHeaderBytes + value_bytes) {
        return absl::InternalError(absl::StrFormat(
            "MoE %s: rank %d sent a record this rank cannot read (%d bytes left, tag %d): the "
            "ranks' --ep-payload settings differ",
            what, p, left, tag));
      }
      int32_t row;
      std::memcpy(&row, at, sizeof(row));
      a.recv_rows.push_back(row);
      const size_t v = a.recv_values.size();
      a.recv_values.resize(v + static_cast<size_t>(hidden));
      const uint8_t* values = at + kRecordHeaderBytes;
      if (kernels::CommCodec* codec = CodecOf(a, tag)) {
        QKV_RETURN_IF_ERROR(codec->Decode(values, value_bytes, a.recv_values.data() + v, hidden));
      } else {
        // Copied out rather than read in place: the buffer holds bytes, not float objects.
        std::memcpy(a.recv_values.data() + v, values, static_cast<size_t>(hidden) * sizeof(float));
      }
      at += kRecordHeaderBytes + value_bytes;
    }
    a.recv_begin.push_back(static_cast<int64_t>(a.recv_rows.size()));
  }
  return absl::OkStatus();
}

// Makes a's codecs for p (kept between calls while p stays the same).
absl::Status PrepareCodecs(MoeAllToAllScratch& a, const MoePayloadConfig& p) {
  auto prepare = [](const std::optional<kernels::CommCodecConfig>& want,
                    std::unique_ptr<kernels::CommCodec>& codec) -> absl::Status {
    if (!want) {
      codec.reset();
      return absl::OkStatus();
    }
    // Per layer and step: compare fields, not spellings.
    if (codec != nullptr && codec->config().type == want->type &&
        codec->config().group_size == want->group_size &&
        codec->config().outliers == want->outliers) {
      return absl::OkStatus();
    }
    QKV_ASSIGN_OR_RETURN(codec, kernels::CommCodec::Create(*want));
    return absl::OkStatus();
  };
  QKV_RETURN_IF_ERROR(prepare(p.low, a.low_codec));
  return prepare(p.high, a.high_codec);
}

}  // namespace

const char* MoeDispatchName(MoeDispatch d) {
  switch (d) {
    case MoeDispatch::kAllToAll:
      return "all-to-all";
    case MoeDispatch::kCombineOnly:
      return "combine-only";
    default:
      return "all-reduce";
  }
}

absl::StatusOr<MoeDispatch> ParseMoeDispatch(std::string_view name) {
  for (MoeDispatch d :
       {MoeDispatch::kAllReduce, MoeDispatch::kAllToAll, MoeDispatch::kCombineOnly}) {
    if (name == MoeDispatchName(d)) return d;
  }
  return absl::InvalidArgumentError(absl::StrFormat(
      "'%s' is not an expert dispatch (all-reduce, all-to-all or combine-only)", name));
}

std::string MoePayloadConfig::ToString() const {
  auto one = [](const std::optional<kernels::CommCodecConfig>& c) {
    return c ? c->ToString() : std::string("fp32");
  };
  if (exact()) return "fp32";
  const std::string low_name = one(low), high_name = one(high);
  return low_name == high_name ? low_name : low_name + "/" + high_name;
}

absl::StatusOr<MoePayloadConfig> ParseMoePayload(std::string_view text) {
  auto one = [](std::string_view part) -> absl::StatusOr<std::optional<kernels::CommCodecConfig>> {
    if (part == "fp32") return std::optional<kernels::CommCodecConfig>();
    absl::StatusOr<kernels::CommCodecConfig> c = kernels::ParseCommCodecConfig(part);
    if (!c.ok()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "'%s' is not an expert payload: fp32 or a codec (%s)", part, c.status().message()));
    }
    return std::optional<kernels::CommCodecConfig>(*c);
  };
  MoePayloadConfig out;
  const size_t slash = text.find('/');
  if (slash == std::string_view::npos) {
    QKV_ASSIGN_OR_RETURN(out.low, one(text));
    out.high = out.low;
    return out;
  }
  if (text.find('/', slash + 1) != std::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrFormat("'%s': an expert payload is CODEC or LOW/HIGH, one '/' at most", text));
  }
  QKV_ASSIGN_OR_RETURN(out.low, one(text.substr(0, slash)));
  QKV_ASSIGN_OR_RETURN(out.high, one(text.substr(slash + 1)));
  return out;
}

absl::Status MoeFfnAllToAll(MoeDispatch dispatch, const MoeFfnWeights& w,
                            const moe::RouterConfig& rc, const float* x, int64_t n, float* y,
                            Communicator& comm, kernels::ThreadPool* pool,
                            const kernels::MatMulOptions& mm, MoeFfnScratch& s,
                            MoeAllToAllScratch& a, moe::Routing& routing, int64_t* comm_ns,
                            const MoePayloadConfig& payload, std::span<const uint8_t> sensitive) {
  if (dispatch == MoeDispatch::kAllReduce) {
    return absl::InvalidArgumentError("MoeFfnAllToAll: the all-reduce dispatch is MoeFfn's");
  }
  const int64_t H = w.router.cols;
  const int P = comm.size(), me = comm.rank();
  const int k = rc.top_k;
  if (!sensitive.empty() && static_cast<int64_t>(sensitive.size()) != rc.n_experts) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "MoeFfnAllToAll: %d sensitivity flags for %d experts", sensitive.size(), rc.n_experts));
  }
  QKV_RETURN_IF_ERROR(PrepareCodecs(a, payload));
  // Whether row i has a sensitive expert on rank q (its record to or from q uses HIGH).
  auto sensitive_on = [&](int64_t i, int q) {
    if (sensitive.empty()) return false;
    for (int j = 0; j < k; ++j) {
      const int64_t e = routing.expert[i * k + j];
      if (ExpertOwner(e, P) == q && sensitive[e] != 0) return true;
    }
    return false;
  };
  // 1. Every row's routing, on every rank.
  QKV_RETURN_IF_ERROR(MoeRoute(w, rc, x, n, pool, mm, s, routing));
  // owners[i * P + q]: row i has an expert on rank q.
  a.owners.assign(static_cast<size_t>(n) * P, 0);
  for (int64_t i = 0; i < n; ++i) {
    for (int j = 0; j < k; ++j) a.owners[i * P + ExpertOwner(routing.expert[i * k + j], P)] = 1;
  }
  auto owns = [&](int64_t row, int q) { return a.owners[row * P + q] != 0; };
  const ChunkRange home = ReduceScatterChunk(n, P, me);

  // 2-3. Dispatch this rank's home rows to the other ranks owning their experts (or, with
  // send_rows false, nothing: the owners read the rows from their own copy of x).
  a.send.clear();
  a.send_counts.assign(static_cast<size_t>(P), 0);
  const bool send_rows = dispatch == MoeDispatch::kAllToAll;
  if (send_rows) {
    for (int q = 0; q < P; ++q) {
      if (q == me) continue;  // this rank's own rows stay here
      for (int64_t i = home.begin; i < home.end; ++i) {
        if (!owns(i, q)) continue;
        a.send_counts[q] +=
            AppendRecord(a, payload, static_cast<int32_t>(i), x + i * H, H, sensitive_on(i, q));
      }
    }
    {
      CommTimer t(comm_ns);
      QKV_RETURN_IF_ERROR(comm.AllToAllV(a.send.data(), a.send_counts, &a.recv, &a.recv_counts));
    }
    QKV_RETURN_IF_ERROR(DecodeReceived(a, H, "dispatch"));
  }

  // 4. The rows this rank computes, in global row order (homes are ascending in rank order),
  // with their routing.
  a.batch.clear();
  a.batch_rows.clear();
  a.batch_source.clear();
  for (int p = 0; p < P; ++p) {
    if (p == me || !send_rows) {  // rows this rank holds: read from x
      const ChunkRange rows = ReduceScatterChunk(n, P, p);
      for (int64_t i = rows.begin; i < rows.end; ++i) {
        if (!owns(i, me)) continue;
        a.batch.insert(a.batch.end(), x + i * H, x + (i + 1) * H);
        a.batch_rows.push_back(static_cast<int32_t>(i));
        a.batch_source.push_back(p);
      }
      continue;
    }
    const ChunkRange theirs = ReduceScatterChunk(n, P, p);
    int64_t last = -1;
    for (int64_t r = a.recv_begin[p]; r < a.recv_begin[p + 1]; ++r) {
      const int32_t row = a.recv_rows[r];
      // The routing is every rank's own: a row outside the sender's home, out of order or
      // with no expert here means the ranks disagree on it (they should hold the same bits).
      if (row < theirs.begin || row >= theirs.end || row <= last || !owns(row, me)) {
        return absl::InternalError(absl::StrFormat(
            "MoE dispatch: rank %d sent row %d, which this rank (%d) does not expect from it "
            "(its rows are [%d, %d)): the ranks' routings differ",
            p, row, me, theirs.begin, theirs.end));
      }
      last = row;
      a.batch.insert(a.batch.end(), a.recv_values.begin() + r * H,
                     a.recv_values.begin() + (r + 1) * H);
      a.batch_rows.push_back(row);
      a.batch_source.push_back(p);
    }
  }
  const int64_t m = static_cast<int64_t>(a.batch_rows.size());
  moe::Routing& br = a.batch_routing;
  br.n_tokens = m;
  br.top_k = k;
  br.expert.resize(static_cast<size_t>(m * k));
  br.weight.resize(static_cast<size_t>(m * k));
  for (int64_t b = 0; b < m; ++b) {
    const int64_t row = a.batch_rows[b];
    std::copy_n(routing.expert.begin() + row * k, k, br.expert.begin() + b * k);
    std::copy_n(routing.weight.begin() + row * k, k, br.weight.begin() + b * k);
  }
  a.partial.resize(static_cast<size_t>(m * H));
  QKV_RETURN_IF_ERROR(
      MoeRoutedExperts(w, rc, a.batch.data(), m, br, a.partial.data(), pool, mm, s));

  // 5. Combine: the partial sums go back to the rows' homes (batch rows are grouped by
  // source in rank order, so the sections come out in rank order).
  a.send.clear();
  a.send_counts.assign(static_cast<size_t>(P), 0);
  for (int64_t b = 0; b < m; ++b) {
    const int p = a.batch_source[b];
    if (p == me) continue;
    a.send_counts[p] += AppendRecord(a, payload, a.batch_rows[b], a.partial.data() + b * H, H,
                                     sensitive_on(a.batch_rows[b], me));
  }
  {
    CommTimer t(comm_ns);
    QKV_RETURN_IF_ERROR(comm.AllToAllV(a.send.data(), a.send_counts, &a.recv, &a.recv_counts));
  }
  QKV_RETURN_IF_ERROR(DecodeReceived(a, H, "combine"));
  const int64_t rows = home.size();
  const int64_t max_rows = ReduceScatterChunk(n, P, 0).size();  // the first chunks are longest
  a.home.assign(static_cast<size_t>(max_rows * H), 0.0f);
  auto add = [&](int64_t row, const float* values) {
    float* out = a.home.data() + (row - home.begin) * H;
    for (int64_t j = 0; j < H; ++j) out[j] += values[j];
  };
  int64_t b = 0;  // this rank's own home rows in the batch, after the other sources' rows
  while (b < m && a.batch_source[b] != me) ++b;
  for (int q = 0; q < P; ++q) {
    if (q == me) {
      for (; b < m && a.batch_source[b] == me; ++b) add(a.batch_rows[b], a.partial.data() + b * H);
      continue;
    }
    for (int64_t r = a.recv_begin[q]; r < a.recv_begin[q + 1]; ++r) {
      const int32_t row = a.recv_rows[r];
      if (row < home.begin || row >= home.end || !owns(row, q)) {
        return absl::InternalError(absl::StrFormat(
            "MoE combine: rank %d returned row %d, which this rank (%d, rows [%d, %d)) did not "
            "send it",
            q, row, me, home.begin, home.end));
      }
      add(row, a.recv_values.data() + r * H);
    }
  }
  QKV_RETURN_IF_ERROR(MoeAddShared(w, x + home.begin * H, rows, a.home.data(), pool, mm, s));

  // 6. Every rank's home rows to every rank (padded to the longest chunk).
  a.gathered.resize(static_cast<size_t>(max_rows * H * P));
  {
    CommTimer t(comm_ns);
    QKV_RETURN_IF_ERROR(comm.AllGather(
        a.home.data(), max_rows * H * static_cast<int64_t>(sizeof(float)), a.gathered.data()));
  }
  for (int q = 0; q < P; ++q) {
    const ChunkRange c = ReduceScatterChunk(n, P, q);
    std::memcpy(y + c.begin * H, a.gathered.data() + q * max_rows * H,
                static_cast<size_t>(c.size() * H) * sizeof(float));
  }
  return absl::OkStatus();
}

}  // namespace quantkv
