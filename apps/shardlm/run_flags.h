// Flags shared by the commands that run a model (generate, bench): layout, context, threads, KV type.
#pragma once

#include <string>

#include <CLI/CLI.hpp>

#include "runtime/engine.h"

namespace shardlm {

struct RunFlags {
  std::string model;
  int tp = 1, pp = 1;
  std::string layer_split;
  std::string split_mode;
  int64_t n_ctx = 0;
  int64_t n_batch = 256;
  int64_t micro_batch = 0;
  int threads = 0;
  std::string kv_type = "f32";
  std::string backend = "cpu";
  double comm_timeout = 60;
  bool quiet = false;

  void add_to(CLI::App& app);
  // Validates and builds engine options (Error names the flag).
  EngineOptions engine_options() const;
};

}  // namespace shardlm
