// Runs the golden cases under one layout (started by mpirun with tp*pp ranks, or alone) and writes what
// the sampler rank saw to a JSON file: greedy ids, logits at every golden position, and sampled ids with
// --temp 0.8 --seed 7. The test driver compares layouts with each other and with run.c's outputs.
//   parallel_worker MODEL GOLDEN_NAME TP PP LAYER_SPLIT("-"=even) OUT.json
#include <cstdio>
#include <fstream>

#include <nlohmann/json.hpp>

#include "../model/golden_run.h"
#include "comm/mpi/mpi_comm.h"
#include "runtime/engine.h"

using namespace shardlm;

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: parallel_worker MODEL GOLDEN TP PP SPLIT OUT\n");
    return 2;
  }
  try {
    auto comm = launched_by_mpi() ? make_mpi_communicator(&argc, &argv, 60) : make_single_rank_communicator();
    auto src = open_model_source(argv[1]);
    EngineOptions o;
    o.tp = std::atoi(argv[3]);
    o.pp = std::atoi(argv[4]);
    if (std::string(argv[5]) != "-") o.layer_split = {std::atof(argv[5]), std::atof(std::strchr(argv[5], ',') + 1)};
    o.n_threads = 1;
    o.micro_batch = 4;  // several micro-batches per prompt, so the pipeline path is exercised
    o.max_num_seqs = 8;  // the batched run of run_golden_cases: more sequences than fit one step at once
    Engine engine(*src, *comm, o);
    const nlohmann::json out = test::run_golden_cases(engine, argv[2]);
    const std::string layout = engine.layout_report();
    if (engine.is_sampler()) {
      std::ofstream f(argv[6]);
      f << nlohmann::json{{"cases", out}, {"layout", layout}}.dump();
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "parallel_worker: %s\n", e.what());
    return 1;
  }
}
