// A fixed pool of worker threads for data-parallel kernels. ParallelFor splits a range into
// one contiguous part per thread (the caller runs part 0) and returns when all are done.
// Workers spin briefly and then sleep on a futex (std::atomic::wait), so the ~200
// fork/joins of a decode step cost microseconds, not a condition-variable wake-up each.
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

  // fn(begin, end, thread_index) over [0, n) split evenly; grain is the minimum part size.
  void ParallelFor(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn,
                   int64_t grain = 1);

 private:
  void WorkerLoop(int index);

  int n_threads_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int64_t, int64_t, int)>* task_ = nullptr;
  int64_t task_n_ = 0;
  int task_parts_ = 0;
};

}  // namespace quantkv::kernels
