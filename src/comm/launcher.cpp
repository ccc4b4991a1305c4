#include "comm/launcher.h"

#include <charconv>

#include "core/env.h"
#include "core/error.h"

namespace shardlm {
namespace {

// The variable's value as a whole number, or nothing when unset or empty.
std::optional<int> read_int(const EnvLookup& lookup, const char* name, const char* meaning) {
  const std::optional<std::string> v = lookup(name);
  if (!v) return std::nullopt;
  int x = 0;
  const char* end = v->data() + v->size();
  if (auto [p, ec] = std::from_chars(v->data(), end, x); ec != std::errc() || p != end)
    fail(name, "='", *v, "' is not a whole number (", meaning, ")");
  return x;
}

// The names one launcher uses; null where it has no such variable.
struct Names {
  Launcher launcher;
  const char* size;
  const char* rank;
  const char* local_rank;
  const char* local_size;
};

// Reads the four fields under `n`'s names and checks their ranges, naming the variable that is off.
LaunchEnv read_fields(const EnvLookup& lookup, const Names& n) {
  const auto get = [&](const char* name, const char* meaning) {
    return name ? read_int(lookup, name, meaning) : std::nullopt;
  };
  const std::optional<int> size = get(n.size, "the number of ranks of the job");
  const std::optional<int> rank = get(n.rank, "this process's rank in the job");
  const std::optional<int> local_rank = get(n.local_rank, "this process's index among the job's ranks on its host");
  const std::optional<int> local_size = get(n.local_size, "the number of the job's ranks on this host");
  if (size && *size < 1) fail(n.size, "=", *size, " is below 1 (the number of ranks of the job)");
  if (rank && *rank < 0) fail(n.rank, "=", *rank, " is below 0 (this process's rank in the job)");
  if (rank && size && *rank >= *size) fail(n.rank, "=", *rank, " is not below ", n.size, "=", *size);
  if (local_size && *local_size < 1) fail(n.local_size, "=", *local_size, " is below 1 (the ranks on this host)");
  if (local_size && size && *local_size > *size) fail(n.local_size, "=", *local_size, " is above ", n.size, "=", *size);
  if (local_rank && *local_rank < 0) fail(n.local_rank, "=", *local_rank, " is below 0 (the index on this host)");
  if (local_rank && local_size && *local_rank >= *local_size)
    fail(n.local_rank, "=", *local_rank, " is not below ", n.local_size, "=", *local_size);
  LaunchEnv e;
  e.launcher = n.launcher;
  e.world_size = size.value_or(0);
  e.rank = rank.value_or(0);
  e.local_rank = local_rank.value_or(-1);
  e.local_size = local_size.value_or(0);
  return e;
}

// A task of a Slurm srun step; sbatch's batch script has SLURM_PROCID and SLURM_NTASKS but no SLURM_STEP_ID.
std::optional<LaunchEnv> slurm_step(const EnvLookup& lookup) {
  if (!lookup("SLURM_STEP_ID") || !lookup("SLURM_PROCID")) return std::nullopt;
  const char* size = lookup("SLURM_STEP_NUM_TASKS") ? "SLURM_STEP_NUM_TASKS" : "SLURM_NTASKS";
  return read_fields(lookup, {Launcher::kSlurm, size, "SLURM_PROCID", "SLURM_LOCALID", nullptr});
}

}  // namespace

const char* launcher_name(Launcher l) {
  switch (l) {
    case Launcher::kNone: return "none";
    case Launcher::kOpenMpi: return "Open MPI";
    case Launcher::kMvapich2: return "MVAPICH2";
    case Launcher::kHydra: return "MPICH Hydra";
    case Launcher::kPmix: return "PMIx";
    case Launcher::kSlurm: return "Slurm srun";
  }
  return "?";
}

LaunchEnv parse_launch_env(const EnvLookup& lookup) {
  static constexpr Names kMpiLaunchers[] = {
      {Launcher::kOpenMpi, "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
       "OMPI_COMM_WORLD_LOCAL_SIZE"},
      {Launcher::kMvapich2, "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK",
       "MV2_COMM_WORLD_LOCAL_SIZE"},
      {Launcher::kHydra, "PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"},
      {Launcher::kPmix, "PMIX_SIZE", "PMIX_RANK", nullptr, nullptr},
  };
  const std::optional<LaunchEnv> slurm = slurm_step(lookup);
  for (const Names& n : kMpiLaunchers) {
    // The marker: the size variable, or the rank variable where the launcher may leave the size out.
    if (!lookup(n.size) && !lookup(n.rank)) continue;
    LaunchEnv e = read_fields(lookup, n);
    if (slurm && slurm->rank == e.rank) {
      if (e.world_size == 0) e.world_size = slurm->world_size;
      if (e.local_rank < 0) e.local_rank = slurm->local_rank;
    }
    return e;
  }
  if (slurm && slurm->world_size > 1) return *slurm;
  return {};
}

LaunchEnv launch_env() {
  return parse_launch_env([](const char* name) { return env_value(name); });
}

bool launched_by_mpi() { return launch_env().launched(); }

}  // namespace shardlm
