// Started by mpirun: each rank prints one line (mpirun may forward them in any order)
//   rank R local_rank L local_size N cpus C threads T
// with C = the CPUs of this rank's affinity mask and T = the default threads the engine would run.
#include <cstdio>

#include "backends/cpu/cpu_threads.h"
#include "comm/mpi/mpi_comm.h"
#include "runtime/host_threads.h"

using namespace shardlm;

int main(int argc, char** argv) {
  try {
    auto comm = launched_by_mpi() ? make_mpi_communicator(&argc, &argv, 60) : make_single_rank_communicator();
    const int threads = host_default_cpu_threads(*comm);
    std::printf("rank %d local_rank %d local_size %d cpus %d threads %d\n", comm->rank(), comm->local_rank(),
                comm->local_size(), CpuMask::of_this_process().count(), threads);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "local_ranks_worker: %s\n", e.what());
    return 1;
  }
}
