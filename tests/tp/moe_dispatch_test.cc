// The all-to-all and combine-only MoE dispatches (runtime/engine/moe_dispatch.h) on a
// synthetic layer, without a model or mpirun: 1-3 ranks as threads joined by the TCP
// communicator on loopback, each holding the experts ExpertOwner gives it, against the whole
// layer (MoeFfn) in one thread.
// fp32 activations and per-row matmuls (no SGEMM tiles), so an expert's output for a row
// does not depend on the batch: with at most two experts per row the result must be the
// same bits (two-term sums commute), with more equal within fp32 rounding; every rank ends
// with the same bits and the whole step's routing.
#include "runtime/engine/moe_dispatch.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "runtime/comm/tcp_communicator.h"
#include "tests/testutil/free_port.h"
#include "tests/testutil/test_seed.h"

namespace quantkv {
namespace {

using testing::FreePort;

// body(rank, comm) on `world` threads, each with its TCP communicator (world 1: local).
void OnRanks(int world, const std::function<void(int, Communicator&)>& body) {
  if (world == 1) {
    LocalCommunicator local;
    body(0, local);
    return;
  }
  const int port = FreePort();
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      TcpCommunicatorOptions o;
      o.rank = r;
      o.world_size = world;
      o.rendezvous = absl::StrCat("127.0.0.1:", port);
      o.secret = "moe";
      o.timeout_s = 20;
      o.join_timeout_s = 20;
      auto comm = CreateTcpCommunicator(o);
      ASSERT_TRUE(comm.ok()) << comm.status();
      body(r, **comm);
    });
  }
  for (std::thread& t : threads) t.join();
}

// fp32 matrices with N(0, scale) entries, kept alive by the layer.
struct Layer {
  std::vector<std::vector<float>> storage;
  MoeFfnWeights w;

  kernels::WeightMatrix Add(std::mt19937_64& rng, int64_t rows, int64_t cols, float scale) {
    std::normal_distribution<float> nd(0.0f, scale);
    storage.emplace_back(static_cast<size_t>(rows * cols));
    for (float& v : storage.back()) v = nd(rng);
    return kernels::WeightMatrix{kernels::GgmlType::kF32,
                                 reinterpret_cast<const uint8_t*>(storage.back().data()), rows,
                                 cols};
  }
};

Layer MakeLayer(std::mt19937_64& rng, int64_t H, int E, int64_t I, int64_t S) {
  Layer l;
  l.storage.reserve(static_cast<size_t>(3 * E + 4));
  l.w.router = l.Add(rng, E, H, 0.5f);
  for (int e = 0; e < E; ++e) {
    ExpertMatrices m;
    m.gate = l.Add(rng, I, H, 0.3f);
    m.up = l.Add(rng, I, H, 0.3f);
    m.down = l.Add(rng, H, I, 0.3f);
    l.w.experts.push_back(m);
  }
  if (S > 0) {
    l.w.shared.gate = l.Add(rng, S, H, 0.3f);
    l.w.shared.up = l.Add(rng, S, H, 0.3f);
    l.w.shared.down = l.Add(rng, H, S, 0.3f);
    std::normal_distribution<float> nd(0.0f, 0.3f);
    for (int64_t j = 0; j < H; ++j) l.w.shared_gate.push_back(nd(rng));
  }
  return l;
}

// What each rank of one MoeFfnAllToAll call over `world` ranks returned.
struct RankResults {
  std::vector<std::vector<float>> y;
  std::vector<moe::Routing> routing;
  std::vector<MoePayloadCounts> counts;
};

// MoeFfnAllToAll of x[n x hidden] on `world` ranks, each owning the experts ExpertOwner gives
// it; every rank's call must succeed.
RankResults RunOnRanks(int world, const MoeFfnWeights& whole, const moe::RouterConfig& rc,
                       MoeDispatch d, const std::vector<float>& x, int64_t n,
                       const kernels::MatMulOptions& mm, const MoePayloadConfig& payload = {},
                       const std::vector<uint8_t>& sensitive = {}) {
  RankResults out;
  out.y.resize(world);
  out.routing.resize(world);
  out.counts.resize(world);
  OnRanks(world, [&](int r, Communicator& comm) {
    MoeFfnWeights w = whole;
    w.owned.assign(rc.n_experts, 0);
    for (int e = 0; e < rc.n_experts; ++e) w.owned[e] = ExpertOwner(e, world) == r;
    MoeFfnScratch s;
    MoeAllToAllScratch a;
    int64_t ns = 0;
    out.y[r].assign(x.size(), -1.0f);
    const absl::Status st = MoeFfnAllToAll(d, w, rc, x.data(), n, out.y[r].data(), comm, nullptr,
                                           mm, s, a, out.routing[r], &ns, payload, sensitive);
    ASSERT_TRUE(st.ok()) << "rank " << r << ": " << st;
    out.counts[r] = a.counts;
  });
  return out;
}

