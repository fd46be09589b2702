// The TCP Communicator (runtime/comm/tcp_communicator.h) with its ranks as threads of one
// process on loopback: every collective against its definition (the sum bit-identical on all
// ranks, in rank order), broadcasts from every root, the join refusals (wrong secret, world
// size, duplicate rank), a peer that leaves (the others get an error at once, not a hang) and
// one that never answers (the timeout); the reduce-scatter and all-to-all with uneven and
// empty pieces, and bad arguments on one rank (an error on every rank, at once).
#include "runtime/comm/tcp_communicator.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/testutil/free_port.h"
#include "tests/tp/collective_test_data.h"

namespace quantkv {
namespace {

using testing::Byte;
using testing::Count;
using testing::FreePort;
using testing::RankData;

TcpCommunicatorOptions Options(int rank, int world, int port) {
  TcpCommunicatorOptions o;
  o.rank = rank;
  o.world_size = world;
  o.rendezvous = absl::StrCat("127.0.0.1:", port);
  o.secret = "s3cret";
  o.timeout_s = 10;
  o.join_timeout_s = 10;
  return o;
}

// Runs body(rank, comm) on `world` threads, each with its communicator.
void OnRanks(int world, const std::function<void(int, Communicator&)>& body,
             const std::function<TcpCommunicatorOptions(int)>& options) {
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      auto comm = CreateTcpCommunicator(options(r));
      ASSERT_TRUE(comm.ok()) << "rank " << r << ": " << comm.status();
      EXPECT_EQ((*comm)->rank(), r);
      EXPECT_EQ((*comm)->size(), world);
      body(r, **comm);
    });
  }
  for (std::thread& t : threads) t.join();
}

TEST(TcpCommTest, CollectivesMatchTheirDefinition) {
  for (int world : {2, 3, 4}) {
    SCOPED_TRACE(::testing::Message() << world << " ranks");
    const int port = FreePort();
    constexpr int64_t kN = 1000;
    // Each rank's data, known to all (the reference).
    std::vector<std::vector<float>> data(world, std::vector<float>(kN));
    std::mt19937 rng(7 + world);
    std::normal_distribution<float> nd(0.0f, 100.0f);
    for (auto& d : data) {
      for (float& x : d) x = nd(rng);
    }
    std::vector<float> want(kN);
    for (int64_t i = 0; i < kN; ++i) {
      float s = data[0][i];
      for (int r = 1; r < world; ++r) s += data[r][i];
      want[i] = s;
    }
    OnRanks(
        world,
        [&](int r, Communicator& comm) {
          std::vector<float> x = data[r];
          ASSERT_TRUE(comm.AllReduceSum(x.data(), kN).ok());
          EXPECT_EQ(0, std::memcmp(x.data(), want.data(), kN * sizeof(float)))
              << "rank " << r << ": not the rank-ordered sum, bit for bit";
          std::vector<float> all(kN * world);
          ASSERT_TRUE(comm.AllGather(data[r].data(), kN * sizeof(float), all.data()).ok());
          for (int s = 0; s < world; ++s) {
            EXPECT_EQ(0, std::memcmp(all.data() + s * kN, data[s].data(), kN * sizeof(float)));
          }
          for (int root = 0; root < world; ++root) {
            int64_t v = r == root ? 1000 + root : -1;
            ASSERT_TRUE(comm.Broadcast(&v, sizeof(v), root).ok());
            EXPECT_EQ(v, 1000 + root) << "rank " << r << ", root " << root;
          }
          EXPECT_TRUE(comm.Barrier().ok());
          int64_t bad = 0;
          EXPECT_FALSE(comm.Broadcast(&bad, sizeof(bad), world).ok());
        },
        [&](int r) { return Options(r, world, port); });
  }
}

