// The MPI communicator's time bound, the part that must not fire: QUANTKV_COMM_TIMEOUT_S
// parsing, and a rank that arrives late but within the timeout, which must succeed without
// the waiting rank burning its core meanwhile. Run as `mpirun -np 2 tp_comm_timeout_test`
// (ctest does). The timeout firing ends the job, so tp_failure_test.sh checks it from outside.
#include <time.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/comm/communicator.h"
#include "runtime/comm/mpi_communicator.h"

namespace quantkv {
namespace {

// Sets QUANTKV_COMM_TIMEOUT_S for one scope and puts back what was there.
class ScopedTimeoutEnv {
 public:
  explicit ScopedTimeoutEnv(const char* value) {
    if (const char* old = std::getenv(kName)) old_ = old;
    if (value) {
      setenv(kName, value, 1);
    } else {
      unsetenv(kName);
    }
  }
  ~ScopedTimeoutEnv() {
    if (old_) {
      setenv(kName, old_->c_str(), 1);
    } else {
      unsetenv(kName);
    }
  }

 private:
  static constexpr const char* kName = "QUANTKV_COMM_TIMEOUT_S";
  std::optional<std::string> old_;
};

TEST(CommTimeoutTest, FromEnvironment) {
  {
    ScopedTimeoutEnv env(nullptr);
    EXPECT_EQ(CommTimeoutFromEnv().value(), kDefaultCommTimeoutS);
  }
  {
    ScopedTimeoutEnv env("");
    EXPECT_EQ(CommTimeoutFromEnv().value(), kDefaultCommTimeoutS);
  }
  {
    ScopedTimeoutEnv env("5");
    EXPECT_EQ(CommTimeoutFromEnv().value(), 5.0);
  }
  {
    ScopedTimeoutEnv env("2.5");
    EXPECT_EQ(CommTimeoutFromEnv().value(), 2.5);
  }
  {
    ScopedTimeoutEnv env("0");  // no timeout
    EXPECT_EQ(CommTimeoutFromEnv().value(), 0.0);
  }
  for (const char* bad : {"-1", "abc", "5s", "inf", "nan"}) {
    ScopedTimeoutEnv env(bad);
    const absl::StatusOr<double> t = CommTimeoutFromEnv();
    ASSERT_FALSE(t.ok()) << bad;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(t.status().message().find(bad), std::string::npos) << t.status();
  }
  {
    // And Create refuses it before touching MPI, rather than running without a bound.
    ScopedTimeoutEnv env("abc");
    EXPECT_EQ(CreateMpiCommunicator().status().code(), absl::StatusCode::kInvalidArgument);
  }
}

double ThreadCpuSeconds() {
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// The last rank starts its collectives 1.5 s after the others, well inside a 10 s timeout:
// every rank must get the right result (no abort), and the ranks that waited must have slept
// rather than spun. MPI's blocking calls poll the whole time (1.5 s of CPU); the bounded wait
// spins and yields only for its first milliseconds, then sleeps, so under 0.3 s of CPU.
TEST(MpiTimeoutTest, LateRankWithinTheTimeoutSucceedsWithoutSpinning) {
  ASSERT_GT(LauncherWorldSize(), 1) << "run under mpirun -np 2 (ctest does)";
  absl::StatusOr<std::unique_ptr<Communicator>> made = CreateMpiCommunicator({.timeout_s = 10});
  ASSERT_TRUE(made.ok()) << made.status();
  Communicator& c = **made;
  ASSERT_TRUE(c.Barrier().ok());  // start together
  const int late = c.size() - 1;
  constexpr double kLateS = 1.5;
  if (c.rank() == late) std::this_thread::sleep_for(std::chrono::duration<double>(kLateS));

  const auto start = std::chrono::steady_clock::now();
  const double cpu_start = ThreadCpuSeconds();
  std::vector<float> x = {static_cast<float>(c.rank() + 1), 0.5f};
  ASSERT_TRUE(c.AllReduceSum(x.data(), static_cast<int64_t>(x.size())).ok());
  const double cpu = ThreadCpuSeconds() - cpu_start;
  const double wall =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(x[0], static_cast<float>(c.size() * (c.size() + 1) / 2));
  EXPECT_EQ(x[1], 0.5f * c.size());
  if (c.rank() != late) {
    EXPECT_GT(wall, kLateS - 0.2) << "the collective did not wait for the late rank";
    EXPECT_LT(cpu, 0.3) << "waited " << wall << " s using " << cpu << " s of CPU";
  }
  // The other collectives after a wait, so every kind's request completes and frees.
  char text[8] = {};
  if (c.rank() == late) std::snprintf(text, sizeof(text), "late");
  ASSERT_TRUE(c.Broadcast(text, sizeof(text), late).ok());
  EXPECT_STREQ(text, "late");
  EXPECT_TRUE(c.Barrier().ok());
}

}  // namespace
}  // namespace quantkv
