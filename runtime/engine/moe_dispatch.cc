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

int64_t RecordBytes(int64_t hidden) {
  return static_cast<int64_t>(sizeof(int32_t)) + hidden * static_cast<int64_t>(sizeof(float));
}

void AppendRecord(std::vector<uint8_t>& out, int32_t row, const float* values, int64_t hidden) {
  const size_t at = out.size();
  out.resize(at + static_cast<size_t>(RecordBytes(hidden)));
  std::memcpy(out.data() + at, &row, sizeof(row));
  std::memcpy(out.data() + at + sizeof(row), values, static_cast<size_t>(hidden) * sizeof(float));
}

int32_t RecordRow(const uint8_t* record) {
  int32_t row;
  std::memcpy(&row, record, sizeof(row));
  return row;
}

const uint8_t* RecordValues(const uint8_t* record) { return record + sizeof(int32_t); }

// The records rank `from` sent, as [begin, begin + count) in a.recv.
struct Section {
  const uint8_t* begin;
  int64_t records;
};

absl::StatusOr<std::vector<Section>> Sections(const MoeAllToAllScratch& a, int64_t hidden,
                                              const char* what) {
  std::vector<Section> out;
  const int64_t rb = RecordBytes(hidden);
  int64_t offset = 0;
  for (size_t p = 0; p < a.recv_counts.size(); ++p) {
    if (a.recv_counts[p] % rb != 0) {
      return absl::InternalError(
          absl::StrFormat("MoE %s: rank %d sent %d bytes, not a whole number of %d-byte rows", what,
                          p, a.recv_counts[p], rb));
    }
    out.push_back({a.recv.data() + offset, a.recv_counts[p] / rb});
    offset += a.recv_counts[p];
  }
  return out;
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

absl::Status MoeFfnAllToAll(MoeDispatch dispatch, const MoeFfnWeights& w,
                            const moe::RouterConfig& rc, const float* x, int64_t n, float* y,
                            Communicator& comm, kernels::ThreadPool* pool,
                            const kernels::MatMulOptions& mm, MoeFfnScratch& s,
                            MoeAllToAllScratch& a, moe::Routing& routing, int64_t* comm_ns) {
  if (dispatch == MoeDispatch::kAllReduce) {
    return absl::InvalidArgumentError("MoeFfnAllToAll: the all-reduce dispatch is MoeFfn's");
  }
  const int64_t H = w.router.cols;
  const int P = comm.size(), me = comm.rank();
  const int k = rc.top_k;
  const int64_t rb = RecordBytes(H);
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
  std::vector<Section> from;
  if (send_rows) {
    for (int q = 0; q < P; ++q) {
      if (q == me) continue;  // this rank's own rows stay here
      for (int64_t i = home.begin; i < home.end; ++i) {
        if (!owns(i, q)) continue;
        AppendRecord(a.send, static_cast<int32_t>(i), x + i * H, H);
        a.send_counts[q] += rb;
      }
    }
    {
      CommTimer t(comm_ns);
      QKV_RETURN_IF_ERROR(comm.AllToAllV(a.send.data(), a.send_counts, &a.recv, &a.recv_counts));
    }
    QKV_ASSIGN_OR_RETURN(from, Sections(a, H, "dispatch"));
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
    for (int64_t r = 0; r < from[p].records; ++r) {
      const uint8_t* record = from[p].begin + r * rb;
      const int32_t row = RecordRow(record);
      // The routing is every rank's own: a row outside the sender's home, out of order or
      // with no expert here means the ranks disagree on it (they should hold the same bits).
      if (row < theirs.begin || row >= theirs.end || row <= last || !owns(row, me)) {
        return absl::InternalError(absl::StrFormat(
            "MoE dispatch: rank %d sent row %d, which this rank (%d) does not expect from it "
            "(its rows are [%d, %d)): the ranks' routings differ",
            p, row, me, theirs.begin, theirs.end));
      }
      last = row;
      const size_t at = a.batch.size();
      a.batch.resize(at + static_cast<size_t>(H));
      std::memcpy(a.batch.data() + at, RecordValues(record),
                  static_cast<size_t>(H) * sizeof(float));
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
    AppendRecord(a.send, a.batch_rows[b], a.partial.data() + b * H, H);
    a.send_counts[p] += rb;
  }
  {
    CommTimer t(comm_ns);
    QKV_RETURN_IF_ERROR(comm.AllToAllV(a.send.data(), a.send_counts, &a.recv, &a.recv_counts));
  }
  QKV_ASSIGN_OR_RETURN(from, Sections(a, H, "combine"));
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
    for (int64_t r = 0; r < from[q].records; ++r) {
      const uint8_t* record = from[q].begin + r * rb;
      const int32_t row = RecordRow(record);
      if (row < home.begin || row >= home.end || !owns(row, q)) {
        return absl::InternalError(absl::StrFormat(
            "MoE combine: rank %d returned row %d, which this rank (%d, rows [%d, %d)) did not "
            "send it",
            q, row, me, home.begin, home.end));
      }
      // Copied out rather than read in place: the buffer holds bytes, not float objects.
      a.row.resize(static_cast<size_t>(H));
      std::memcpy(a.row.data(), RecordValues(record), static_cast<size_t>(H) * sizeof(float));
      add(row, a.row.data());
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
