#include "threadpool.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
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
// A thread that has waited this long yields the core every 64 pauses: on a busy machine (a server's HTTP
// side and its clients on the same cores) the thread that has work runs sooner. Not earlier: the short
// waits between kernel calls would hand the core, for a whole time slice, to whatever else is runnable
// there, such as PyTorch's OpenMP workers or llama.cpp's, which spin after each op (a GEMV alternating
// with torch ops then takes 1.6x as long).
static constexpr auto kYieldAfter = std::chrono::microseconds(50);
static constexpr int kSpinsPerYield = 64;

// One pause of a thread waiting since `started`.
static inline void wait_a_little(std::chrono::steady_clock::time_point started, int spins) {
  cpu_relax();
  if (spins % kSpinsPerYield == 0 && std::chrono::steady_clock::now() - started > kYieldAfter) sched_yield();
}

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

static constexpr uint64_t kFieldBits = 24, kFieldMask = (uint64_t{1} << kFieldBits) - 1;

static uint64_t job_word(uint64_t generation, uint64_t chunks, uint64_t next) {
  return ((generation & 0xffff) << (2 * kFieldBits)) | (chunks << kFieldBits) | next;
}

void ThreadPool::worker_loop(int index, uint64_t seen) {
  for (;;) {
    auto started = std::chrono::steady_clock::now();
    int spins = 0;
    while (generation_.load(std::memory_order_acquire) == seen) {
      wait_a_little(started, ++spins);
      if (spins % 256 == 0 && std::chrono::steady_clock::now() - started > kSpin) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
      }
    }
    seen = generation_.load(std::memory_order_acquire);
    if (stop_.load()) return;
    work(index, seen);
  }
}

// Takes chunks of job `generation` until none is left. A chunk is claimed by one compare-and-swap on
// the job word, which fails once a newer job has replaced it; the job's fields are read only after a
// claim, and they cannot change before the claimed chunk is done.
void ThreadPool::work(int thread, uint64_t generation) {
  uint64_t word = next_.load(std::memory_order_acquire);
  for (;;) {
    const uint64_t chunks = (word >> kFieldBits) & kFieldMask, chunk = word & kFieldMask;
    if (word >> (2 * kFieldBits) != (generation & 0xffff) || chunk >= chunks) return;
    if (!next_.compare_exchange_weak(word, word + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
    const int64_t begin = static_cast<int64_t>(chunk) * grain_;
    fn_(ctx_, begin, std::min(count_, begin + grain_), thread);
    done_.fetch_add(1, std::memory_order_release);
    word = next_.load(std::memory_order_acquire);
  }
}

void ThreadPool::parallel_for(int64_t count, int64_t grain, RangeFn fn, void* ctx) {
  if (count <= 0) return;
  if (owner_pid_ != getpid()) set_threads(threads_);  // first use, or first use after a fork
  grain = std::max<int64_t>(grain, (count + static_cast<int64_t>(kFieldMask) - 1) / static_cast<int64_t>(kFieldMask));
  const int64_t chunks = (count + grain - 1) / grain;
  if (threads_ == 1 || chunks == 1) {
    fn(ctx, 0, count, 0);
    return;
  }
  fn_ = fn;
  ctx_ = ctx;
  count_ = count;
  grain_ = grain;
  done_.store(0, std::memory_order_relaxed);
  const uint64_t generation = generation_.load(std::memory_order_relaxed) + 1;
  next_.store(job_word(generation, chunks, 0), std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    generation_.store(generation, std::memory_order_release);
  }
  wake_.notify_all();
  work(0, generation);
  const auto started = std::chrono::steady_clock::now();
  for (int spins = 1; done_.load(std::memory_order_acquire) != chunks; ++spins) wait_a_little(started, spins);
}

}  // namespace bitnet158
