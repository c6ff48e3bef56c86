// The ops' persistent thread pool: every index exactly once under both schedules, the work
// really shared between threads, and the cases that must run inline instead of deadlocking
// (a loop inside a loop, loops from several threads at once, a forked child).
#include "kernels/cpu/thread_pool.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

namespace kvgate::kernels::cpu {
namespace {

class ThreadPoolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    saved_ = PoolThreads();
    SetPoolThreads(3);
  }
  void TearDown() override { SetPoolThreads(saved_); }
  int saved_ = 1;
};

// Counts how often each index of [0, n) was visited.
std::vector<int> Visits(int64_t n, Schedule schedule, int64_t chunk) {
  std::vector<std::atomic<int>> seen(static_cast<size_t>(n));
  ParallelFor(
      n, schedule,
      [&](int64_t begin, int64_t end) {
        EXPECT_LT(begin, end);
        for (int64_t i = begin; i < end; ++i) seen[static_cast<size_t>(i)].fetch_add(1);
      },
      chunk);
  std::vector<int> out;
  for (auto& s : seen) out.push_back(s.load());
  return out;
}

TEST_F(ThreadPoolTest, VisitsEveryIndexOnce) {
  EXPECT_EQ(PoolThreads(), 3);
  for (Schedule schedule : {Schedule::kStatic, Schedule::kDynamic}) {
    for (int64_t n : {0, 1, 2, 3, 5, 64, 1001}) {
      for (int64_t chunk : {1, 4, 7}) {
        const std::vector<int> v = Visits(n, schedule, chunk);
        for (int64_t i = 0; i < n; ++i) {
          ASSERT_EQ(v[static_cast<size_t>(i)], 1) << "n=" << n << " chunk=" << chunk << " i=" << i;
        }
      }
    }
  }
}

// Each static share runs on its own thread: three shares that wait for each other can only
// finish if three threads run them at the same time (also after the workers went to sleep).
TEST_F(ThreadPoolTest, SharesRunOnDistinctThreadsAtOnce) {
  for (int round = 0; round < 3; ++round) {
    std::atomic<int> arrived{0};
    std::mutex mu;
    std::set<std::thread::id> ids;
    ParallelFor(3, Schedule::kStatic, [&](int64_t, int64_t) {
      {
        std::lock_guard<std::mutex> lock(mu);
        ids.insert(std::this_thread::get_id());
      }
      arrived.fetch_add(1);
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
      while (arrived.load() < 3 && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::yield();
      }
    });
    EXPECT_EQ(arrived.load(), 3);
    EXPECT_EQ(ids.size(), 3u) << "round " << round;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // past the workers' spin
  }
}

TEST_F(ThreadPoolTest, NestedLoopsRunInline) {
  std::atomic<int64_t> total{0};
  ParallelFor(8, Schedule::kDynamic, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      ParallelFor(100, Schedule::kStatic, [&](int64_t b, int64_t e) { total.fetch_add(e - b); });
    }
  });
  EXPECT_EQ(total.load(), 800);
}

TEST_F(ThreadPoolTest, LoopsFromSeveralThreadsAtOnce) {
  std::vector<std::thread> callers;
  std::vector<int64_t> sums(4, 0);
  for (int c = 0; c < 4; ++c) {
    callers.emplace_back([c, &sums] {
      for (int rep = 0; rep < 200; ++rep) {
        std::atomic<int64_t> s{0};
        ParallelFor(257, rep % 2 ? Schedule::kDynamic : Schedule::kStatic,
                    [&](int64_t begin, int64_t end) {
                      for (int64_t i = begin; i < end; ++i) s.fetch_add(i);
                    });
        sums[static_cast<size_t>(c)] += s.load();
      }
    });
  }
  for (auto& t : callers) t.join();
  for (int64_t s : sums) EXPECT_EQ(s, 200 * (256 * 257 / 2));
}

TEST_F(ThreadPoolTest, ResizesAndForkedChildRunsInline) {
  SetPoolThreads(1);
  EXPECT_EQ(PoolThreads(), 1);
  EXPECT_EQ(Visits(10, Schedule::kStatic, 1), std::vector<int>(10, 1));
  SetPoolThreads(2);
  EXPECT_EQ(PoolThreads(), 2);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {  // the pool's workers did not follow: the loop must still finish, inline
    std::atomic<int64_t> total{0};
    ParallelFor(1000, Schedule::kStatic, [&](int64_t b, int64_t e) { total.fetch_add(e - b); });
    _exit(total.load() == 1000 ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

}  // namespace
}  // namespace kvgate::kernels::cpu