TEST(TcpCommTest, ReduceScatterAndAllToAllMatchTheirDefinition) {
  for (int world : {1, 2, 3}) {
    SCOPED_TRACE(::testing::Message() << world << " ranks");
    const int port = FreePort();
    OnRanks(
        world,
        [&](int r, Communicator& comm) {
          // 5000: the all-reduce through rank 0's sum (from 4096 values), below that the
          // all-gather of the partials.
          for (int64_t n :
               {int64_t{0}, int64_t{1}, int64_t{world + 1}, int64_t{1001}, int64_t{5000}}) {
            const uint32_t seed = static_cast<uint32_t>(n) + 5;
            std::vector<float> want = RankData(0, n, seed);
            for (int q = 1; q < world; ++q) {
              const std::vector<float> x = RankData(q, n, seed);
              for (int64_t i = 0; i < n; ++i) want[i] = want[i] + x[i];
            }
            const ChunkRange chunk = ReduceScatterChunk(n, world, r);
            const std::vector<float> mine = RankData(r, n, seed);
            std::vector<float> got(static_cast<size_t>(chunk.size()));
            ASSERT_TRUE(comm.ReduceScatterSum(mine.data(), n, got.data()).ok());
            EXPECT_EQ(
                0, std::memcmp(got.data(), want.data() + chunk.begin, chunk.size() * sizeof(float)))
                << "rank " << r << ", n " << n << ": not the rank-ordered sum, bit for bit";
            std::vector<float> x = mine;
            ASSERT_TRUE(comm.AllReduceSum(x.data(), n).ok());
            EXPECT_EQ(0, std::memcmp(x.data(), want.data(), n * sizeof(float)));
          }
          for (int64_t scale : {0, 1, 300}) {
            std::vector<int64_t> counts(world);
            std::vector<uint8_t> send;
            for (int q = 0; q < world; ++q) {
              counts[q] = Count(r, q, world, scale);
              for (int64_t i = 0; i < counts[q]; ++i) send.push_back(Byte(r, q, i));
            }
            std::vector<uint8_t> recv;
            std::vector<int64_t> recv_counts;
            ASSERT_TRUE(comm.AllToAllV(send.data(), counts, &recv, &recv_counts).ok());
            ASSERT_EQ(recv_counts.size(), static_cast<size_t>(world));
            int64_t at = 0;
            for (int from = 0; from < world; ++from) {
              ASSERT_EQ(recv_counts[from], Count(from, r, world, scale));
              for (int64_t i = 0; i < recv_counts[from]; ++i) {
                ASSERT_EQ(recv[at + i], Byte(from, r, i))
                    << "rank " << r << " from " << from << " byte " << i;
              }
              at += recv_counts[from];
            }
            EXPECT_EQ(static_cast<int64_t>(recv.size()), at);
          }
        },
        [&](int r) { return Options(r, world, port); });
  }
}

// One rank's bad argument gives every rank an error naming it, well inside the timeout.
TEST(TcpCommTest, BadArgumentsFailOnEveryRankWithoutAHang) {
  const auto start = std::chrono::steady_clock::now();
  for (int bad : {0, 2}) {
    // All-to-all: refused in the exchange of counts, before data moves, so the group stays
    // usable.
    const int port = FreePort();
    OnRanks(
        3,
        [&](int r, Communicator& comm) {
          std::vector<uint8_t> send(64), recv;
          std::vector<int64_t> recv_counts, counts(3, 4);
          if (r == bad) counts.pop_back();
          absl::Status s = comm.AllToAllV(send.data(), counts, &recv, &recv_counts);
          EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
          const std::string want =
              r == bad ? "send_bytes has 2 entries" : absl::StrCat("rank ", bad, " passed invalid");
          EXPECT_NE(std::string(s.message()).find(want), std::string::npos) << "rank " << r << s;
          counts.assign(3, 4);
          if (r == bad) counts[1] = -1;
          s = comm.AllToAllV(send.data(), counts, &recv, &recv_counts);
          EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
          float x = 1;
          ASSERT_TRUE(comm.AllReduceSum(&x, 1).ok());
          EXPECT_EQ(x, 3.0f);
        },
        [&](int r) { return Options(r, 3, port); });
    // Reduce-scatter with another n, then with a negative one, on rank `bad`: every rank
    // fails (the group is then out of step: a fresh one for each).
    for (int64_t bad_n : {11, -1}) {
      const int port2 = FreePort();
      OnRanks(
          3,
          [&](int r, Communicator& comm) {
            std::vector<float> x(16, 1.0f), out(16);
            const absl::Status s =
                comm.ReduceScatterSum(x.data(), r == bad ? bad_n : 10, out.data());
            EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << "rank " << r << ": " << s;
            const std::string want = bad_n > 0 ? (bad == 0 ? "rank 1 passed n = 10, rank 0 n = 11"
                                                           : "rank 2 passed n = 11")
                                               : "negative count -1";
            EXPECT_NE(std::string(s.message()).find(want), std::string::npos)
                << "rank " << r << ": " << s;
          },
          [&](int r) { return Options(r, 3, port2); });
    }
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5))
      << "errors came by timeout (10 s), not at once";
}

