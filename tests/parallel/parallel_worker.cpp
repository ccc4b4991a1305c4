// Runs the golden cases under one layout (started by mpirun with tp*pp ranks, or alone) and writes what
// the sampler rank saw to a JSON file: greedy ids, logits at every golden position, and sampled ids with
// --temp 0.8 --seed 7. The test driver compares layouts with each other and with run.c's outputs.
//   parallel_worker MODEL GOLDEN_NAME TP PP LAYER_SPLIT("-"=even) OUT.json
#include <cstdio>
#include <fstream>

#include <nlohmann/json.hpp>

#include "../model/golden.h"
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
