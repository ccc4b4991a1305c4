// The MPI communicator's local ranks (MPI_Comm_split_type) and the default CPU threads of each rank, with
// real processes started by mpirun on this host: unbound ranks share the CPUs, a bound rank keeps its binding.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "backends/cpu/cpu_threads.h"

namespace shardlm {
namespace {

struct Line {
  int rank = -1, local_rank = -1, local_size = -1, cpus = -1, threads = -1;
};

std::vector<Line> run(int np, const std::string& bind) {
  const std::string cmd = "mpirun --allow-run-as-root --oversubscribe --bind-to " + bind +
                          " --mca mpi_yield_when_idle 1 -np " + std::to_string(np) + " " SHARDLM_BINARY_DIR
                          "/tests/comm/local_ranks_worker";
  std::vector<Line> lines;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) {
    ADD_FAILURE() << "cannot run " << cmd;
    return lines;
  }
  char buf[256];
  while (std::fgets(buf, sizeof buf, p)) {
    Line l;
    if (std::sscanf(buf, "rank %d local_rank %d local_size %d cpus %d threads %d", &l.rank, &l.local_rank,
                    &l.local_size, &l.cpus, &l.threads) == 5)
      lines.push_back(l);
  }
  EXPECT_EQ(pclose(p), 0) << cmd;
  // mpirun forwards each rank's output on its own: lines may come in any order.
  std::sort(lines.begin(), lines.end(), [](const Line& a, const Line& b) { return a.rank < b.rank; });
  EXPECT_EQ(lines.size(), static_cast<size_t>(np)) << cmd;
  return lines;
}

TEST(LocalRanks, UnboundRanksOfOneHostShareItsCpus) {
  const int cpus = CpuMask::of_this_process().count();
  for (int np : {1, 2, 3}) {
    SCOPED_TRACE(np);
    const std::vector<Line> lines = run(np, "none");
    for (size_t i = 0; i < lines.size(); ++i) {
      const Line& l = lines[i];
      EXPECT_EQ(l.rank, static_cast<int>(i));
      EXPECT_EQ(l.local_rank, l.rank);  // one host: local order = world order
      EXPECT_EQ(l.local_size, np);
      EXPECT_EQ(l.cpus, cpus);
      EXPECT_EQ(l.threads, std::max(1, cpus / np));
    }
  }
}

TEST(LocalRanks, ABoundRankKeepsItsBinding) {
  // mpirun -np 1 --bind-to core (Open MPI's default for np <= 2): the rank may run on one core's CPUs.
  const std::vector<Line> lines = run(1, "core");
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_LE(lines[0].cpus, CpuMask::of_this_process().count());
  EXPECT_EQ(lines[0].threads, lines[0].cpus);
}

}  // namespace
}  // namespace shardlm
