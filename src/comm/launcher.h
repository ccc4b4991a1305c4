// Which launcher started this process (mpirun of Open MPI, MPICH's Hydra, MVAPICH2, a PMIx server, Slurm's
// srun) and what it told the process about the job. The one place that knows the launchers' environment
// variables: the apps, the communicator's construction and the tests ask here.
//
// The variables, by launcher (the first launcher whose marker variable is set wins, in this order):
//   Open MPI   OMPI_COMM_WORLD_SIZE (marker), _RANK, _LOCAL_RANK, _LOCAL_SIZE
//   MVAPICH2   MV2_COMM_WORLD_SIZE (marker), _RANK, _LOCAL_RANK, _LOCAL_SIZE
//   Hydra      PMI_SIZE or PMI_RANK (marker), MPI_LOCALRANKID, MPI_LOCALNRANKS (MPICH, Intel MPI, srun --mpi=pmi2)
//   PMIx       PMIX_RANK (marker), PMIX_SIZE where the server sets it (srun --mpi=pmix, prterun)
//   Slurm      SLURM_STEP_ID and SLURM_PROCID (marker: a task of an srun step, not the batch script, which
//              has SLURM_PROCID and SLURM_NTASKS too), SLURM_STEP_NUM_TASKS or SLURM_NTASKS, SLURM_LOCALID
// A step of one task (`srun --pty bash`, `srun -n 1 shardlm ...`) does not count as launched: shardlm may then
// start its own ranks with mpirun, as it does outside Slurm. What the first launcher leaves unsaid (PMIx's
// world size, say) is taken from the Slurm step when one is there and agrees on the rank.
//
// Example: mpirun -np 4 on two hosts, the process of world rank 3 sees OMPI_COMM_WORLD_SIZE=4,
// OMPI_COMM_WORLD_RANK=3, OMPI_COMM_WORLD_LOCAL_RANK=1, OMPI_COMM_WORLD_LOCAL_SIZE=2:
// {kOpenMpi, world_size 4, rank 3, local_rank 1, local_size 2}.
#pragma once

#include <functional>
#include <optional>
#include <string>

namespace shardlm {

enum class Launcher { kNone, kOpenMpi, kMvapich2, kHydra, kPmix, kSlurm };

// "Open MPI", "MVAPICH2", "MPICH Hydra", "PMIx", "Slurm srun", "none".
const char* launcher_name(Launcher l);

struct LaunchEnv {
  Launcher launcher = Launcher::kNone;
  int world_size = 0;   // ranks of the job; 0 = not launched, or the launcher does not say (PMIx alone)
  int rank = 0;         // this process's rank in the job
  int local_rank = -1;  // this process's index among the job's ranks on this host; -1 = not said
  int local_size = 0;   // ranks of the job on this host; 0 = not said
  bool launched() const { return launcher != Launcher::kNone; }
};

// An environment variable's value; nothing when unset or empty (core/env.h's rule).
using EnvLookup = std::function<std::optional<std::string>(const char* name)>;

// What the variables that `lookup` gives say. A value that is not a whole number, or out of range (a size
// below 1, a rank outside [0, size)), fails naming the variable, its value and the range.
LaunchEnv parse_launch_env(const EnvLookup& lookup);

// parse_launch_env of this process's environment: for the apps and the communicator's construction.
LaunchEnv launch_env();

// launch_env().launched(): whether a launcher started this process as a rank of a job, so that it should
// initialize MPI (and not start ranks of its own).
bool launched_by_mpi();

}  // namespace shardlm
