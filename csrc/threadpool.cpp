#include "threadpool.h"

#include <unistd.h>

#include <chrono>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#elif defined(__aarch64__)
static inline void cpu_relax() { asm volatile("yield"); }
#else
static inline void cpu_relax() {}
#endif

namespace bitnet158 {

// How long an idle worker spins before it sleeps: long enough to span the Python work between two
// kernel calls of one decode step, short enough not to steal a core from PyTorch for long.
static constexpr auto kSpin = std::chrono::microseconds(100);

ThreadPool& pool() {
  static ThreadPool instance;
  return instance;
}

void ThreadPool::set_threads(int threads) {
  if (threads < 1) threads = 1;
  if (threads == threads_ && owner_pid_ == getpid() && static_cast<int>(workers_.size()) == threads - 1) return;
  stop_workers();
  threads_ = threads;
  start_workers();
}

void ThreadPool::start_workers() {
  owner_pid_ = getpid();
  stop_.store(false);
  // Workers start from the current generation, read here: a job posted before a new thread first
  // runs must still count as new to it.
  const uint64_t seen = generation_.load();
  for (int i = 1; i < threads_; ++i) workers_.push_back(new std::thread(&ThreadPool::worker_loop, this, i, seen));
}

void ThreadPool::stop_workers() {
  if (owner_pid_ != getpid()) {
    // A forked child inherits the thread objects but not the threads: forget them (they cannot be joined).
    workers_.clear();
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  for (std::thread* worker : workers_) {
    worker->join();
    delete worker;
  }
  workers_.clear();
}

void ThreadPool::worker_loop(int index, uint64_t seen) {
  for (;;) {
    auto started = std::chrono::steady_clock::now();
    int spins = 0;
    while (generation_.load(std::memory_order_acquire) == seen) {
      cpu_relax();
      if (++spins % 256 == 0 && std::chrono::steady_clock::now() - started > kSpin) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
      }
    }
    seen = generation_.load(std::memory_order_acquire);
    if (stop_.load()) return;
    fn_(ctx_, index, threads_);
    pending_.fetch_sub(1, std::memory_order_release);
  }
}

void ThreadPool::run(TaskFn fn, void* ctx) {
  if (owner_pid_ != getpid()) set_threads(threads_);  // first use, or first use after a fork
  if (threads_ == 1) {
    fn(ctx, 0, 1);
    return;
  }
  fn_ = fn;
  ctx_ = ctx;
  pending_.store(threads_ - 1, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    generation_.fetch_add(1, std::memory_order_release);
  }
  wake_.notify_all();
  fn(ctx, 0, threads_);
  while (pending_.load(std::memory_order_acquire) != 0) cpu_relax();
}

}  // namespace bitnet158
