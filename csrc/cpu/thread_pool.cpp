// Persistent worker threads woken per call. Workers spin briefly before sleeping, so the back-to-back
// kernel calls of one forward pass do not pay a futex wake-up each (~20-50 us measured on this VM).
#include "cpu/thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace lowrank::cpu {
namespace {

class Pool {
 public:
  void run(int64_t n_tasks, int num_threads, TaskFn fn, void* ctx) {
    std::lock_guard<std::mutex> call_lock(call_mutex_);
    int helpers = int(std::min<int64_t>(num_threads, n_tasks)) - 1;
    if (helpers <= 0) {
      for (int64_t t = 0; t < n_tasks; ++t) fn(ctx, t);
      return;
    }
    ensure_workers(helpers);
    fn_ = fn;
    ctx_ = ctx;
    n_tasks_ = n_tasks;
    next_.store(0, std::memory_order_relaxed);
    pending_.store(helpers, std::memory_order_relaxed);
    participants_ = helpers;
    {
      std::lock_guard<std::mutex> lk(mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work();
    // Wait for the helpers: spin first (they finish within a task's time), then sleep.
    auto t0 = std::chrono::steady_clock::now();
    while (pending_.load(std::memory_order_acquire) != 0) {
      if (std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(200)) {
        std::unique_lock<std::mutex> lk(mutex_);
        done_.wait(lk, [&] { return pending_.load(std::memory_order_acquire) == 0; });
        break;
      }
    }
  }

 private:
  void work() {
    for (;;) {
      int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
      if (t >= n_tasks_) return;
      fn_(ctx_, t);
    }
  }

  void ensure_workers(int n) {
    while (int(workers_.size()) < n) {
      int id = int(workers_.size());
      // The worker must wait for the generation after the current one, even if it starts running
      // only after run() has already published the next job.
      uint64_t seen = generation_.load(std::memory_order_acquire);
      workers_.emplace_back([this, id, seen] { worker_loop(id, seen); });
      workers_.back().detach();
    }
  }

  void worker_loop(int id, uint64_t seen) {
    for (;;) {
      // Spin ~50 us for the next call before sleeping.
      auto t0 = std::chrono::steady_clock::now();
      while (generation_.load(std::memory_order_acquire) == seen &&
             std::chrono::steady_clock::now() - t0 < std::chrono::microseconds(50)) {
      }
      if (generation_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lk(mutex_);
        wake_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      }
      seen = generation_.load(std::memory_order_acquire);
      if (id < participants_) {
        work();
        if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
          std::lock_guard<std::mutex> lk(mutex_);
          done_.notify_all();
        }
      }
    }
  }

  std::mutex call_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_{0};
  std::atomic<int> pending_{0};
  int participants_ = 0;
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_tasks_ = 0;
  std::vector<std::thread> workers_;
};

Pool* g_pool = nullptr;
std::once_flag g_atfork_once;

Pool& pool() {
  std::call_once(g_atfork_once, [] {
    // A forked child (e.g. a DataLoader worker) inherits no threads: start a fresh pool there.
    pthread_atfork(nullptr, nullptr, [] { g_pool = nullptr; });
  });
  if (g_pool == nullptr) g_pool = new Pool();  // never freed: detached workers reference it
  return *g_pool;
}

}  // namespace

void parallel_for(int64_t n_tasks, int num_threads, TaskFn fn, void* ctx) {
  if (n_tasks <= 0) return;
  pool().run(n_tasks, std::max(1, num_threads), fn, ctx);
}

}  // namespace lowrank::cpu
