// The default CPU threads of a rank (backends/cpu/cpu_threads.h) from made-up affinity masks of the ranks of
// a host, and on one rank through the single-rank communicator (runtime/host_threads.h).
#include <gtest/gtest.h>

#include <vector>

#include "backends/cpu/cpu_backend.h"
#include "backends/cpu/cpu_threads.h"
#include "runtime/host_threads.h"

namespace shardlm {
namespace {

std::vector<int> threads_of_all(const std::vector<CpuMask>& masks) {
  std::vector<int> t;
  for (size_t r = 0; r < masks.size(); ++r) t.push_back(default_cpu_threads(masks, static_cast<int>(r)));
  return t;
}

TEST(CpuMask, AddHasCountAcrossWords) {
  CpuMask m = CpuMask::of({0, 3, 64, 1000});
  EXPECT_EQ(m.count(), 4);
  EXPECT_TRUE(m.has(3) && m.has(64) && m.has(1000));
  EXPECT_FALSE(m.has(1) || m.has(65) || m.has(5000) || m.has(-1));
  EXPECT_EQ(m.n_bits(), 1024);
  EXPECT_EQ(CpuMask::range(8, 8).count(), 8);
  EXPECT_FALSE(CpuMask::range(8, 8).has(7));
  EXPECT_EQ(CpuMask().count(), 0);
}

TEST(CpuMask, ThisProcessHasTheCpusTheBackendCounts) {
  const CpuMask m = CpuMask::of_this_process();
  EXPECT_GE(m.count(), 1);
  EXPECT_EQ(m.count(), cpu_core_count());
}

TEST(DefaultCpuThreads, OneRankTakesAllItsCpus) {
  EXPECT_EQ(threads_of_all({CpuMask::range(0, 16)}), std::vector<int>{16});
}

TEST(DefaultCpuThreads, RanksSharingAllCpusSplitThem) {
  const CpuMask all = CpuMask::range(0, 16);
  EXPECT_EQ(threads_of_all({all, all}), (std::vector<int>{8, 8}));
  EXPECT_EQ(threads_of_all({all, all, all}), (std::vector<int>{5, 5, 5}));  // 16/3, rounded down: no oversubscription
  const CpuMask two = CpuMask::range(0, 2);
  EXPECT_EQ(threads_of_all({two, two, two, two}), (std::vector<int>{1, 1, 1, 1}));  // more ranks than CPUs: 1 each
}

TEST(DefaultCpuThreads, RanksBoundToDisjointCpusKeepTheirs) {
  // mpirun's default binding for np <= 2: one core each.
  EXPECT_EQ(threads_of_all({CpuMask::of({0}), CpuMask::of({1})}), (std::vector<int>{1, 1}));
  EXPECT_EQ(threads_of_all({CpuMask::range(0, 8), CpuMask::range(8, 8)}), (std::vector<int>{8, 8}));
  // A binding to one core of a host (2 hyperthreads) under mpirun -np 1: the binding is kept.
  EXPECT_EQ(threads_of_all({CpuMask::of({0, 16})}), std::vector<int>{2});
}

TEST(DefaultCpuThreads, PartlySharedCpusAreDividedOneByOne) {
  // A rank that may run anywhere on 16 CPUs beside one bound to CPU 0: 15 + 1/2 and 1/2 (at least 1).
  EXPECT_EQ(threads_of_all({CpuMask::range(0, 16), CpuMask::of({0})}), (std::vector<int>{15, 1}));
  // Overlapping halves: 4 CPUs alone + 4 shared by two = 6 each, 12 threads on 12 CPUs.
  EXPECT_EQ(threads_of_all({CpuMask::range(0, 8), CpuMask::range(4, 8)}), (std::vector<int>{6, 6}));
  // 24 CPUs in thirds add up to exactly 8 (not 7.999...).
  const CpuMask c24 = CpuMask::range(0, 24);
  EXPECT_EQ(threads_of_all({c24, c24, c24}), (std::vector<int>{8, 8, 8}));
}

TEST(DefaultCpuThreads, MasksOfDifferentLengthsAndEmptyOnes) {
  EXPECT_EQ(threads_of_all({CpuMask::range(0, 200), CpuMask::of({150})}), (std::vector<int>{199, 1}));
  EXPECT_EQ(threads_of_all({CpuMask()}), std::vector<int>{1});
}

TEST(HostDefaultCpuThreads, OneRankGetsItsWholeMask) {
  auto comm = make_single_rank_communicator();
  EXPECT_EQ(comm->local_rank(), 0);
  EXPECT_EQ(comm->local_size(), 1);
  EXPECT_EQ(host_default_cpu_threads(*comm), CpuMask::of_this_process().count());
}

}  // namespace
}  // namespace shardlm
