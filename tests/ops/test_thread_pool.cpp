// The CPU backend's thread pool: every index of every call is run exactly once, whether the workers are still
// polling for the next call (calls microseconds apart, as in a decode step) or asleep (calls far apart), with
// more threads than cores (the CI machine has 2) and when calls are too small to split.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "backends/cpu/thread_pool.h"

namespace shardlm {
namespace {

// Runs `calls` parallel_for over n indices, sleeping `gap` between calls; returns how often each index ran.
std::vector<int> hits(ThreadPool& pool, int64_t n, int64_t grain, int calls, std::chrono::microseconds gap) {
  std::vector<std::atomic<int>> count(static_cast<size_t>(n));
  for (int c = 0; c < calls; ++c) {
    pool.parallel_for(n, grain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) count[static_cast<size_t>(i)].fetch_add(1, std::memory_order_relaxed);
    });
    if (gap.count() > 0) std::this_thread::sleep_for(gap);
  }
  std::vector<int> out;
  for (auto& x : count) out.push_back(x.load());
  return out;
}

TEST(ThreadPool, BackToBackCallsCoverEveryIndexOnce) {
  for (int threads : {2, 3, 8}) {
    ThreadPool pool(threads);
    const std::vector<int> h = hits(pool, 1000, 1, 2000, std::chrono::microseconds(0));
    for (size_t i = 0; i < h.size(); ++i) ASSERT_EQ(h[i], 2000) << "index " << i << ", " << threads << " threads";
  }
}

TEST(ThreadPool, CallsAfterTheWorkersSleptCoverEveryIndexOnce) {
  // Gaps of 1 ms, ten times the polling time: each call wakes sleeping workers (a lost wake-up hangs here).
  ThreadPool pool(4);
  const std::vector<int> h = hits(pool, 257, 1, 50, std::chrono::microseconds(1000));
  for (size_t i = 0; i < h.size(); ++i) ASSERT_EQ(h[i], 50) << "index " << i;
}

TEST(ThreadPool, SmallOrEmptyRangesRunOnTheCaller) {
  ThreadPool pool(4);
  const std::thread::id me = std::this_thread::get_id();
  bool on_caller = false;
  pool.parallel_for(10, 100, [&](int64_t b, int64_t e) { on_caller = b == 0 && e == 10 && std::this_thread::get_id() == me; });
  EXPECT_TRUE(on_caller);
  int called = 0;
  pool.parallel_for(0, 1, [&](int64_t, int64_t) { ++called; });
  EXPECT_EQ(called, 0);
  const std::vector<int> h = hits(pool, 3, 1, 100, std::chrono::microseconds(0));  // fewer indices than threads
  for (int x : h) EXPECT_EQ(x, 100);
}

}  // namespace
}  // namespace shardlm
