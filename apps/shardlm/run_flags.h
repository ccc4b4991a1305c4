// Flags shared by the commands that run a model (generate, bench): layout, context, threads, KV type.
#pragma once

#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "runtime/engine.h"

namespace shardlm {

struct RunFlags {
  std::string model;
  int tp = 1, pp = 1;
  bool expert_parallel = false;
  std::string layer_split;
  std::string split_mode;
  int64_t n_ctx = 0;
  int64_t n_batch = 512;  // as EngineOptions: one prefill step per 512 prompt tokens
  int64_t micro_batch = 0;
  int threads = 0;
  std::string kv_type = "f16";  // as plan assumes, llama.cpp defaults and the issue asks
  std::string backend = "cpu";
  int n_gpu_layers = -1;
  bool cpu_moe = false;                     // --cpu-moe: every layer's experts in RAM
  int n_cpu_moe = 0;                        // --n-cpu-moe N: the first N layers' experts in RAM
  std::vector<std::string> tensor_overrides;  // -ot PATTERN=DEVICE, repeatable
  bool no_graphs = false;
  bool full_logits = false;
  double comm_timeout = 60;
  bool quiet = false;
  std::string cpu_mem;  // --cpu-mem: RAM the planner may use (G = GiB); empty = /proc/meminfo
  int64_t max_num_seqs = 1;  // not a flag here: serve sets it; the planner sizes the KV pool for this many

  void add_to(CLI::App& app);
  // Validates and builds engine options (Error names the flag).
  EngineOptions engine_options() const;
  // engine_options() with the layout checked or chosen by the planner BEFORE anything is loaded (call it
  // before maybe_self_launch): without --tp/--pp/--layer-split the planner picks tp x pp for CPU ranks of
  // this host (1 x 1 when the model fits; tp*pp = the world size when already under mpirun); a layout,
  // given or chosen, whose weights + KV + workspace exceed the RAM (or --cpu-mem) of some rank throws
  // Error (exit status 2) naming each rank's needed and available bytes. `ctx_if_unset` is the context
  // the command will use when -c is not given (0 = the engine's default: min(trained, 4096)). `src` is the
  // model the command then loads, opened once (mapped; no weights are read here).
  EngineOptions resolve(const ModelSource& src, int64_t ctx_if_unset = 0) const;
  // The model path: -m, or the bundled default model.
  std::string model_path() const;
  bool layout_given() const;

 private:
  CLI::Option* tp_opt_ = nullptr;
  CLI::Option* pp_opt_ = nullptr;
};

}  // namespace shardlm