TEST(MoeAllToAllTest, EqualsTheWholeLayerOnOneToThreeRanks) {
  std::mt19937_64 rng(testing::TestSeed());
  constexpr int64_t H = 32, I = 16;
  constexpr int E = 5;  // uneven over 2 and 3 ranks
  kernels::MatMulOptions mm;
  mm.activations = kernels::ActivationPrecision::kFloat32;
  mm.gemm_min_rows = int64_t{1} << 40;
  for (int64_t shared : {0, 24}) {
    const Layer layer = MakeLayer(rng, H, E, I, shared);
    for (int k : {1, 2, 3, E}) {
      moe::RouterConfig rc;
      rc.n_experts = E;
      rc.top_k = k;
      for (int64_t n : {0, 1, 2, 5, 17}) {
        std::normal_distribution<float> nd(0.0f, 1.0f);
        std::vector<float> x(static_cast<size_t>(n * H));
        for (float& v : x) v = nd(rng);
        std::vector<float> want(x.size());
        moe::Routing want_routing;
        MoeFfnScratch ws;
        ASSERT_TRUE(
            MoeFfn(layer.w, rc, x.data(), n, want.data(), nullptr, mm, ws, want_routing).ok());
        for (int world : {1, 2, 3}) {
          for (MoeDispatch d : {MoeDispatch::kAllToAll, MoeDispatch::kCombineOnly}) {
            SCOPED_TRACE(::testing::Message()
                         << world << " ranks, n " << n << ", top-" << k << ", shared " << shared
                         << ", " << MoeDispatchName(d));
            const RankResults res = RunOnRanks(world, layer.w, rc, d, x, n, mm);
            const std::vector<std::vector<float>>& got = res.y;
            for (int r = 0; r < world; ++r) {
              EXPECT_EQ(res.routing[r].expert, want_routing.expert) << "rank " << r;
              EXPECT_EQ(res.routing[r].weight, want_routing.weight) << "rank " << r;
            }
            for (int r = 0; r < world; ++r) {
              ASSERT_EQ(0, std::memcmp(got[r].data(), got[0].data(), x.size() * sizeof(float)))
                  << "rank " << r << " differs from rank 0";
            }
            for (size_t i = 0; i < x.size(); ++i) {
              if (k <= 2) {
                ASSERT_EQ(got[0][i], want[i]) << "value " << i << ": two-term sums commute";
              } else {
                ASSERT_NEAR(got[0][i], want[i], 1e-5 * (1 + std::fabs(want[i]))) << "value " << i;
              }
            }
          }
        }
      }
    }
  }
}

