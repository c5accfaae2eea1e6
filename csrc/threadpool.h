// A small fixed-size thread pool for the kernels: the calling thread takes part, workers spin
// briefly between jobs (decode calls come back to back) and then sleep on a condition variable.
//
// A job is split into chunks that every thread takes one after another from a shared counter, so a
// thread the OS does not run for a while (a busy machine: the server's HTTP side, its clients) leaves
// its share to the others instead of holding them up at the end of the job.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace bitnet158 {

// fn(ctx, begin, end, thread) runs a chunk [begin, end); `thread` < threads() tells threads apart
// (for per-thread scratch), the caller being thread 0.
using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end, int thread);

class ThreadPool {
 public:
  ThreadPool() = default;
  ~ThreadPool() { stop_workers(); }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Total threads, the caller included (at least 1).
  void set_threads(int threads);
  int threads() const { return threads_; }
  // Runs fn over [0, count) in chunks of `grain` (the last may be shorter; every chunk starts at a
  // multiple of grain) and returns when all are done. Not reentrant: callers serialize.
  void parallel_for(int64_t count, int64_t grain, RangeFn fn, void* ctx);

 private:
  void start_workers();
  void stop_workers();
  void worker_loop(int index, uint64_t seen);
  void work(int thread, uint64_t generation);

  int threads_ = 1;
  int owner_pid_ = 0;
  std::vector<std::thread*> workers_;
  std::atomic<uint64_t> generation_{0};
  // The job's chunks: generation (16 bits) | number of chunks (24 bits) | next chunk to take (24 bits),
  // one word so that a thread claims a chunk of the job it saw, or none.
  std::atomic<uint64_t> next_{0};
  std::atomic<int64_t> done_{0};  // chunks finished
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
  RangeFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t count_ = 0, grain_ = 1;
};

ThreadPool& pool();

}  // namespace bitnet158
