#include "kernels/cpu/thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace kvgate::kernels::cpu {
namespace {

using Body = absl::FunctionRef<void(int64_t, int64_t)>;
using Clock = std::chrono::steady_clock;

// How long an idle worker polls for the next loop before it sleeps: longer than the gap between
// two ops of a layer, far shorter than the gap between two requests.
constexpr auto kSpin = std::chrono::microseconds(200);

// Set on pool workers for good and on the caller while it runs its share: a loop started there
// runs inline.
thread_local bool t_in_loop = false;
// Set in a child process after fork(): the pool's threads did not follow it.
std::atomic<bool> g_forked{false};

inline void CpuRelax() { __builtin_ia32_pause(); }

int DefaultThreads() {
  if (const char* env = std::getenv("OMP_NUM_THREADS"); env != nullptr) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

class Pool {
 public:
  static Pool& Get() {
    // Never destroyed: workers may still be asleep when static destructors run at exit.
    static Pool* pool = [] {
      pthread_atfork(nullptr, nullptr, [] { g_forked.store(true); });
      return new Pool(DefaultThreads());
    }();
    return *pool;
  }

  void Run(int64_t n, Schedule schedule, Body body, int64_t chunk) {
    if (n <= 0) return;
    std::unique_lock<std::mutex> lock(mu_, std::defer_lock);
    if (t_in_loop || g_forked.load(std::memory_order_relaxed) || n == 1 || !lock.try_lock() ||
        workers_.empty()) {
      body(0, n);
      return;
    }
    body_ = &body;
    n_ = n;
    schedule_ = schedule;
    chunk_ = std::max<int64_t>(1, chunk);
    threads_ = static_cast<int>(workers_.size()) + 1;
    next_.store(0, std::memory_order_relaxed);
    pending_.store(threads_ - 1, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);  // publishes the fields above
    generation_.notify_all();                             // a syscall only when some worker sleeps
    t_in_loop = true;
    Work(0);
    t_in_loop = false;
    for (int polls = 0; pending_.load(std::memory_order_acquire) != 0;) {
      CpuRelax();
      if (++polls > (1 << 14)) std::this_thread::yield();  // a worker is waking from sleep
    }
  }

  void Resize(int threads) {
    std::lock_guard<std::mutex> lock(mu_);
    StopWorkers();
    const uint32_t start = generation_.load(std::memory_order_relaxed);
    for (int t = 1; t < std::max(1, threads); ++t) {
      workers_.emplace_back([this, t, start] { WorkerLoop(t, start); });
    }
  }

  int threads() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int>(workers_.size()) + 1;
  }

 private:
  explicit Pool(int threads) { Resize(threads); }

  void StopWorkers() {
    if (workers_.empty()) return;
    stop_.store(true, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    for (std::thread& w : workers_) w.join();
    workers_.clear();
    stop_.store(false, std::memory_order_relaxed);
  }

  void WorkerLoop(int t, uint32_t seen) {
    t_in_loop = true;
    for (;;) {
      uint32_t g;
      const Clock::time_point deadline = Clock::now() + kSpin;
      for (int polls = 0; (g = generation_.load(std::memory_order_acquire)) == seen;) {
        CpuRelax();
        if ((++polls & 63) == 0 && Clock::now() > deadline) {
          generation_.wait(seen, std::memory_order_acquire);
        }
      }
      seen = g;
      if (stop_.load(std::memory_order_relaxed)) return;
      Work(t);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  // Thread t's part of the published loop.
  void Work(int t) {
    const Body& body = *body_;
    if (schedule_ == Schedule::kStatic) {
      const int64_t begin = n_ * t / threads_, end = n_ * (t + 1) / threads_;
      if (begin < end) body(begin, end);
      return;
    }
    for (;;) {
      const int64_t begin = next_.fetch_add(chunk_, std::memory_order_relaxed);
      if (begin >= n_) return;
      body(begin, std::min(n_, begin + chunk_));
    }
  }

  std::mutex mu_;  // held by the thread whose loop runs, and while resizing
  std::vector<std::thread> workers_;
  std::atomic<uint32_t> generation_{0};  // bumped to hand the workers a loop (or stop_)
  std::atomic<int> pending_{0};          // workers that have not finished the current loop
  std::atomic<int64_t> next_{0};         // kDynamic: first index not yet taken
  std::atomic<bool> stop_{false};
  // The current loop, written before generation_ is bumped.
  const Body* body_ = nullptr;
  int64_t n_ = 0, chunk_ = 1;
  Schedule schedule_ = Schedule::kStatic;
  int threads_ = 1;
};

}  // namespace

void ParallelFor(int64_t n, Schedule schedule, Body body, int64_t chunk) {
  Pool::Get().Run(n, schedule, body, chunk);
}

void SetPoolThreads(int n) { Pool::Get().Resize(n); }

int PoolThreads() { return Pool::Get().threads(); }

}  // namespace kvgate::kernels::cpu
