// The golden cases on the CUDA backend under one layout, with the NCCL communicator when started by
// mpirun (one GPU per rank). Writes what the sampler rank saw (greedy ids, sampled ids, logits at the
// golden positions) to a JSON file; test_nccl compares layouts with one GPU and with run.c.
//   nccl_golden_worker MODEL GOLDEN_NAME TP PP OUT.json [graphs=1]
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include <nlohmann/json.hpp>

#include "../model/golden_run.h"
#include "comm/mpi/mpi_comm.h"
#include "comm/nccl/nccl_comm.h"
#include "runtime/engine.h"

using namespace shardlm;

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: nccl_golden_worker MODEL GOLDEN TP PP OUT [graphs]\n");
    return 2;
  }
  try {
    std::unique_ptr<Communicator> comm;
    if (launched_by_mpi()) {
      comm = make_mpi_communicator(&argc, &argv, 30);  // a hang shows up in 30 s
      if (comm->world_size() > 1) comm = make_nccl_communicator(std::move(comm), 30);
    } else {
      comm = make_single_rank_communicator();
    }
    auto src = open_model_source(argv[1]);
    EngineOptions o;
    o.backend = "cuda";
    o.kv_type = GgmlType::F32;  // F32 KV: run.c's greedy ids hold exactly (F16 may flip near-ties)
    o.tp = std::atoi(argv[3]);
    o.pp = std::atoi(argv[4]);
    o.cuda_graphs = argc < 7 || std::atoi(argv[6]) != 0;
    o.micro_batch = 4;  // several micro-batches per prompt, so the pipeline path is exercised
    Engine engine(*src, *comm, o);
    const nlohmann::json out = test::run_golden_cases(engine, argv[2]);
    const std::string layout = engine.layout_report();  // a collective: every rank calls it
    if (engine.is_sampler()) {
      std::ofstream f(argv[5]);
      f << nlohmann::json{{"cases", out}, {"layout", layout}, {"comm", comm->name()},
                          {"all_reduce", comm->all_reduce_kind()}}
               .dump();
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nccl_golden_worker: %s\n", e.what());
    return 1;
  }
}
