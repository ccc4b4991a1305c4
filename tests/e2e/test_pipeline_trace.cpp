// Pipeline overlap: with --pp 2 the prefill of a 256-token prompt keeps both stages busy at once. Two real
// processes under mpirun record each micro-batch's busy interval; the test prints both traces and
// measures the time during which both stages were computing.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <thread>

#include "../model/golden.h"

namespace shardlm::test {
namespace {

using Intervals = std::vector<std::pair<double, double>>;

// Total length of the intersection of two sets of intervals (each set's intervals are disjoint).
double both_busy(const Intervals& a, const Intervals& b) {
  double t = 0;
  for (const auto& x : a)
    for (const auto& y : b) t += std::max(0.0, std::min(x.second, y.second) - std::max(x.first, y.first));
  return t;
}

TEST(BothBusyHelper, IntersectsIntervals) {
  EXPECT_DOUBLE_EQ(both_busy({{0, 2}, {3, 5}}, {{1, 4}}), 2.0);
  EXPECT_DOUBLE_EQ(both_busy({{0, 1}}, {{1, 2}}), 0.0);
}

// Returns the time both stages were busy (seconds), or -1 after a failed assertion.
double measure_overlap(int micro_batch, size_t chunks) {
  const std::string model = converted_model("stories260K");
  const std::string out = std::string(SHARDLM_BINARY_DIR) + "/pipeline-trace-mb" + std::to_string(micro_batch) + ".json";
  std::remove(out.c_str());
  const std::string cmd = "mpirun --allow-run-as-root --oversubscribe --bind-to none --mca mpi_yield_when_idle 1 -np 2 " +
                          std::string(SHARDLM_BINARY_DIR) + "/tests/e2e/pipeline_trace_worker " + model + " 256 " +
                          std::to_string(micro_batch) + " " + out;
  if (std::system(cmd.c_str()) != 0) {
    ADD_FAILURE() << cmd;
    return -1;
  }
  std::ifstream f(out);
  if (!f) {
    ADD_FAILURE() << "worker wrote no trace";
    return -1;
  }
  const nlohmann::json j = nlohmann::json::parse(f);
  if (j["stages"].size() != 2u) {
    ADD_FAILURE() << "expected 2 stages";
    return -1;
  }
  std::vector<Intervals> st(2);
  double t0 = 1e300, t1 = 0;
  for (size_t s = 0; s < 2; ++s) {
    const auto v = j["stages"][s].get<std::vector<double>>();
    if (v.size() != 2 * chunks) {
      ADD_FAILURE() << "stage " << s << ": " << v.size() / 2 << " intervals for " << chunks << " micro-batches";
      return -1;
    }
    for (size_t i = 0; i < v.size(); i += 2) {
      EXPECT_LE(v[i], v[i + 1]);
      st[s].emplace_back(v[i], v[i + 1]);
      t0 = std::min(t0, v[i]);
      t1 = std::max(t1, v[i + 1]);
    }
  }
  std::printf("prefill of 256 tokens, --pp 2, micro-batch %d (ms from the first start):\n", micro_batch);
  for (size_t i = 0; i < chunks; ++i)
    std::printf("  chunk %zu: stage 0 [%8.2f, %8.2f]   stage 1 [%8.2f, %8.2f]\n", i, 1e3 * (st[0][i].first - t0),
                1e3 * (st[0][i].second - t0), 1e3 * (st[1][i].first - t0), 1e3 * (st[1][i].second - t0));
  // Stage 0 never waits for stage 1: its idle time between chunks (a blocking step-plan broadcast once
  // made it wait until stage 1 had finished the previous chunk, and the stages ran one at a time).
  double idle0 = 0;
  for (size_t i = 1; i < chunks; ++i) idle0 += st[0][i].first - st[0][i - 1].second;
  std::printf("  stage 0 idle between chunks %.2f ms\n", 1e3 * idle0);
  const double both = both_busy(st[0], st[1]);
  std::printf("  both stages busy %.2f ms of %.2f ms wall (%.0f%%)\n", 1e3 * both, 1e3 * (t1 - t0),
              100 * both / (t1 - t0));
  // Stage 1 can only start chunk i after stage 0 finished it (allow 1 ms of clock/rounding slack).
  for (size_t i = 0; i < chunks; ++i) EXPECT_GE(st[1][i].first, st[0][i].second - 1e-3) << "chunk " << i;
  return both;
}

// How many cores this process can use at once right now: two threads spin for 50 ms of wall time each and
// report the CPU time they got. On a machine whose other core is taken (a loaded 2-core CI box), two ranks
// run one at a time whatever the engine does, so no overlap can be seen there.
double free_cores() {
  auto spin = [](double* cpu) {
    timespec c0{}, c1{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
    const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(50);
    volatile uint64_t x = 0;
    while (std::chrono::steady_clock::now() < end) x = x + 1;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
    *cpu = static_cast<double>(c1.tv_sec - c0.tv_sec) + 1e-9 * static_cast<double>(c1.tv_nsec - c0.tv_nsec);
  };
  double a = 0, b = 0;
  std::thread ta(spin, &a), tb(spin, &b);
  ta.join();
  tb.join();
  return (a + b) / 0.05;
}

// Another process can take a core for the whole prefill and serialize the stages by accident, so up to five
// runs are made, each after checking that two cores are free; a pipeline that cannot overlap (as before
// hidden states were sent with isend) shows 0 in every run. A machine that never had two free cores cannot
// judge the pipeline: the test is then skipped, saying so (on a machine with two idle cores it always runs).
void check_overlap(int micro_batch, size_t chunks) {
  double best = 0;
  int judged = 0;  // runs made with two cores free
  double cores_seen = 0;
  for (int attempt = 0; attempt < 5 && best <= 0; ++attempt) {
    const double cores = free_cores();
    cores_seen = std::max(cores_seen, cores);
    if (cores < 1.7) {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));  // let the other work move on
      continue;
    }
    ++judged;
    best = std::max(best, measure_overlap(micro_batch, chunks));
  }
  if (judged == 0) GTEST_SKIP() << "two free cores were never available (best " << cores_seen << " of 2)";
  EXPECT_GT(best, 0.0) << "the stages never computed at the same time in " << judged << " runs with two free cores";
}

TEST(PipelineTrace, DefaultMicroBatchOverlapsStages) { check_overlap(0, 2); }  // 256 / pp 2 = 128 per chunk
// 32-token chunks: stage 0 must start each chunk while stage 1 still works on the previous one. This
// failed until hidden states were sent with isend (a blocking rendezvous send waited for stage 1 to finish).
TEST(PipelineTrace, SmallMicroBatchOverlapsStages) { check_overlap(32, 8); }

}  // namespace
}  // namespace shardlm::test
