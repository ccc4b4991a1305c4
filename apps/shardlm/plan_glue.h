// The planner's link to the commands that run a model (generate, bench): what the loaded source looks
// like to the planner, the CPU ranks of this host as devices, and the check that a layout fits before
// anything is loaded. docs/planner.md ("generate and bench") states the behaviour.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "loader/model_source.h"
#include "plan/cost_model.h"
#include "plan/devices.h"
#include "plan/planner.h"

namespace shardlm {

// Types and shapes of every tensor of a source (GGUF or Hugging Face directory) as the loader sees them.
ModelDesc model_desc_from_source(const ModelSource& src);

struct RunPlanRequest {
  std::optional<int> tp, pp;          // both unset: the planner chooses
  std::vector<double> layer_split;    // proportions per stage; empty = even
  bool expert_parallel = false;       // --enable-expert-parallel
  int64_t ctx = 0;                    // the context the engine will allocate (already resolved)
  int64_t batch = 256;                // the engine's batch (already clamped to ctx)
  int64_t max_num_seqs = 1;           // sequences the KV pool holds at ctx each (serve's --max-num-seqs)
  GgmlType kv_type = GgmlType::F32;
  std::optional<std::string> cpu_mem; // --cpu-mem; unset = /proc/meminfo
  std::optional<int> cpu_cores;       // for tests; detected otherwise
  std::optional<double> cpu_bandwidth_gbs;  // measured host bandwidth (bench); unset = the planner's default
  std::vector<CpuKernelRate> cpu_kernels;  // the model's types' CPU kernels timed here (bench); empty = modelled
  int world_size = 0;                 // ranks already launched by mpirun (0 or 1 = not launched)
};

struct RunPlan {
  Plan plan;
  int tp = 1, pp = 1;
  std::string summary;  // one line: layout and the busiest rank's bytes against what it has
};

// Plans CPU ranks of this host for a run. Without tp/pp the fastest fitting layout is chosen (tp*pp =
// world_size when already launched). Throws Error (exit status 2) when the chosen or given layout does
// not fit, naming each rank's needed and available bytes.
RunPlan plan_run(const ModelDesc& m, const RunPlanRequest& req);

}  // namespace shardlm
