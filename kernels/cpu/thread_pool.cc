#include "kernels/thread_pool.h"

#include <algorithm>

namespace quantkv::kernels {
namespace {
constexpr int kWorkerSpins = 20000;  // ~0.5 ms of pause before a worker sleeps
constexpr int kCallerSpins = 2000;   // then the caller yields its core to a late worker
constexpr int kChunksPerThread = 4;

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
  wake_.fetch_add(1, std::memory_order_acq_rel);
  wake_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::RunChunks(uint32_t generation, int thread_index) {
  uint64_t cur = cursor_.load(std::memory_order_acquire);
  while (true) {
    if (static_cast<uint32_t>(cur >> 32) != generation) return;
    const int64_t chunk = static_cast<int64_t>(cur & 0xffffffffu);
    if (chunk >= n_chunks_) return;
    if (!cursor_.compare_exchange_weak(cur, cur + 1, std::memory_order_acq_rel)) continue;
    // The claim succeeded, so this call is still current and its fields are stable.
    const int64_t begin = task_n_ * chunk / n_chunks_;
    const int64_t end = task_n_ * (chunk + 1) / n_chunks_;
    (*task_)(begin, end, thread_index);
    done_.fetch_add(1, std::memory_order_acq_rel);
    cur = cursor_.load(std::memory_order_acquire);
  }
}

void ThreadPool::ParallelFor(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn,
                             int64_t grain) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t chunks =
      std::min<int64_t>(static_cast<int64_t>(n_threads_) * kChunksPerThread, std::max<int64_t>(1, n / grain));
  if (n_threads_ == 1 || chunks == 1) {
    fn(0, n, 0);
    return;
  }
  task_ = &fn;
  task_n_ = n;
  n_chunks_ = chunks;
  done_.store(0, std::memory_order_relaxed);
  const uint32_t generation = static_cast<uint32_t>(cursor_.load() >> 32) + 1;
  cursor_.store(static_cast<uint64_t>(generation) << 32, std::memory_order_release);
  wake_.fetch_add(1, std::memory_order_acq_rel);
  wake_.notify_all();
  RunChunks(generation, 0);
  for (int spin = 0; done_.load(std::memory_order_acquire) != chunks; ++spin) {
    if (spin < kCallerSpins) {
      CpuRelax();
    } else {
      std::this_thread::yield();
    }
  }
}

void ThreadPool::WorkerLoop(int index) {
  // Start from the value the constructor saw, not a fresh load: a call (or the destructor)
  // may already have bumped wake_ before this thread first ran.
  uint32_t seen = 0;
  while (true) {
    uint32_t w = wake_.load(std::memory_order_acquire);
    for (int spin = 0; w == seen && spin < kWorkerSpins; ++spin) {
      CpuRelax();
      w = wake_.load(std::memory_order_acquire);
    }
    if (w == seen) {
      wake_.wait(seen, std::memory_order_acquire);
      continue;
    }
    seen = w;
    if (stop_.load(std::memory_order_acquire)) return;
    RunChunks(static_cast<uint32_t>(cursor_.load(std::memory_order_acquire) >> 32), index);
  }
}

}  // namespace quantkv::kernels