TEST(TcpCommTest, JoinRefusesWrongSecretWorldAndRank) {
  const int port = FreePort();
  std::thread root([&] {
    // Rank 0 of 2 waits for a rank it will accept: the refused ones do not count.
    TcpCommunicatorOptions o = Options(0, 2, port);
    auto comm = CreateTcpCommunicator(o);
    ASSERT_TRUE(comm.ok()) << comm.status();
    int64_t v = 5;
    EXPECT_TRUE((*comm)->Broadcast(&v, sizeof(v), 0).ok());
  });
  TcpCommunicatorOptions wrong_secret = Options(1, 2, port);
  wrong_secret.secret = "guess";
  auto a = CreateTcpCommunicator(wrong_secret);
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), absl::StatusCode::kPermissionDenied) << a.status();
  auto b = CreateTcpCommunicator(Options(1, 3, port));  // another world size
  EXPECT_FALSE(b.ok());
  auto c = CreateTcpCommunicator(Options(1, 2, port));
  ASSERT_TRUE(c.ok()) << c.status();
  int64_t v = 0;
  EXPECT_TRUE((*c)->Broadcast(&v, sizeof(v), 0).ok());
  EXPECT_EQ(v, 5);
  root.join();
  EXPECT_FALSE(CreateTcpCommunicator(Options(2, 2, port)).ok());  // rank outside the world
  TcpCommunicatorOptions empty = Options(0, 2, port);
  empty.secret.clear();
  EXPECT_FALSE(CreateTcpCommunicator(empty).ok());
  TcpCommunicatorOptions bad_address = Options(0, 2, port);
  bad_address.rendezvous = "localhost";
  auto d = CreateTcpCommunicator(bad_address);
  ASSERT_FALSE(d.ok());
  EXPECT_NE(std::string(d.status().message()).find("HOST:PORT"), std::string::npos);
}

TEST(TcpCommTest, APeerThatLeavesOrHangsIsAnErrorNotAHang) {
  const int port = FreePort();
  std::atomic<bool> left{false};
  const auto start = std::chrono::steady_clock::now();
  OnRanks(
      3,
      [&](int r, Communicator& comm) {
        if (r == 2) {  // leaves: its communicator (and sockets) go when the thread ends
          left = true;
          return;
        }
        while (!left) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        float x[4] = {1, 2, 3, 4};
        absl::Status s = comm.AllReduceSum(x, 4);
        EXPECT_FALSE(s.ok()) << "rank " << r;
        // Rank 0 sees the closed socket; rank 1 then sees rank 0's connection close or time
        // out, depending on what rank 0 does after its error.
        if (r == 0) {
          EXPECT_NE(std::string(s.message()).find("rank 2 closed the connection"),
                    std::string::npos)
              << s;
        }
      },
      [&](int r) {
        TcpCommunicatorOptions o = Options(r, 3, port);
        o.timeout_s = 2;
        return o;
      });
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(8));

  // Nobody sends: the receive gives up after the timeout with the rank named.
  const int port2 = FreePort();
  OnRanks(
      2,
      [&](int r, Communicator& comm) {
        if (r == 1) {
          std::this_thread::sleep_for(std::chrono::milliseconds(1500));
          return;
        }
        int64_t v = 0;
        absl::Status s = comm.Broadcast(&v, sizeof(v), 1);
        ASSERT_FALSE(s.ok());
        EXPECT_TRUE(s.code() == absl::StatusCode::kDeadlineExceeded ||
                    s.code() == absl::StatusCode::kUnavailable)
            << s;
      },
      [&](int r) {
        TcpCommunicatorOptions o = Options(r, 2, port2);
        o.timeout_s = 1;
        return o;
      });
}

}  // namespace
}  // namespace quantkv
