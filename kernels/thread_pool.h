// A fixed pool of worker threads for data-parallel kernels. ParallelFor cuts a range into
// a few chunks per thread that every thread, the caller included, takes from a shared
// counter: on an oversubscribed machine a preempted worker simply takes fewer chunks
// instead of stalling the whole step. Workers spin briefly between calls and then sleep on
// a futex (std::atomic::wait), so the ~200 fork/joins of a decode step cost microseconds.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

namespace quantkv::kernels {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // fn(begin, end, thread_index) over disjoint chunks covering [0, n); chunks are at least
  // `grain` long. thread_index (0 = caller) identifies the executing thread, for scratch.
  void ParallelFor(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn,
                   int64_t grain = 1);

 private:
  void WorkerLoop(int index);
  // Runs chunks of the current call until none is left; returns whether it ran any.
  void RunChunks(uint32_t generation, int thread_index);

  int n_threads_;
  std::vector<std::thread> workers_;
  // (generation << 32) | next chunk index: a worker claims a chunk with a CAS, which fails
  // once the caller has moved to another call, so no chunk is run twice.
  std::atomic<uint64_t> cursor_{0};
  std::atomic<uint32_t> wake_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int64_t, int64_t, int)>* task_ = nullptr;
  int64_t task_n_ = 0;
  int64_t n_chunks_ = 0;
};

}  // namespace quantkv::kernels
