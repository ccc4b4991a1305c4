// Helpers shared by the subcommands: value parsing with messages that name the flag, the default model,
// progress lines, the communicator for this process and the `mpirun` self-launch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "comm/communicator.h"
#include "core/units.h"
#include "loader/model_source.h"
#include "plan/cost_model.h"
#include "plan/devices.h"

namespace shardlm {

// Parses "1,2,3" into ids; Error names `flag` and the bad element.
std::vector<int32_t> parse_id_list(const std::string& s, const std::string& flag);
// Parses "3,1" into positive proportions.
std::vector<double> parse_proportions(const std::string& s, const std::string& flag);

// The whole of a text file, or of standard input when `path` is "-"; Error names `flag` and the path.
std::string read_text_file(const std::string& path, const std::string& flag);

// A seed for --seed -1: from std::random_device, so two runs differ; the caller prints it.
uint64_t random_seed();

// Writes `path` through `write(tmp)`: `write` fills a temporary file next to `path`, which is renamed onto
// `path` only once `write` returned, so an error, Ctrl-C or SIGTERM part-way leaves no half-written file at
// `path` (and removes the temporary one). Refuses (Error naming `flag`) when `path` is one of `inputs`
// (compared as canonical paths), so an output never overwrites the file it is made from. A null `write`
// only checks.
void write_output_file(const std::string& path, const std::string& flag, const std::vector<std::string>& inputs,
                       const std::function<void(const std::string& tmp)>& write);

// The bundled model: $SHARDLM_DEFAULT_MODEL, else the path compiled in, else models/ next to the binary.
std::string default_model_path();

// Host copy bandwidth (bytes/s, read plus written) with `threads` threads each copying its slice of a
// `bytes` buffer, best of 5: the ceiling a memory-bound CPU decode step can approach on this machine.
double measure_host_bandwidth(int threads, size_t bytes);

// The CPU kernels of each type the model multiplies (ModelDesc::matmul_types) timed on `threads` threads
// (~0.3 s per type): decode as one token against 128 MiB of weights (beyond the last-level cache of most
// CPUs), prefill as 64 tokens against 2048 rows; rows of 4096, the better of 2 after a warm-up. Empty when
// a type cannot be quantized here (its test weights cannot be made): the planner then models them all.
std::vector<CpuKernelRate> measure_cpu_kernels(const ModelDesc& m, int threads);

// Opens a model path (GGUF file or HF directory) with a clear error when it is missing.
std::unique_ptr<ModelSource> open_model(const std::string& path);

// Parses argv with CLI11; returns -1 to go on, else the exit status to return (0 after --help, 2 on
// a parse error, with the message and a pointer to --help on stderr).
int parse_cli(CLI::App& app, int argc, const char* const* argv);

// A progress line on stderr ("loading  42% 1.2 GiB / 2.9 GiB"), redrawn in place on terminals and
// printed at 25% steps otherwise; silent when `enabled` is false.
class Progress {
 public:
  Progress(std::string label, bool enabled);
  void operator()(uint64_t done, uint64_t total);
  void finish();

 private:
  std::string label_;
  bool enabled_, tty_;
  int last_pct_ = -1;
  double t0_;
};

// For commands that run on several ranks: when tp*pp > 1 and this process was not started by an MPI
// launcher, re-runs the same command line under `mpirun -np tp*pp` and returns its exit status;
// returns -1 when the caller should go on in this process. `forward_term_as` > 0: SIGTERM and SIGINT sent to
// this (launching) process are passed on to mpirun as that signal (serve and chat: SIGUSR1, which mpirun hands
// to every rank, where SIGTERM would make mpirun kill the job); mpirun then runs in its own process group so
// that a terminal's Ctrl-C reaches this process only, and reads our standard input through a pipe.
int maybe_self_launch(int tp, int pp, int argc, const char* const* argv, int forward_term_as = 0);

// The communicator for this process: MPI when launched by mpirun (or when world > 1), else single rank.
std::unique_ptr<Communicator> make_communicator(double timeout_s);

}  // namespace shardlm
