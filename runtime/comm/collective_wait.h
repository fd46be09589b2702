// How a rank waits for a collective it polls (the MPI and NCCL communicators). A decode
// step's collectives complete within microseconds to a millisecond of the slowest rank's
// arrival, so the first kSpinFor is a tight poll loop, as fast as a blocking wait (MPI's
// blocking calls poll too; measured here the non-blocking Iallgather costs ~2 us more per
// call than MPI_Allgather, the polling nothing). A longer wait means a peer is far behind
// (start-up skew, a long prefill, a stopped or dead rank): yield the core until kYieldFor,
// then sleep in steps doubling up to kMaxSleep, so that a waiting rank does not burn a core
// its peers may need (with --oversubscribe they share one); a wait that long loses at most
// kMaxSleep.
#pragma once

#include <algorithm>
#include <chrono>
#include <thread>

namespace quantkv {

class CollectiveBackoff {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr auto kSpinFor = std::chrono::milliseconds(2);
  static constexpr auto kYieldFor = std::chrono::milliseconds(20);
  static constexpr auto kFirstSleep = std::chrono::microseconds(20);
  static constexpr auto kMaxSleep = std::chrono::milliseconds(1);

  // Between two polls of a collective still open after `waited`.
  void Pause(Clock::duration waited) {
    if (waited < kSpinFor) return;
    if (waited < kYieldFor) {
      std::this_thread::yield();
      return;
    }
    std::this_thread::sleep_for(sleep_);
    sleep_ = std::min<Clock::duration>(sleep_ * 2, kMaxSleep);
  }

 private:
  Clock::duration sleep_ = std::chrono::duration_cast<Clock::duration>(kFirstSleep);
};

}  // namespace quantkv
