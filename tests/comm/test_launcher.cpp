// comm/launcher.h: every launcher's variables, read from made-up environments (no setenv), and the clear
// errors for values that are not numbers or out of range.
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "comm/launcher.h"
#include "core/error.h"

namespace shardlm {
namespace {

using Env = std::map<std::string, std::string>;

LaunchEnv parse(const Env& env) {
  return parse_launch_env([&](const char* name) -> std::optional<std::string> {
    const auto it = env.find(name);
    if (it == env.end() || it->second.empty()) return std::nullopt;
    return it->second;
  });
}

// The error parse(env) throws; fails the test when there is none.
std::string error_of(const Env& env) {
  try {
    parse(env);
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no error";
  return "";
}

void expect(const LaunchEnv& e, Launcher l, int world, int rank, int local_rank, int local_size) {
  EXPECT_EQ(e.launcher, l) << launcher_name(e.launcher);
  EXPECT_EQ(e.world_size, world);
  EXPECT_EQ(e.rank, rank);
  EXPECT_EQ(e.local_rank, local_rank);
  EXPECT_EQ(e.local_size, local_size);
}

TEST(Launcher, NoneWithoutAnyLaunchersVariables) {
  const LaunchEnv e = parse({{"PATH", "/usr/bin"}, {"HOME", "/root"}});
  EXPECT_FALSE(e.launched());
  expect(e, Launcher::kNone, 0, 0, -1, 0);
}

TEST(Launcher, OpenMpi) {
  // Rank 3 of mpirun -np 4 over two hosts; Open MPI sets PMIX_RANK too, and its own names win.
  const LaunchEnv e = parse({{"OMPI_COMM_WORLD_SIZE", "4"},
                             {"OMPI_COMM_WORLD_RANK", "3"},
                             {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                             {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
                             {"PMIX_RANK", "3"}});
  EXPECT_TRUE(e.launched());
  expect(e, Launcher::kOpenMpi, 4, 3, 1, 2);
  EXPECT_STREQ(launcher_name(e.launcher), "Open MPI");
}

TEST(Launcher, OpenMpiSingleRankCountsAsLaunched) {
  // mpirun -np 1: MPI is initialized (a world of one), no ranks are started by shardlm.
  expect(parse({{"OMPI_COMM_WORLD_SIZE", "1"}, {"OMPI_COMM_WORLD_RANK", "0"}}), Launcher::kOpenMpi, 1, 0, -1, 0);
}

TEST(Launcher, Mvapich2) {
  expect(parse({{"MV2_COMM_WORLD_SIZE", "8"},
                {"MV2_COMM_WORLD_RANK", "5"},
                {"MV2_COMM_WORLD_LOCAL_RANK", "1"},
                {"MV2_COMM_WORLD_LOCAL_SIZE", "4"}}),
         Launcher::kMvapich2, 8, 5, 1, 4);
}

TEST(Launcher, MpichHydra) {
  expect(parse({{"PMI_SIZE", "2"}, {"PMI_RANK", "1"}, {"MPI_LOCALRANKID", "1"}, {"MPI_LOCALNRANKS", "2"}}),
         Launcher::kHydra, 2, 1, 1, 2);
  // PMI_RANK alone marks it too (the size then unknown).
  expect(parse({{"PMI_RANK", "0"}}), Launcher::kHydra, 0, 0, -1, 0);
}

TEST(Launcher, PmixAloneSaysOnlyTheRank) {
  expect(parse({{"PMIX_RANK", "2"}, {"PMIX_NAMESPACE", "prterun-host-1234@1"}}), Launcher::kPmix, 0, 2, -1, 0);
  expect(parse({{"PMIX_RANK", "2"}, {"PMIX_SIZE", "4"}}), Launcher::kPmix, 4, 2, -1, 0);
}

TEST(Launcher, PmixUnderSrunTakesTheStepsSizeAndLocalRank) {
  // srun --mpi=pmix -n 4: PMIx gives the rank, the Slurm step the rest.
  expect(parse({{"PMIX_RANK", "3"},
                {"SLURM_STEP_ID", "0"},
                {"SLURM_PROCID", "3"},
                {"SLURM_STEP_NUM_TASKS", "4"},
                {"SLURM_NTASKS", "4"},
                {"SLURM_LOCALID", "1"}}),
         Launcher::kPmix, 4, 3, 1, 0);
}

TEST(Launcher, SlurmSrun) {
  expect(parse({{"SLURM_STEP_ID", "0"}, {"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"}}),
         Launcher::kSlurm, 8, 5, 1, 0);
  // The step's own task count wins over the allocation's.
  expect(parse({{"SLURM_STEP_ID", "3"},
                {"SLURM_PROCID", "1"},
                {"SLURM_NTASKS", "16"},
                {"SLURM_STEP_NUM_TASKS", "2"},
                {"SLURM_LOCALID", "1"}}),
         Launcher::kSlurm, 2, 1, 1, 0);
  EXPECT_STREQ(launcher_name(Launcher::kSlurm), "Slurm srun");
}

TEST(Launcher, SlurmBatchScriptAndOneTaskStepsAreNotLaunches) {
  // The batch script of sbatch -n 4 has SLURM_PROCID=0 and SLURM_NTASKS=4 but is one process, not a rank.
  EXPECT_FALSE(parse({{"SLURM_JOB_ID", "200505"}, {"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "4"}, {"SLURM_LOCALID", "0"}})
                   .launched());
  // srun --pty bash: a step of one task, from which shardlm may start its own ranks.
  EXPECT_FALSE(parse({{"SLURM_STEP_ID", "0"}, {"SLURM_PROCID", "0"}, {"SLURM_STEP_NUM_TASKS", "1"}}).launched());
}

TEST(Launcher, EmptyValuesAreNotGiven) {
  EXPECT_FALSE(parse({{"OMPI_COMM_WORLD_SIZE", ""}, {"PMI_RANK", ""}}).launched());
}

TEST(Launcher, BadValuesFailNamingTheVariableTheValueAndTheRange) {
  const std::string not_number = error_of({{"OMPI_COMM_WORLD_SIZE", "four"}});
  EXPECT_NE(not_number.find("OMPI_COMM_WORLD_SIZE='four' is not a whole number"), std::string::npos) << not_number;
  EXPECT_NE(error_of({{"PMI_SIZE", "2x"}}).find("PMI_SIZE='2x'"), std::string::npos);
  const std::string zero = error_of({{"MV2_COMM_WORLD_SIZE", "0"}});
  EXPECT_NE(zero.find("MV2_COMM_WORLD_SIZE=0 is below 1"), std::string::npos) << zero;
  const std::string rank = error_of({{"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_RANK", "2"}});
  EXPECT_NE(rank.find("OMPI_COMM_WORLD_RANK=2 is not below OMPI_COMM_WORLD_SIZE=2"), std::string::npos) << rank;
  const std::string negative = error_of({{"PMIX_RANK", "-1"}});
  EXPECT_NE(negative.find("PMIX_RANK=-1 is below 0"), std::string::npos) << negative;
  const std::string local = error_of({{"PMI_SIZE", "4"}, {"PMI_RANK", "0"}, {"MPI_LOCALRANKID", "2"}, {"MPI_LOCALNRANKS", "2"}});
  EXPECT_NE(local.find("MPI_LOCALRANKID=2 is not below MPI_LOCALNRANKS=2"), std::string::npos) << local;
  const std::string local_size =
      error_of({{"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "3"}});
  EXPECT_NE(local_size.find("OMPI_COMM_WORLD_LOCAL_SIZE=3 is above OMPI_COMM_WORLD_SIZE=2"), std::string::npos)
      << local_size;
  const std::string slurm = error_of({{"SLURM_STEP_ID", "0"}, {"SLURM_PROCID", "4"}, {"SLURM_NTASKS", "4"}});
  EXPECT_NE(slurm.find("SLURM_PROCID=4 is not below SLURM_NTASKS=4"), std::string::npos) << slurm;
}

}  // namespace
}  // namespace shardlm
