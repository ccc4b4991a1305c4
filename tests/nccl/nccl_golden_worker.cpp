// The golden cases on the CUDA backend under one layout, with the NCCL communicator when started by
// mpirun (one GPU per rank). Writes what the sampler rank saw (greedy ids, sampled ids, logits at the
// golden positions) to a JSON file; test_nccl compares layouts with one GPU and with run.c.
//   nccl_golden_worker MODEL GOLDEN_NAME TP PP OUT.json [graphs=1]
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include <nlohmann/json.hpp>

#include "../model/golden.h"
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
    SamplerParams greedy;
    greedy.temperature = 0;
    SamplerParams sampled;
    sampled.temperature = 0.8f;
    sampled.seed = 7;
    nlohmann::json out = nlohmann::json::array();
    for (const test::GoldenCase& g : test::load_golden(argv[2])) {
      nlohmann::json c;
      c["greedy"] = engine.generate(g.prompt_ids, static_cast<int64_t>(g.generated_ids.size()), greedy, 1).generated;
      c["sampled"] = engine.generate(g.prompt_ids, 24, sampled, -1).generated;
      std::vector<int32_t> seq = g.prompt_ids;
      seq.insert(seq.end(), g.generated_ids.begin(), g.generated_ids.end() - 1);
      const std::vector<float> all = engine.all_logits(seq);
      nlohmann::json lg = nlohmann::json::array();
      const int64_t nv = engine.config().n_vocab;
      if (engine.is_sampler())
        for (const auto& gl : g.logits)
          lg.push_back(std::vector<float>(all.begin() + gl.pos * nv, all.begin() + (gl.pos + 1) * nv));
      c["logits"] = lg;
      out.push_back(c);
    }
    if (engine.is_sampler()) {
      std::ofstream f(argv[5]);
      f << nlohmann::json{{"cases", out}, {"layout", engine.layout_report()}, {"comm", comm->name()}}.dump();
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nccl_golden_worker: %s\n", e.what());
    return 1;
  }
}