// --ep-payload: each record encoded with a comm codec, the sensitive experts' records with
// HIGH. Every rank still ends with the same bits; the error against the exact layer is small
// for int8, larger for int4, in between for int4/int8, zero-free for fp32 HIGH records; and
// the records sent at each precision are exactly what the routing and the flags imply.
TEST(MoeAllToAllTest, CompressedPayloadsBySensitivity) {
  std::mt19937_64 rng(testing::TestSeed());
  constexpr int64_t H = 64, I = 32, n = 23;
  constexpr int E = 6, k = 2;
  kernels::MatMulOptions mm;
  mm.activations = kernels::ActivationPrecision::kFloat32;
  mm.gemm_min_rows = int64_t{1} << 40;
  const Layer layer = MakeLayer(rng, H, E, I, 0);
  moe::RouterConfig rc;
  rc.n_experts = E;
  rc.top_k = k;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n * H));
  for (float& v : x) v = nd(rng);
  std::vector<float> want(x.size());
  moe::Routing routing;
  MoeFfnScratch ws;
  ASSERT_TRUE(MoeFfn(layer.w, rc, x.data(), n, want.data(), nullptr, mm, ws, routing).ok());
  const std::vector<uint8_t> sensitive = {1, 0, 0, 1, 0, 1};
  double want_sq = 0;
  for (float v : want) want_sq += static_cast<double>(v) * v;

  for (int world : {2, 3}) {
    for (MoeDispatch d : {MoeDispatch::kAllToAll, MoeDispatch::kCombineOnly}) {
      // (home row, owner) pairs that exchange records, split by sensitivity.
      int64_t pairs_high = 0, pairs_low = 0;
      for (int64_t i = 0; i < n; ++i) {
        int home = 0;
        while (ReduceScatterChunk(n, world, home).end <= i) ++home;
        for (int q = 0; q < world; ++q) {
          if (q == home) continue;
          bool owns = false, high = false;
          for (int j = 0; j < k; ++j) {
            const int64_t e = routing.expert[i * k + j];
            if (ExpertOwner(e, world) != q) continue;
            owns = true;
            high = high || sensitive[e] != 0;
          }
          if (owns) (high ? pairs_high : pairs_low) += 1;
        }
      }
      const int64_t ways = d == MoeDispatch::kAllToAll ? 2 : 1;  // dispatch and combine
      std::map<std::string, double> rel;
      for (const char* spec : {"int8", "int4", "int4/int8", "int4/fp32"}) {
        SCOPED_TRACE(::testing::Message()
                     << world << " ranks, " << MoeDispatchName(d) << ", --ep-payload " << spec);
        const absl::StatusOr<MoePayloadConfig> payload = ParseMoePayload(spec);
        ASSERT_TRUE(payload.ok()) << payload.status();
        const RankResults res = RunOnRanks(world, layer.w, rc, d, x, n, mm, *payload, sensitive);
        const std::vector<std::vector<float>>& got = res.y;
        const std::vector<MoePayloadCounts>& counts = res.counts;
        for (int r = 1; r < world; ++r) {
          ASSERT_EQ(0, std::memcmp(got[r].data(), got[0].data(), x.size() * sizeof(float)))
              << "rank " << r << " differs from rank 0";
        }
        MoePayloadCounts total;
        for (const MoePayloadCounts& c : counts) {
          total.exact += c.exact;
          total.low += c.low;
          total.high += c.high;
        }
        const std::string name = spec;
        if (name == "int4/int8") {
          EXPECT_EQ(total.high, ways * pairs_high);
          EXPECT_EQ(total.low, ways * pairs_low);
          EXPECT_EQ(total.exact, 0);
        } else if (name == "int4/fp32") {
          EXPECT_EQ(total.exact, ways * pairs_high);
          EXPECT_EQ(total.low, ways * pairs_low);
          EXPECT_EQ(total.high, 0);
        } else {  // one codec: its records are LOW or HIGH by sensitivity alike
          EXPECT_EQ(total.low + total.high, ways * (pairs_high + pairs_low));
          EXPECT_EQ(total.exact, 0);
        }
        double err_sq = 0;
        for (size_t i = 0; i < x.size(); ++i) {
          const double e = static_cast<double>(got[0][i]) - want[i];
          err_sq += e * e;
        }
        rel[name] = std::sqrt(err_sq / want_sq);
      }
      SCOPED_TRACE(::testing::Message() << world << " ranks, " << MoeDispatchName(d));
      EXPECT_GT(rel["int8"], 0.0) << "int8 records changed nothing";
      EXPECT_LT(rel["int8"], 0.01);
      EXPECT_LT(rel["int8"], rel["int4"] / 4);
      EXPECT_LT(rel["int4"], 0.15);
      EXPECT_LT(rel["int4/int8"], rel["int4"]);
      EXPECT_LT(rel["int4/fp32"], rel["int4"]);
    }
  }
}

TEST(MoeDispatchTest, ParsesPayloads) {
  EXPECT_TRUE(ParseMoePayload("fp32")->exact());
  EXPECT_EQ(ParseMoePayload("fp32")->ToString(), "fp32");
  EXPECT_EQ(ParseMoePayload("int8")->ToString(), "int8:g64:out2");
  EXPECT_EQ(ParseMoePayload("int4:g32:out0/int8")->ToString(), "int4:g32:out0/int8:g64:out2");
  EXPECT_EQ(ParseMoePayload("int4/fp32")->ToString(), "int4:g64:out2/fp32");
  EXPECT_FALSE(ParseMoePayload("int4/fp32")->high.has_value());
  for (const char* bad : {"", "int5", "int4/", "int4/int8/fp32", "fp16"}) {
    const absl::StatusOr<MoePayloadConfig> p = ParseMoePayload(bad);
    EXPECT_FALSE(p.ok()) << "'" << bad << "' parsed";
  }
  EXPECT_NE(std::string(ParseMoePayload("int5").status().message()).find("'int5'"),
            std::string::npos);
}

TEST(MoeDispatchTest, ParsesItsNames) {
  EXPECT_EQ(*ParseMoeDispatch("all-reduce"), MoeDispatch::kAllReduce);
  EXPECT_EQ(*ParseMoeDispatch("all-to-all"), MoeDispatch::kAllToAll);
  EXPECT_EQ(*ParseMoeDispatch("combine-only"), MoeDispatch::kCombineOnly);
  EXPECT_STREQ(MoeDispatchName(MoeDispatch::kAllToAll), "all-to-all");
  const absl::StatusOr<MoeDispatch> bad = ParseMoeDispatch("alltoall");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("'alltoall'"), std::string::npos);
}

}  // namespace
}  // namespace quantkv
