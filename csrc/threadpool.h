// A small fixed-size thread pool for the kernels: the calling thread takes part, workers spin
// briefly between jobs (decode calls come back to back) and then sleep on a condition variable.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace bitnet158 {

// fn(ctx, thread_index, thread_count) runs once on each of the pool's threads.
using TaskFn = void (*)(void* ctx, int thread, int threads);

class ThreadPool {
 public:
  ThreadPool() = default;
  ~ThreadPool() { stop_workers(); }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Total threads, the caller included (at least 1).
  void set_threads(int threads);
  int threads() const { return threads_; }
  // Runs fn on every thread and returns when all are done. Not reentrant: callers serialize.
  void run(TaskFn fn, void* ctx);

 private:
  void start_workers();
  void stop_workers();
  void worker_loop(int index, uint64_t seen);

  int threads_ = 1;
  int owner_pid_ = 0;
  std::vector<std::thread*> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
};

ThreadPool& pool();

}  // namespace bitnet158
