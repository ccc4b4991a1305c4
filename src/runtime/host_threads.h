// The default number of CPU threads of a rank (-t not given), from the affinity masks of its host's ranks.
#pragma once

#include "comm/communicator.h"

namespace shardlm {

// default_cpu_threads (backends/cpu/cpu_threads.h) of this process's sched_getaffinity mask among those of
// the other ranks of its host, gathered through comm.local_all_gather: all the CPUs of the host for a rank
// alone, half each for two ranks that may both run anywhere, 1 each for ranks that mpirun bound to one CPU
// (the launcher's or user's binding is kept). Collective over the ranks of this host.
int host_default_cpu_threads(Communicator& comm);

}  // namespace shardlm
