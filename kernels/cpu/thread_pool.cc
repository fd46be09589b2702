#include "kernels/thread_pool.h"

#include <algorithm>

namespace quantkv::kernels {
namespace {
constexpr int kSpinIterations = 20000;

inline void CpuRelax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}
}  // namespace

ThreadPool::ThreadPool(int n_threads) : n_threads_(std::max(1, n_threads)) {
  for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i] { WorkerLoop(i); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true, std::memory_order_release);
  generation_.fetch_add(1, std::memory_order_acq_rel);
  generation_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::ParallelFor(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn,
                             int64_t grain) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int parts =
      static_cast<int>(std::min<int64_t>(n_threads_, std::max<int64_t>(1, n / grain)));
  if (parts == 1) {
    fn(0, n, 0);
    return;
  }
  task_ = &fn;
  task_n_ = n;
  task_parts_ = parts;
  // Every worker acknowledges every generation (even with no part to run), so none can
  // lag into the next one with a stale view of the task.
  pending_.store(n_threads_ - 1, std::memory_order_release);
  generation_.fetch_add(1, std::memory_order_acq_rel);
  generation_.notify_all();
  fn(0, n / parts, 0);
  // Wait for the other parts; spinning is cheap here because the parts are balanced.
  while (pending_.load(std::memory_order_acquire) != 0) CpuRelax();
  task_ = nullptr;
}

void ThreadPool::WorkerLoop(int index) {
  uint64_t seen = 0;
  while (true) {
    uint64_t gen = generation_.load(std::memory_order_acquire);
    for (int spin = 0; gen == seen && spin < kSpinIterations; ++spin) {
      CpuRelax();
      gen = generation_.load(std::memory_order_acquire);
    }
    if (gen == seen) {
      generation_.wait(seen, std::memory_order_acquire);
      continue;
    }
    seen = gen;
    if (stop_.load(std::memory_order_acquire)) return;
    if (index < task_parts_) {
      const int64_t begin = task_n_ * index / task_parts_;
      const int64_t end = task_n_ * (index + 1) / task_parts_;
      (*task_)(begin, end, index);
    }
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

}  // namespace quantkv::kernels
